#include "startup.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <capnp/serialize.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "channel.h"
#include "job.capnp.h"

namespace mos::deputy {

ImageFile::ImageFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    KJ_FAIL_SYSCALL("open", errno, path);
  }
  fd_ = kj::AutoCloseFd(fd);
  // MAGIC, then the header's segment table (capnp standard framing): its size in words.
  uint32_t first[2] = {};
  ssize_t n = pread(fd, first, sizeof(first), sizeof(migrate::IMAGE_MAGIC));
  KJ_REQUIRE(n == sizeof(first), "not a umosix migration image (too short)", path);
  uint32_t segments = first[0] + 1;
  KJ_REQUIRE(segments <= 512, "migration image corrupt: its header does not parse", path);
  uint64_t table = ((segments + 2) & ~uint32_t(1)) * sizeof(uint32_t);
  auto sizes = kj::heapArray<uint32_t>(table / sizeof(uint32_t));
  n = pread(fd, sizes.begin(), table, sizeof(migrate::IMAGE_MAGIC));
  KJ_REQUIRE(n == static_cast<ssize_t>(table), "migration image truncated", path);
  uint64_t words = 0;
  for (uint32_t i = 0; i < segments; i++) {
    words += sizes[i + 1];
  }
  headerEnd_ = sizeof(migrate::IMAGE_MAGIC) + table + words * sizeof(capnp::word);
  KJ_REQUIRE(headerEnd_ <= (uint64_t{256} << 20), "migration image corrupt: header too large");
  headerBytes_ = kj::heapArray<kj::byte>(headerEnd_);
  n = pread(fd, headerBytes_.begin(), headerEnd_, 0);
  KJ_REQUIRE(n == static_cast<ssize_t>(headerEnd_), "migration image truncated", path);
  headerStream_ = kj::heap<kj::ArrayInputStream>(headerBytes_.asPtr());
  reader_ = kj::heap<migrate::ImageReader>(*headerStream_);
}

void sendFileBytes(Channel& channel, int fd, uint64_t from, uint64_t to) {
  constexpr size_t CHUNK = 1 << 20;
  auto buffer = kj::heapArray<kj::byte>(CHUNK);
  while (from < to) {
    size_t want = static_cast<size_t>(kj::min(to - from, uint64_t(CHUNK)));
    ssize_t n = pread(fd, buffer.begin(), want, static_cast<off_t>(from));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      KJ_FAIL_SYSCALL("pread of the migration image", errno);
    }
    if (n == 0) {
      KJ_REQUIRE(to == UINT64_MAX, "migration image shorter than expected", from, to);
      return;
    }
    channel.sendBytes(buffer.begin(), n);
    from += n;
  }
}

void sendFetchedFile(Channel& channel, uint64_t id, int fd, const std::string& path, int err,
                     bool wantData) {
  constexpr size_t FILE_CHUNK_BYTES = 1u << 20;  // FileData.data is at most 1 MiB
  capnp::MallocMessageBuilder infoMessage;
  auto info = infoMessage.initRoot<proto::ToRemote>().initFileInfo();
  info.setId(id);
  struct stat st = {};
  if (err == 0 && fstat(fd, &st) < 0) {
    err = errno;
  }
  if (err == 0 && wantData && !S_ISREG(st.st_mode)) {
    err = S_ISDIR(st.st_mode) ? EISDIR : ENODEV;
  }
  info.setErr(static_cast<uint16_t>(err));
  if (err == 0) {
    auto ref = info.initRef();
    ref.setPath(kj::arrayPtr(reinterpret_cast<const kj::byte*>(path.data()), path.size()));
    ref.setDev(st.st_dev);
    ref.setIno(st.st_ino);
    ref.setSize(st.st_size);
    ref.setMtimeNs(static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec);
    ref.setMode(st.st_mode);
  }
  channel.send(infoMessage);
  if (err != 0 || !wantData) {
    return;
  }
  uint64_t size = st.st_size;
  uint64_t offset = 0;
  for (;;) {
    size_t want = static_cast<size_t>(kj::min(uint64_t{FILE_CHUNK_BYTES}, size - offset));
    capnp::MallocMessageBuilder message(want / sizeof(capnp::word) + 64);
    auto chunk = message.initRoot<proto::ToRemote>().initFileData();
    chunk.setId(id);
    chunk.setOffset(offset);
    auto data = chunk.initData(want);
    size_t got = 0;
    while (got < want) {
      ssize_t n = pread(fd, data.begin() + got, want - got, offset + got);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n <= 0) {
        if (n < 0) {
          spdlog::warn("fetch of {} stopped at {}: {}", path, offset + got, strerror(errno));
        }
        break;
      }
      got += n;
    }
    bool last = got < want || offset + got >= size;
    if (got < want) {
      auto orphan = chunk.disownData();
      orphan.truncate(got);
      chunk.adoptData(kj::mv(orphan));
    }
    chunk.setLast(last);
    channel.send(message);
    offset += got;
    if (last) {
      return;
    }
  }
}

