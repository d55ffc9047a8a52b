#include "channel.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <climits>

#include <cerrno>
#include <cstring>

#include <kj/debug.h>

namespace mos {

namespace {
constexpr size_t BUFFER_BYTES = 64 * 1024;
constexpr uint32_t MAX_SEGMENTS = 512;

void addBytes(std::atomic<uint64_t>* counter, size_t n) {
  if (counter != nullptr) {
    counter->store(counter->load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
}
}  // namespace

capnp::ReaderOptions channelReaderOptions() {
  capnp::ReaderOptions options;
  options.traversalLimitInWords = (uint64_t{1} << 30) / sizeof(capnp::word);
  options.nestingLimit = 64;
  return options;
}

Channel::Channel(kj::AutoCloseFd fd)
    : fd_(kj::mv(fd)), buffer_(kj::heapArray<kj::byte>(BUFFER_BYTES)) {}

void Channel::send(capnp::MessageBuilder& message) {
  auto segments = message.getSegmentsForOutput();
  // Same framing as capnp::writeMessage, built here so that the whole frame leaves in one
  // writev(2) and a peer that is gone surfaces as DISCONNECTED.
  kj::Array<uint32_t> table = kj::heapArray<uint32_t>((segments.size() + 2) & ~size_t(1));
  table[0] = segments.size() - 1;
  for (size_t i = 0; i < segments.size(); i++) {
    table[i + 1] = segments[i].size();
  }
  if (segments.size() % 2 == 0) {
    table[segments.size() + 1] = 0;
  }
  kj::Vector<struct iovec> iov(segments.size() + 1);
  iov.add(iovec{table.begin(), table.size() * sizeof(uint32_t)});
  for (auto segment : segments) {
    iov.add(iovec{const_cast<capnp::word*>(segment.begin()), segment.size() * sizeof(capnp::word)});
  }
  size_t first = 0;
  while (first < iov.size()) {
    // sendmsg with MSG_NOSIGNAL: a vanished peer is an EPIPE here, never a SIGPIPE that the
    // deputy would mistake for one of the job's signals.
    struct msghdr msg = {};
    msg.msg_iov = iov.begin() + first;
    msg.msg_iovlen = kj::min(iov.size() - first, size_t(IOV_MAX));
    ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      if (errno == EPIPE || errno == ECONNRESET || errno == ETIMEDOUT) {
        kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "job channel lost", strerror(errno)));
      }
      KJ_FAIL_SYSCALL("sendmsg", errno);
    }
    addBytes(sent_, n);
    size_t left = n;
    while (first < iov.size() && left >= iov[first].iov_len) {
      left -= iov[first].iov_len;
      first++;
    }
    if (left > 0) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
}

void Channel::sendBytes(const void* data, size_t size) {
  const char* at = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::send(fd_.get(), at, size, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      if (errno == EPIPE || errno == ECONNRESET || errno == ETIMEDOUT) {
        kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "job channel lost", strerror(errno)));
      }
      KJ_FAIL_SYSCALL("send", errno);
    }
    addBytes(sent_, n);
    at += n;
    size -= n;
  }
}

size_t Channel::receiveBytes(kj::byte* dst, size_t min, size_t max) {
  size_t got = 0;
  if (begin_ < end_) {
    got = kj::min(end_ - begin_, max);
    memcpy(dst, buffer_.begin() + begin_, got);
    begin_ += got;
  }
  while (got < min) {
    ssize_t n = readSome(dst + got, max - got);
    if (n < 0) {
      continue;  // EINTR
    }
    if (n == 0) {
      break;
    }
    got += n;
  }
  return got;
}

void Channel::unreceive(kj::ArrayPtr<const kj::byte> bytes) {
  KJ_REQUIRE(begin_ == end_ && bytes.size() <= buffer_.size(), "unreceive: buffer in use",
             end_ - begin_, bytes.size());
  memcpy(buffer_.begin(), bytes.begin(), bytes.size());
  begin_ = 0;
  end_ = bytes.size();
}

