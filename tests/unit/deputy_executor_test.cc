// The deputy's executor, in this process: hand-built SyscallRequests through Deputy::handle over
// a socketpair, with real outcomes (bytes, stat fields, fd table state).

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/close_range.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <capnp/message.h>

#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "deputy.h"
#include "deputy_harness.h"

using namespace mos;
using namespace mos::deputy;
using namespace mos::deputy::testing;

namespace {


using Call = Request;

std::string withNul(const std::string& s) { return s + std::string(1, '\0'); }


std::string tempFileWith(const std::string& content) {
  char path[] = "/tmp/deputy-test-XXXXXX";
  int fd = mkstemp(path);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
  close(fd);
  return path;
}

std::set<std::string> listFdDirectory(Harness& h, const std::string& dir) {
  int64_t dirfd = h.ret({__NR_openat, {uint64_t(AT_FDCWD), 0, O_RDONLY | O_DIRECTORY | O_CLOEXEC},
                         {{1, withNul(dir)}}, {}});
  REQUIRE(dirfd >= 0);
  std::set<std::string> names;
  for (;;) {
    auto m = h.run({__NR_getdents64, {uint64_t(dirfd), 0, 512}, {}, {{1, 512}}});
    auto r = replyOf(m);
    REQUIRE(r.getRet() >= 0);
    if (r.getRet() == 0) {
      break;
    }
    auto bytes = r.getOut()[0];
    REQUIRE(bytes.size() == static_cast<size_t>(r.getRet()));
    for (size_t at = 0; at < bytes.size();) {
      auto* d = reinterpret_cast<const struct dirent64*>(bytes.begin() + at);
      names.insert(d->d_name);
      at += d->d_reclen;
    }
  }
  close(static_cast<int>(dirfd));
  return names;
}

}  // namespace

TEST_CASE("deputy openat and read of a temp file return its bytes", "[deputy][file]") {
  Harness h;
  std::string path = tempFileWith("hello from home\n");
  int64_t fd = h.ret({__NR_openat, {uint64_t(AT_FDCWD), 0, O_RDONLY | O_CLOEXEC},
                      {{1, withNul(path)}}, {}});
  REQUIRE(fd >= 0);
  auto m = h.run({__NR_read, {uint64_t(fd), 0, 4096}, {}, {{1, 4096}}});
  auto r = replyOf(m);
  CHECK(r.getRet() == 16);
  REQUIRE(r.getOut().size() == 1);
  // OUT_BUF is trimmed to ret bytes.
  CHECK(std::string(reinterpret_cast<const char*>(r.getOut()[0].begin()),
                    r.getOut()[0].size()) == "hello from home\n");
  CHECK(!r.getInterrupted());
  close(static_cast<int>(fd));
  unlink(path.c_str());
}

TEST_CASE("deputy openat of a missing path reports ENOENT", "[deputy][file]") {
  Harness h;
  CHECK(h.ret({__NR_openat, {uint64_t(AT_FDCWD), 0, O_RDONLY},
               {{1, withNul("/nonexistent/deputy-test")}}, {}}) == -ENOENT);
}

TEST_CASE("deputy write to a pipe delivers the bytes", "[deputy][file]") {
  Harness h;
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  CHECK(h.ret({__NR_write, {uint64_t(p[1]), 0, 5}, {{1, "abcde"}}, {}}) == 5);
  char buffer[16] = {};
  REQUIRE(read(p[0], buffer, sizeof(buffer)) == 5);
  CHECK(std::string(buffer) == "abcde");
  close(p[0]);
  close(p[1]);
}

TEST_CASE("deputy newfstatat fills a stat buffer with the file's size", "[deputy][file]") {
  Harness h;
  std::string path = tempFileWith(std::string(12345, 'x'));
  auto m = h.run({__NR_newfstatat, {uint64_t(AT_FDCWD), 0, 0, 0}, {{1, withNul(path)}},
                  {{2, sizeof(struct stat)}}});
  auto r = replyOf(m);
  REQUIRE(r.getRet() == 0);
  REQUIRE(r.getOut()[0].size() == sizeof(struct stat));
  struct stat st;
  memcpy(&st, r.getOut()[0].begin(), sizeof(st));
  CHECK(st.st_size == 12345);
  CHECK(S_ISREG(st.st_mode));
  unlink(path.c_str());
}

