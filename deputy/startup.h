#pragma once
// The deputy's startup steps (mos-deputy's main): the image, the connection, JobStart.

#include <cstdint>
#include <string>

#include <capnp/message.h>
#include <kj/io.h>

#include "cluster_auth.h"
#include "fds.h"
#include "channel.h"
#include "image_stream.h"

namespace mos::deputy {

// A migration stream in a file (protocol/migration.md), as the migration agent or `migrate`
// wrote it: its header parsed, its descriptor kept (the caller unlinks the path) so that the
// stream can be sent to the node in two parts (JobStart.imageStreamed).
class ImageFile {
 public:
  // Opens `path` and reads MAGIC and the header (the frames stay in the file). Throws
  // kj::Exception (FAILED) naming the path and the errno, or ImageReader's words for a damaged
  // or foreign file.
  explicit ImageFile(const std::string& path);
  KJ_DISALLOW_COPY(ImageFile);

  proto::ImageHeader::Reader header() { return reader_->header(); }
  int fd() const { return fd_.get(); }
  // Bytes of MAGIC and the header: what goes right after JobStart.
  uint64_t headerEnd() const { return headerEnd_; }
  // Gives up the descriptor (the deputy keeps it until the supervisor asks for the frames).
  kj::AutoCloseFd releaseFd() { return kj::mv(fd_); }

 private:
  kj::AutoCloseFd fd_;
  uint64_t headerEnd_ = 0;
  kj::Array<kj::byte> headerBytes_;
  kj::Own<kj::ArrayInputStream> headerStream_;
  kj::Own<migrate::ImageReader> reader_;
};

// Sends bytes [from, to) of file `fd` over `channel` as raw bytes, 1 MiB at a time (pread: the
// file offset is not used). `to` = UINT64_MAX: to the end of the file. Throws as Channel::send,
// or FAILED on a read error.
void sendFileBytes(Channel& channel, int fd, uint64_t from, uint64_t to);

// Answers a FetchFile request `id` (protocol/job.capnp, the content cache's fetch) over
// `channel`: a FileInfo with `err` (an errno, 0: none) or with the identity of open file `fd`
// (path `path`, dev, inode, size, mtime, mode), then, when `wantData` and `fd` is a regular
// file, its bytes in FileData messages of at most 1 MiB (the last one `last`). `fd` is the
// caller's and stays open. Throws as Channel::send.
void sendFetchedFile(Channel& channel, uint64_t id, int fd, const std::string& path, int err,
                     bool wantData);

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

// Fills `start` from this process's ids and `command`, with imageStreamed set: the stream follows.
void fillJobStart(uint32_t homeNode, const std::string& command, capnp::MessageBuilder& message);

// The job's command line for logs and mps: the image's argv joined by spaces, else its comm.
std::string imageCommand(proto::ImageHeader::Reader header);

}  // namespace mos::deputy