ssize_t Channel::readSome(kj::byte* dst, size_t max) {
  ssize_t n = ::read(fd_.get(), dst, max);
  if (n < 0 && errno != EINTR) {
    if (errno == ECONNRESET || errno == ETIMEDOUT || errno == EPIPE) {
      kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "job channel lost", strerror(errno)));
    }
    KJ_FAIL_SYSCALL("read", errno);
  }
  if (n > 0) {
    addBytes(received_, n);
  }
  return n;
}

size_t Channel::readAtLeast(kj::byte* dst, size_t min) {
  size_t got = 0;
  while (got < min) {
    if (begin_ == end_) {
      size_t want = min - got;
      if (want >= buffer_.size()) {
        // Large payloads go straight to their destination, skipping the buffer copy.
        ssize_t n = readSome(dst + got, want);
        if (n < 0) {
          continue;  // EINTR
        }
        if (n == 0) {
          return got;
        }
        got += n;
        continue;
      }
      ssize_t n = readSome(buffer_.begin(), buffer_.size());
      if (n < 0) {
        continue;  // EINTR
      }
      if (n == 0) {
        return got;
      }
      begin_ = 0;
      end_ = n;
    }
    size_t take = kj::min(end_ - begin_, min - got);
    memcpy(dst + got, buffer_.begin() + begin_, take);
    begin_ += take;
    got += take;
  }
  return got;
}

kj::Maybe<kj::Own<capnp::MessageReader>> Channel::receive() {
  uint32_t first[2];
  size_t n = readAtLeast(reinterpret_cast<kj::byte*>(first), sizeof(first));
  if (n == 0) {
    return nullptr;
  }
  if (n < sizeof(first)) {
    kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "job channel closed inside a message"));
  }
  // Compared before adding one: a count of 2^32 - 1 would wrap to no segments at all.
  if (first[0] >= MAX_SEGMENTS) {
    kj::throwFatalException(
        KJ_EXCEPTION(FAILED, "malformed frame: too many segments", uint64_t(first[0]) + 1));
  }
  uint32_t segmentCount = first[0] + 1;
  // Segment sizes in words: the first is in `first[1]`, the rest follow, padded to a word.
  kj::Array<uint32_t> sizes = kj::heapArray<uint32_t>(segmentCount);
  sizes[0] = first[1];
  size_t restTable = ((segmentCount & ~uint32_t(1)) * sizeof(uint32_t));
  if (restTable > 0) {
    kj::Array<uint32_t> rest = kj::heapArray<uint32_t>(restTable / sizeof(uint32_t));
    if (readAtLeast(rest.asBytes().begin(), restTable) < restTable) {
      kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "job channel closed inside a message"));
    }
    for (uint32_t i = 1; i < segmentCount; i++) {
      sizes[i] = rest[i - 1];
    }
  }
  uint64_t totalWords = 0;
  for (auto s : sizes) {
    totalWords += s;
  }
  if (totalWords > channelReaderOptions().traversalLimitInWords) {
    kj::throwFatalException(KJ_EXCEPTION(FAILED, "malformed frame: message too large", totalWords));
  }
  auto words = kj::heapArray<capnp::word>(totalWords);
  size_t bytes = totalWords * sizeof(capnp::word);
  if (readAtLeast(words.asBytes().begin(), bytes) < bytes) {
    kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "job channel closed inside a message"));
  }
  auto segments = kj::heapArray<kj::ArrayPtr<const capnp::word>>(segmentCount);
  size_t offset = 0;
  for (uint32_t i = 0; i < segmentCount; i++) {
    segments[i] = words.slice(offset, offset + sizes[i]);
    offset += sizes[i];
  }
  auto reader =
      kj::heap<capnp::SegmentArrayMessageReader>(segments.asPtr(), channelReaderOptions());
  return kj::Own<capnp::MessageReader>(kj::mv(reader)).attach(kj::mv(words), kj::mv(segments));
}

bool Channel::hasBuffered() { return begin_ < end_; }

void tuneJobSocket(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  int idle = 2, interval = 1, count = 3;
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
  unsigned timeoutMs = 5000;
  setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &timeoutMs, sizeof(timeoutMs));
}

}  // namespace mos