TEST_CASE("deputy calls naming a reserved descriptor fail with EBADF", "[deputy][fds]") {
  Harness h;
  int reserved = h.reservedFd();
  CHECK(h.ret({__NR_read, {uint64_t(reserved), 0, 16}, {}, {{1, 16}}}) == -EBADF);
  CHECK(h.ret({__NR_close, {uint64_t(reserved)}, {}, {}}) == -EBADF);
  CHECK(h.ret({__NR_fcntl, {uint64_t(reserved), F_SETFL, O_NONBLOCK}, {}, {}}) == -EBADF);
  CHECK(h.ret({__NR_dup, {uint64_t(reserved)}, {}, {}}) == -EBADF);
  // The channel is untouched: blocking, open, and still answering.
  CHECK(fcntl(reserved, F_GETFL) >= 0);
  CHECK((fcntl(reserved, F_GETFL) & O_NONBLOCK) == 0);
  CHECK(h.ret({__NR_getppid, {}, {}, {}}) == getppid());
}

TEST_CASE("deputy dup2 onto a reserved descriptor succeeds and the channel still works",
          "[deputy][fds]") {
  Harness h;
  int reserved = h.reservedFd();
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  CHECK(h.ret({__NR_dup2, {uint64_t(p[0]), uint64_t(reserved)}, {}, {}}) == reserved);
  // The job's number now names the pipe.
  REQUIRE(write(p[1], "xyz", 3) == 3);
  char buffer[4] = {};
  CHECK(read(reserved, buffer, 3) == 3);
  CHECK(std::string(buffer) == "xyz");
  // The deputy's socket moved elsewhere, still reserved, and still carries the job channel.
  int moved = h.reservedFd();
  CHECK(moved != reserved);
  CHECK(h.fds.contains(moved));
  CHECK(!h.fds.contains(reserved));
  CHECK(h.ret({__NR_getppid, {}, {}, {}}) == getppid());
  // dup3 too.
  CHECK(h.ret({__NR_dup3, {uint64_t(p[1]), uint64_t(moved), O_CLOEXEC}, {}, {}}) == moved);
  CHECK(h.reservedFd() != moved);
  CHECK(h.ret({__NR_getppid, {}, {}, {}}) == getppid());
  close(reserved);
  close(moved);
  close(p[0]);
  close(p[1]);
}

TEST_CASE("deputy getdents64 of /proc/self/fd hides reserved descriptors", "[deputy][fds][proc]") {
  Harness h;
  int reserved = h.reservedFd();
  int peerFd = h.peer->fd();
  for (const char* dir : {"/proc/self/fd", "/dev/fd", "/proc/self/fdinfo"}) {
    auto names = listFdDirectory(h, dir);
    CHECK(names.count(std::to_string(reserved)) == 0);
    CHECK(names.count(std::to_string(peerFd)) == 1);  // the job's own are all there
    CHECK(names.count(".") == 1);
  }
  // Natively the reserved descriptor is listed: the filter did the work.
  bool nativeHasIt = false;
  DIR* d = opendir("/proc/self/fd");
  while (auto* e = readdir(d)) {
    nativeHasIt |= std::string(e->d_name) == std::to_string(reserved);
  }
  closedir(d);
  CHECK(nativeHasIt);
}

TEST_CASE("deputy paths to reserved descriptors do not exist", "[deputy][fds][proc]") {
  Harness h;
  std::string n = std::to_string(h.reservedFd());
  CHECK(h.ret({__NR_openat, {uint64_t(AT_FDCWD), 0, O_RDONLY},
               {{1, withNul("/proc/self/fd/" + n)}}, {}}) == -ENOENT);
  CHECK(h.ret({__NR_openat, {uint64_t(AT_FDCWD), 0, O_RDONLY}, {{1, withNul("/dev/fd/" + n)}},
               {}}) == -ENOENT);
  CHECK(h.ret({__NR_readlink, {0, 0, 256}, {{0, withNul("/proc/" + std::to_string(getpid()) +
                                                         "/fd/" + n)}},
               {{1, 256}}}) == -ENOENT);
  // Another descriptor's link still resolves.
  auto m = h.run({__NR_readlink, {0, 0, 256}, {{0, withNul("/proc/self/fd/0")}}, {{1, 256}}});
  CHECK(replyOf(m).getRet() > 0);
}

