#pragma once
// The deputy's startup steps (mos-deputy's main): the image, the connection, JobStart.

#include <cstdint>
#include <string>

#include <capnp/message.h>
#include <kj/io.h>

#include "cluster_auth.h"
#include "fds.h"
#include "image.capnp.h"

namespace mos::deputy {

// A migration image read from its file (capnp standard framing, unpacked, as libmigrate writes
// it), mapped privately. The descriptor is closed before returning.
class ImageFile {
 public:
  // Maps `path`. Throws kj::Exception (FAILED) naming the path and the errno, or when the bytes
  // are not a message.
  explicit ImageFile(const std::string& path);
  ~ImageFile();
  KJ_DISALLOW_COPY(ImageFile);

  proto::MigrationImage::Reader root() { return reader_->getRoot<proto::MigrationImage>(); }

 private:
  void* map_ = nullptr;
  size_t size_ = 0;
  kj::Own<capnp::MessageReader> reader_;
};

// Connects a TCP socket to address:port (numeric IPv4 or IPv6, else resolved with
// getaddrinfo(3)) within `timeoutMs`, moves it to a reserved high number (fds.h), makes it
// blocking again and tunes it (tuneJobSocket). Returns the descriptor, or -errno (ETIMEDOUT
// when the timeout passed, EHOSTUNREACH when the name does not resolve).
int connectJobSocket(const std::string& address, uint16_t port, int timeoutMs, ReservedFds& fds);

// The client half of the handshake of cluster_auth.h on a connected blocking socket: sends
// HELLO_JOB, reads mosd's nonce, sends the proof for `credentials`, reads the accept byte
// (MSG_NOSIGNAL; each read waits at most `timeoutMs`). Returns 0, -EACCES when mosd closed the
// connection instead of accepting (a wrong key or node id), -ETIMEDOUT, or another -errno.
int sendHello(int fd, const ClusterCredentials& credentials, int timeoutMs);

// Fills `start` from this process's ids, the image and `command`.
void fillJobStart(uint32_t homeNode, proto::MigrationImage::Reader image,
                  const std::string& command, capnp::MessageBuilder& message);

// The job's command line for logs and mps: the image's argv joined by spaces, else its comm.
std::string imageCommand(proto::MigrationImage::Reader image);

}  // namespace mos::deputy
