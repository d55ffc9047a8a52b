#pragma once
// The job channel's framing: Cap'n Proto messages (standard stream framing, unpacked) over one
// blocking stream socket. One send() is one sendmsg(2); receive() reads through a 64 KiB buffer, so
// a small message costs one read(2). See protocol/job.capnp for what travels on it.

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/io.h>
#include <kj/vector.h>

#include <sys/types.h>

#include <atomic>
#include <cstdint>

namespace mos {

// The 8-byte hellos that select a service on a mosd connection (protocol/job.capnp).
inline constexpr char HELLO_RPC[8] = {'U', 'M', 'O', 'S', 'R', 'P', 'C', '1'};
inline constexpr char HELLO_JOB[8] = {'U', 'M', 'O', 'S', 'J', 'O', 'B', '1'};
// A child deputy's job channel to its job's supervisor (protocol/job.capnp, ForkRequest).
inline constexpr char HELLO_CHILD[8] = {'U', 'M', 'O', 'S', 'C', 'H', 'L', 'D'};

// Reader limits for the job channel: images and file chunks are large, so the traversal limit
// is 1 GiB worth of words.
capnp::ReaderOptions channelReaderOptions();

// A framed-message connection. Owns its descriptor. Not thread safe.
class Channel {
 public:
  explicit Channel(kj::AutoCloseFd fd);
  KJ_DISALLOW_COPY(Channel);

  int fd() const { return fd_.get(); }

  // Sends one message. Throws kj::Exception of type DISCONNECTED when the peer is gone
  // (EPIPE, ECONNRESET); FAILED for any other write error. Blocks until written.
  void send(capnp::MessageBuilder& message);

  // Receives one message, blocking. Returns nullptr at a clean end of stream (the peer closed
  // between messages). Throws DISCONNECTED on a reset or an end of stream inside a message, and
  // FAILED when the bytes do not parse as a message. The reader must be destroyed before the next
  // receive() (it may read lazily from the shared buffer).
  kj::Maybe<kj::Own<capnp::MessageReader>> receive();

  // Sends `size` raw bytes (a migration stream after JobStart, protocol/job.capnp). Throws as
  // send() does. Blocks until written.
  void sendBytes(const void* data, size_t size);

  // Reads between `min` and `max` raw bytes into `dst`, buffered bytes first. Returns the bytes
  // read, less than `min` only at end of stream. Throws DISCONNECTED on a reset.
  size_t receiveBytes(kj::byte* dst, size_t min, size_t max);

  // Puts `bytes` back in front of what receive() and receiveBytes() read next (bytes a reader
  // of the raw stream read ahead past its end). Preconditions: nothing is buffered now and
  // `bytes` fits the 64 KiB buffer.
  void unreceive(kj::ArrayPtr<const kj::byte> bytes);

  // True when bytes of a next message are already buffered, so receive() will not wait for the
  // socket to become readable first (poll(2) on fd() would miss them).
  bool hasBuffered();

  // Replaces the descriptor by `fd`, another descriptor of the same connection (the deputy moves
  // its socket out of the job's way when the job dup2()s onto its number); closes the old one.
  // Buffered bytes are kept.
  void replaceFd(kj::AutoCloseFd fd) { fd_ = kj::mv(fd); }

  // From now on adds the bytes sent and received on the socket to `sent` and `received` (a job
  // record's counters, mps -d), with relaxed loads and stores: the channel is their only writer.
  // nullptr stops counting.
  void countBytesInto(std::atomic<uint64_t>* sent, std::atomic<uint64_t>* received) {
    sent_ = sent;
    received_ = received;
  }

 private:
  // Reads at least `min` bytes into `dst` from the buffer, then the socket. Returns the bytes
  // read, less than `min` only at end of stream.
  size_t readAtLeast(kj::byte* dst, size_t min);
  // One read(2): bytes read, 0 at end of stream, -1 on EINTR. Throws DISCONNECTED on a reset or
  // timeout, FAILED on other errors.
  ssize_t readSome(kj::byte* dst, size_t max);

  kj::AutoCloseFd fd_;
  kj::Array<kj::byte> buffer_;  // 64 KiB
  size_t begin_ = 0;            // unread bytes are [begin_, end_)
  size_t end_ = 0;
  std::atomic<uint64_t>* sent_ = nullptr;
  std::atomic<uint64_t>* received_ = nullptr;
};

// The raw bytes of a channel as a kj::InputStream (ImageReader reads a migration stream from it).
// An end of stream inside a read is a short read, which ImageReader reports as truncated.
class ChannelInputStream final : public kj::InputStream {
 public:
  explicit ChannelInputStream(Channel& channel) : channel_(channel) {}
  size_t tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    return channel_.receiveBytes(static_cast<kj::byte*>(buffer), minBytes, maxBytes);
  }

 private:
  Channel& channel_;
};

// Sets TCP_NODELAY and short keepalive probes (idle 2 s, interval 1 s, 3 probes) plus
// TCP_USER_TIMEOUT of 5 s on a connected TCP socket, so a dead peer node is noticed within
// about 5 s even while we wait in read(2). Errors are ignored (a Unix socket has none of these).
void tuneJobSocket(int fd);

}  // namespace mos