TEST_CASE("deputy readlink of /proc/self/exe names the job's program", "[deputy][proc]") {
  Harness h;
  for (std::string path : {std::string("/proc/self/exe"), "/proc/" + std::to_string(getpid()) +
                                                             "/exe", std::string("/proc/thread-self/exe")}) {
    auto m = h.run({__NR_readlink, {0, 0, 256}, {{0, withNul(path)}}, {{1, 256}}});
    auto r = replyOf(m);
    REQUIRE(r.getRet() == static_cast<int64_t>(strlen(JOB_EXE)));
    CHECK(std::string(reinterpret_cast<const char*>(r.getOut()[0].begin()),
                      r.getOut()[0].size()) == JOB_EXE);
  }
  // readlinkat relative to a directory descriptor of /proc/self, with a short buffer.
  int dirfd = open("/proc/self", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  auto m = h.run({__NR_readlinkat, {uint64_t(dirfd), 0, 0, 5}, {{1, withNul("exe")}}, {{2, 5}}});
  auto r = replyOf(m);
  CHECK(r.getRet() == 5);
  CHECK(std::string(reinterpret_cast<const char*>(r.getOut()[0].begin()), 5) == "/usr/");
  close(dirfd);
}

TEST_CASE("deputy close_range skips reserved descriptors", "[deputy][fds]") {
  Harness h;
  int reserved = h.reservedFd();
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  // Job descriptors right below and the reserved one in the middle of the range.
  REQUIRE(dup2(p[0], reserved - 2) == reserved - 2);
  REQUIRE(dup2(p[0], reserved - 1) == reserved - 1);
  CHECK(h.ret({__NR_close_range, {uint64_t(reserved - 2), uint64_t(reserved + 5), 0}, {}, {}}) ==
        0);
  CHECK(fcntl(reserved - 2, F_GETFD) == -1);
  CHECK(fcntl(reserved - 1, F_GETFD) == -1);
  CHECK(fcntl(reserved, F_GETFD) >= 0);
  CHECK(h.ret({__NR_getppid, {}, {}, {}}) == getppid());
  close(p[0]);
  close(p[1]);
}

TEST_CASE("deputy poll of a reserved descriptor reports POLLNVAL", "[deputy][fds]") {
  Harness h;
  struct pollfd entries[1] = {{h.reservedFd(), POLLIN, 0}};
  std::string data(reinterpret_cast<const char*>(entries), sizeof(entries));
  auto m = h.run({__NR_poll, {0, 1, uint64_t(-1)}, {{0, data}}, {{0, sizeof(entries)}}});
  auto r = replyOf(m);
  CHECK(r.getRet() == 1);
  struct pollfd back;
  memcpy(&back, r.getOut()[0].begin(), sizeof(back));
  CHECK(back.fd == h.reservedFd());
  CHECK(back.revents == POLLNVAL);
}

TEST_CASE("deputy refuses calls that would change the deputy itself", "[deputy]") {
  Harness h;
  CHECK(h.ret({__NR_munmap, {0x10000, 4096}, {}, {}}) == -ENOSYS);
  CHECK(h.ret({__NR_exit_group, {3}, {}, {}}) == -ENOSYS);
  CHECK(h.ret({__NR_rt_sigaction, {SIGINT, 0, 0, 8}, {}, {}}) == -ENOSYS);
}

TEST_CASE("deputy never passes an unmarshalled guest address to its kernel", "[deputy]") {
  Harness h;
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  // write(2)'s buffer is an IN_BUF: without a Buffer the address would be read in our memory.
  uint64_t ours = reinterpret_cast<uint64_t>(&h);
  CHECK(h.ret({__NR_write, {uint64_t(p[1]), ours, 8}, {}, {}}) == -EFAULT);
  close(p[0]);
  close(p[1]);
}
