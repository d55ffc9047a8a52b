#pragma once
// Migration image files: one Cap'n Proto message (protocol/image.capnp MigrationImage) per file,
// unpacked, as capnp::writeMessageToFd writes it. The agent writes them; the deputy reads them.

#include <capnp/message.h>
#include <kj/memory.h>
#include <kj/string.h>

namespace mos::migrate {

// Writes `message` to `path` (created or truncated, mode 0600 even if the file existed).
// Throws kj::Exception (FAILED) on any I/O error; a partial file is removed.
void writeImageFile(kj::StringPtr path, capnp::MessageBuilder& message);

// Maps `path` read-only and returns a reader over it (no copy; the reader owns the mapping).
// Read the root with `->getRoot<proto::MigrationImage>()`. Traversal limits are lifted: images
// are large. Throws kj::Exception (FAILED) if the file cannot be opened or is not a message.
kj::Own<capnp::MessageReader> readImageFile(kj::StringPtr path);

}  // namespace mos::migrate