namespace {

// Resolves address:port into `storage`. Returns 0 or -errno.
int resolve(const std::string& address, uint16_t port, sockaddr_storage& storage,
            socklen_t& length) {
  memset(&storage, 0, sizeof(storage));
  auto* v4 = reinterpret_cast<sockaddr_in*>(&storage);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&storage);
  if (inet_pton(AF_INET, address.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    length = sizeof(*v4);
    return 0;
  }
  if (inet_pton(AF_INET6, address.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
    length = sizeof(*v6);
    return 0;
  }
  struct addrinfo hints = {};
  hints.ai_socktype = SOCK_STREAM;
  struct addrinfo* found = nullptr;
  if (getaddrinfo(address.c_str(), nullptr, &hints, &found) != 0 || found == nullptr) {
    return -EHOSTUNREACH;
  }
  memcpy(&storage, found->ai_addr, found->ai_addrlen);
  length = found->ai_addrlen;
  if (storage.ss_family == AF_INET) {
    v4->sin_port = htons(port);
  } else {
    v6->sin6_port = htons(port);
  }
  freeaddrinfo(found);
  return 0;
}

}  // namespace

int connectJobSocket(const std::string& address, uint16_t port, int timeoutMs, ReservedFds& fds) {
  sockaddr_storage storage;
  socklen_t length;
  int err = resolve(address, port, storage, length);
  if (err != 0) {
    return err;
  }
  int fd = socket(storage.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    return -errno;
  }
  try {
    fd = fds.moveHigh(fd);
  } catch (kj::Exception&) {
    close(fd);
    return -EMFILE;
  }
  auto failWith = [&](int e) {
    fds.remove(fd);
    close(fd);
    return -e;
  };
  if (connect(fd, reinterpret_cast<sockaddr*>(&storage), length) < 0) {
    if (errno != EINPROGRESS) {
      return failWith(errno);
    }
    struct pollfd pfd = {fd, POLLOUT, 0};
    int n;
    do {
      n = poll(&pfd, 1, timeoutMs);
    } while (n < 0 && errno == EINTR);
    if (n == 0) {
      return failWith(ETIMEDOUT);
    }
    if (n < 0) {
      return failWith(errno);
    }
    int soError = 0;
    socklen_t soLength = sizeof(soError);
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &soLength);
    if (soError != 0) {
      return failWith(soError);
    }
  }
  int flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  tuneJobSocket(fd);
  // Urgent data from the supervisor (a cancel) raises SIGURG in this thread.
  struct f_owner_ex owner = {F_OWNER_TID, static_cast<pid_t>(gettid())};
  fcntl(fd, F_SETOWN_EX, &owner);
  return fd;
}

namespace {

int sendAll(int fd, const void* data, size_t size) {
  size_t done = 0;
  while (done < size) {
    ssize_t n = send(fd, static_cast<const char*>(data) + done, size - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return -errno;
    }
    done += n;
  }
  return 0;
}

// Reads exactly `size` bytes, each wait bounded by timeoutMs. Returns 0, -EACCES at end of
// stream (the peer refused us), -ETIMEDOUT or -errno.
int receiveAll(int fd, void* data, size_t size, int timeoutMs) {
  size_t done = 0;
  while (done < size) {
    struct pollfd pfd = {fd, POLLIN, 0};
    int ready = poll(&pfd, 1, timeoutMs);
    if (ready < 0 && errno == EINTR) {
      continue;
    }
    if (ready < 0) {
      return -errno;
    }
    if (ready == 0) {
      return -ETIMEDOUT;
    }
    ssize_t n = recv(fd, static_cast<char*>(data) + done, size - done, MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
      continue;
    }
    if (n < 0) {
      return errno == ECONNRESET ? -EACCES : -errno;
    }
    if (n == 0) {
      return -EACCES;
    }
    done += n;
  }
  return 0;
}

}  // namespace

int sendHello(int fd, const ClusterCredentials& credentials, int timeoutMs) {
  int err = sendAll(fd, HELLO_JOB, sizeof(HELLO_JOB));
  AuthNonce nonce;
  if (err == 0) {
    err = receiveAll(fd, nonce.data(), nonce.size(), timeoutMs);
  }
  if (err == 0) {
    AuthProof proof = credentials.key.prove(kj::arrayPtr(HELLO_JOB, sizeof(HELLO_JOB)), nonce,
                                            credentials.nodeId);
    err = sendAll(fd, proof.data(), proof.size());
  }
  uint8_t accepted = 0;
  if (err == 0) {
    err = receiveAll(fd, &accepted, 1, timeoutMs);
  }
  if (err == 0 && accepted != AUTH_ACCEPTED) {
    err = -EACCES;
  }
  return err;
}

std::string imageCommand(proto::ImageHeader::Reader header) {
  std::string command;
  for (auto arg : header.getArgv()) {
    if (!command.empty()) {
      command += ' ';
    }
    command.append(reinterpret_cast<const char*>(arg.begin()), arg.size());
  }
  if (command.empty()) {
    command = header.getCommand();
  }
  return command;
}

void fillJobStart(uint32_t homeNode, const std::string& command, capnp::MessageBuilder& message) {
  auto start = message.initRoot<proto::JobStart>();
  start.setHomeNode(homeNode);
  auto ids = start.initIds();
  ids.setPid(getpid());
  ids.setTid(static_cast<int32_t>(::syscall(SYS_gettid)));
  ids.setUid(getuid());
  ids.setEuid(geteuid());
  ids.setGid(getgid());
  ids.setEgid(getegid());
  start.setCommand(command);
  start.setImageStreamed(true);
}

}  // namespace mos::deputy
