// tcp_pingpong: the network floor of a forwarded syscall. One 64-byte message each way per
// round trip over one TCP connection with TCP_NODELAY (tcp(7)).
//   tcp_pingpong server ADDR PORT      echo 64-byte messages of one connection until EOF
//   tcp_pingpong client ADDR PORT N    N timed round trips; prints the median

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "stats.h"

namespace {

constexpr size_t MESSAGE_SIZE = 64;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "tcp_pingpong: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

// Reads or writes exactly MESSAGE_SIZE bytes; false on EOF.
bool transferAll(int fd, char* buf, bool reading) {
  size_t done = 0;
  while (done < MESSAGE_SIZE) {
    ssize_t n = reading ? read(fd, buf + done, MESSAGE_SIZE - done)
                        : write(fd, buf + done, MESSAGE_SIZE - done);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      fail(reading ? "read" : "write");
    }
    if (n == 0) {
      return false;
    }
    done += size_t(n);
  }
  return true;
}

sockaddr_in parseAddress(const char* addr, const char* port) {
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(uint16_t(std::atoi(port)));
  if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
    std::fprintf(stderr, "tcp_pingpong: bad IPv4 address %s\n", addr);
    std::exit(2);
  }
  return sa;
}

void setNoDelay(int fd) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0) {
    fail("setsockopt(TCP_NODELAY)");
  }
}

int serve(const sockaddr_in& sa) {
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listener < 0) {
    fail("socket");
  }
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(listener, reinterpret_cast<const sockaddr*>(&sa), sizeof(sa)) < 0) {
    fail("bind");
  }
  if (listen(listener, 1) < 0) {
    fail("listen");
  }
  std::printf("listening\n");
  std::fflush(stdout);
  int fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0) {
    fail("accept");
  }
  setNoDelay(fd);
  char buf[MESSAGE_SIZE];
  while (transferAll(fd, buf, true)) {
    transferAll(fd, buf, false);
  }
  return 0;
}

int client(const sockaddr_in& sa, long n) {
  int fd = -1;
  // The server may still be starting: retry for up to 5 s.
  for (int attempt = 0; attempt < 500; attempt++) {
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      fail("socket");
    }
    if (connect(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof(sa)) == 0) {
      break;
    }
    close(fd);
    fd = -1;
    usleep(10000);
  }
  if (fd < 0) {
    fail("connect");
  }
  setNoDelay(fd);
  char buf[MESSAGE_SIZE];
  std::memset(buf, 'x', sizeof(buf));
  for (long i = 0; i < std::min(n, 200L); i++) {
    transferAll(fd, buf, false);
    transferAll(fd, buf, true);
  }
  std::vector<uint64_t> samples(size_t(n), 0);
  for (long i = 0; i < n; i++) {
    uint64_t t0 = mos::bench::nowNs();
    transferAll(fd, buf, false);
    if (!transferAll(fd, buf, true)) {
      std::fprintf(stderr, "tcp_pingpong: server closed the connection\n");
      return 1;
    }
    samples[size_t(i)] = mos::bench::nowNs() - t0;
  }
  close(fd);
  mos::bench::report("tcp64", samples);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "server") {
    return serve(parseAddress(argv[2], argv[3]));
  }
  if (argc == 5 && std::string(argv[1]) == "client") {
    long n = std::strtol(argv[4], nullptr, 10);
    if (n > 0) {
      return client(parseAddress(argv[2], argv[3]), n);
    }
  }
  std::fprintf(stderr, "usage: tcp_pingpong server ADDR PORT | client ADDR PORT N\n");
  return 2;
}
