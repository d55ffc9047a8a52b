#pragma once
// The remote node's content cache (design decision 6): executables, shared libraries and other
// files a guest maps are fetched once through the deputy and kept in CACHE_DIR, keyed by the
// home file's identity, so a second job (or a second mmap) of the same file costs no transfer.

#include <cstdint>
#include <functional>
#include <string>

#include <kj/array.h>
#include <kj/common.h>

#include "image.capnp.h"
#include "job_registry.h"

namespace mos::remote {

class FileCache {
 public:
  // `dir` is created if missing. `homeNode` is part of every key: (dev, ino) of two home nodes
  // are unrelated.
  FileCache(std::string dir, uint32_t homeNode);

  // The cache file name for `ref`: "n<home>-<dev hex>-<ino>-<size>-<mtimeNs>".
  std::string keyOf(proto::FileRef::Reader ref) const;

  // The local path of the cached copy of `ref`, or nullptr when it is not cached (or its size
  // differs from ref.size, a torn entry, which is removed).
  kj::Maybe<std::string> lookup(proto::FileRef::Reader ref);

  // Receives the bytes of `ref` through `fill` and installs them atomically (temp file + rename,
  // so concurrent supervisors never see a partial file). `fill(fd)` writes the whole content to
  // fd and returns; it may throw, and then nothing is installed. Returns the local path.
  // Throws kj::Exception (FAILED) when the received size differs from ref.size.
  std::string store(proto::FileRef::Reader ref, const std::function<void(int fd)>& fill);

  // From now on counts lookups that hit, and files stored (misses: fetched from home) with their
  // bytes, into `stats` (a guest record, mps -d), starting with what was counted before. May
  // be shared by several caches of one job (atomic adds: hits and misses are rare events).
  void countInto(JobStats* stats);

 private:
  void count(uint64_t hits, uint64_t misses, uint64_t bytes);

  std::string dir_;
  uint32_t homeNode_;
  JobStats* stats_ = nullptr;
  uint64_t hits_ = 0, misses_ = 0, bytes_ = 0;  // before countInto
};

}  // namespace mos::remote
