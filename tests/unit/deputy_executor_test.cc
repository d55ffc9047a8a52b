// The deputy's executor, in this process: hand-built SyscallRequests through Deputy::handle over
// a socketpair, with real outcomes (bytes, stat fields, fd table state).

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/close_range.h>
#include <poll.h>
#include <signal.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <capnp/message.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

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
  int64_t dirfd = h.ret({__NR_openat,
                         {uint64_t(AT_FDCWD), 0, O_RDONLY | O_DIRECTORY | O_CLOEXEC},
                         {{1, withNul(dir)}},
                         {}});
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
  int64_t fd =
      h.ret({__NR_openat, {uint64_t(AT_FDCWD), 0, O_RDONLY | O_CLOEXEC}, {{1, withNul(path)}}, {}});
  REQUIRE(fd >= 0);
  auto m = h.run({__NR_read, {uint64_t(fd), 0, 4096}, {}, {{1, 4096}}});
  auto r = replyOf(m);
  CHECK(r.getRet() == 16);
  REQUIRE(r.getOut().size() == 1);
  // OUT_BUF is trimmed to ret bytes.
  CHECK(std::string(reinterpret_cast<const char*>(r.getOut()[0].begin()), r.getOut()[0].size()) ==
        "hello from home\n");
  CHECK(!r.getInterrupted());
  close(static_cast<int>(fd));
  unlink(path.c_str());
}

TEST_CASE("deputy openat of a missing path reports ENOENT", "[deputy][file]") {
  Harness h;
  CHECK(h.ret({__NR_openat,
               {uint64_t(AT_FDCWD), 0, O_RDONLY},
               {{1, withNul("/nonexistent/deputy-test")}},
               {}}) == -ENOENT);
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
  auto m = h.run({__NR_newfstatat,
                  {uint64_t(AT_FDCWD), 0, 0, 0},
                  {{1, withNul(path)}},
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
  CHECK(h.ret({__NR_openat,
               {uint64_t(AT_FDCWD), 0, O_RDONLY},
               {{1, withNul("/proc/self/fd/" + n)}},
               {}}) == -ENOENT);
  CHECK(
      h.ret({__NR_openat, {uint64_t(AT_FDCWD), 0, O_RDONLY}, {{1, withNul("/dev/fd/" + n)}}, {}}) ==
      -ENOENT);
  CHECK(h.ret({__NR_readlink,
               {0, 0, 256},
               {{0, withNul("/proc/" + std::to_string(getpid()) + "/fd/" + n)}},
               {{1, 256}}}) == -ENOENT);
  // Another descriptor's link still resolves.
  auto m = h.run({__NR_readlink, {0, 0, 256}, {{0, withNul("/proc/self/fd/0")}}, {{1, 256}}});
  CHECK(replyOf(m).getRet() > 0);
}

TEST_CASE("deputy readlink of /proc/self/exe names the job's program", "[deputy][proc]") {
  Harness h;
  for (std::string path :
       {std::string("/proc/self/exe"), "/proc/" + std::to_string(getpid()) + "/exe",
        std::string("/proc/thread-self/exe")}) {
    auto m = h.run({__NR_readlink, {0, 0, 256}, {{0, withNul(path)}}, {{1, 256}}});
    auto r = replyOf(m);
    REQUIRE(r.getRet() == static_cast<int64_t>(strlen(JOB_EXE)));
    CHECK(std::string(reinterpret_cast<const char*>(r.getOut()[0].begin()), r.getOut()[0].size()) ==
          JOB_EXE);
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

// ---- Admission: the deputy executes only what the syscall table routes home, with the argument
// kinds the table declares. Each forged request below would have a visible effect on this
// process if it reached the kernel; the tests check the answer and that the effect is absent.

namespace {

std::string readLinkOf(const std::string& path) {
  char buffer[PATH_MAX];
  ssize_t n = readlink(path.c_str(), buffer, sizeof(buffer));
  return n < 0 ? std::string() : std::string(buffer, n);
}

// The deputy's warnings while it lives: a ring-buffer logger in place of the default one.
struct CapturedLog {
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink =
      std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(256);
  std::shared_ptr<spdlog::logger> previous = spdlog::default_logger();

  CapturedLog() { spdlog::set_default_logger(std::make_shared<spdlog::logger>("test", sink)); }
  ~CapturedLog() { spdlog::set_default_logger(previous); }

  size_t count(const std::string& needle) {
    size_t n = 0;
    for (auto& line : sink->last_formatted()) {
      n += line.find(needle) != std::string::npos;
    }
    return n;
  }
};

std::string uniqueTempPath() {
  char path[] = "/tmp/deputy-forged-XXXXXX";
  int fd = mkstemp(path);
  REQUIRE(fd >= 0);
  close(fd);
  unlink(path);
  return path;
}

}  // namespace

TEST_CASE("deputy refuses DENY rows with their errno and they do not reach the kernel",
          "[deputy][table]") {
  Harness h;
  // unshare(2) (DENY, EPERM): a new user namespace would change /proc/self/ns/user.
  std::string userNs = readLinkOf("/proc/self/ns/user");
  REQUIRE(!userNs.empty());
  CHECK(h.ret({__NR_unshare, {CLONE_NEWUSER}, {}, {}}) == -EPERM);
  CHECK(readLinkOf("/proc/self/ns/user") == userNs);
  // fork(2) (DENY, ENOSYS): a child would appear.
  CHECK(h.ret({__NR_fork, {}, {}, {}}) == -ENOSYS);
  errno = 0;
  CHECK(waitpid(-1, nullptr, WNOHANG) == -1);
  CHECK(errno == ECHILD);
  // sendmmsg (DENY now, not forwarded yet): ENOSYS without a call.
  CHECK(h.ret({__NR_sendmmsg, {0, 0, 0, 0}, {}, {}}) == -ENOSYS);
}

TEST_CASE("deputy refuses numbers without a row with ENOSYS", "[deputy][table]") {
  Harness h;
  // personality(2) has no row: executing it would change this process's persona.
  int before = personality(0xffffffff);
  CHECK(h.ret({__NR_personality, {uint64_t(before | ADDR_NO_RANDOMIZE)}, {}, {}}) == -ENOSYS);
  CHECK(personality(0xffffffff) == before);
  CHECK(h.ret({9999, {}, {}, {}}) == -ENOSYS);
  CHECK(h.ret({-1, {}, {}, {}}) == -ENOSYS);
}

TEST_CASE("deputy refuses LOCAL rows, which would change the deputy itself", "[deputy][table]") {
  Harness h;
  CHECK(h.ret({__NR_munmap, {0x10000, 4096}, {}, {}}) == -ENOSYS);
  CHECK(h.ret({__NR_exit_group, {3}, {}, {}}) == -ENOSYS);
  CHECK(h.ret({__NR_rt_sigaction, {SIGINT, 0, 0, 8}, {}, {}}) == -ENOSYS);
  // prctl(2) is LOCAL: PR_SET_CHILD_SUBREAPER would be visible through PR_GET_CHILD_SUBREAPER.
  int subreaper = -1;
  REQUIRE(prctl(PR_GET_CHILD_SUBREAPER, &subreaper) == 0);
  CHECK(h.ret({__NR_prctl, {PR_SET_CHILD_SUBREAPER, uint64_t(!subreaper)}, {}, {}}) == -ENOSYS);
  int after = -1;
  REQUIRE(prctl(PR_GET_CHILD_SUBREAPER, &after) == 0);
  CHECK(after == subreaper);
  // readv goes home as read (IOV), execve as an ExecRequest: neither runs as itself.
  CHECK(h.ret({__NR_readv, {0, 0, 0}, {}, {}}) == -ENOSYS);
  CHECK(h.ret({__NR_execve, {0, 0, 0}, {}, {}}) == -ENOSYS);
}

TEST_CASE("deputy refuses a buffer behind an argument the row declares a value",
          "[deputy][table]") {
  Harness h;
  std::string dir = uniqueTempPath();
  // mkdir(2) is {PATH, VAL}: a buffer for the mode is a pointer the row does not declare.
  CHECK(h.ret({__NR_mkdir, {0, 0}, {{0, withNul(dir)}, {1, std::string(8, 'x')}}, {}}) == -ENOSYS);
  struct stat st;
  CHECK(stat(dir.c_str(), &st) == -1);
  // openat(2) with O_CREAT, its path sent behind the flags argument: nothing is created.
  std::string file = uniqueTempPath();
  CHECK(h.ret({__NR_openat, {uint64_t(AT_FDCWD), 0, 0, 0600}, {{2, withNul(file)}}, {}}) ==
        -ENOSYS);
  CHECK(stat(file.c_str(), &st) == -1);
  // An out-buffer behind an in-only argument (mkdir's path): refused, nothing created.
  CHECK(h.ret({__NR_mkdir, {0, 0700}, {{0, withNul(dir)}}, {{0, 64}}}) == -ENOSYS);
  CHECK(stat(dir.c_str(), &st) == -1);
  // The same call as the table declares it runs.
  CHECK(h.ret({__NR_mkdir, {0, 0700}, {{0, withNul(dir)}}, {}}) == 0);
  CHECK(stat(dir.c_str(), &st) == 0);
  rmdir(dir.c_str());
}

TEST_CASE("deputy refuses buffers smaller than what the call touches", "[deputy][table]") {
  Harness h;
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  REQUIRE(write(p[1], "0123456789abcdef", 16) == 16);
  // read(2) of 4096 bytes into a 4-byte out-buffer would write past it: refused, and the pipe
  // still holds its 16 bytes.
  CHECK(h.ret({__NR_read, {uint64_t(p[0]), 0, 4096}, {}, {{1, 4}}}) == -ENOSYS);
  int queued = -1;
  REQUIRE(ioctl(p[0], FIONREAD, &queued) == 0);
  CHECK(queued == 16);
  // fstat(2) into 8 bytes instead of a struct stat.
  CHECK(h.ret({__NR_fstat, {uint64_t(p[0]), 0}, {}, {{1, 8}}}) == -ENOSYS);
  // As declared, both run.
  CHECK(h.ret({__NR_fstat, {uint64_t(p[0]), 0}, {}, {{1, sizeof(struct stat)}}}) == 0);
  CHECK(h.ret({__NR_read, {uint64_t(p[0]), 0, 16}, {}, {{1, 16}}}) == 16);
  close(p[0]);
  close(p[1]);
}

TEST_CASE("deputy refuses auxiliary buffers and pointer fixups outside a msghdr call",
          "[deputy][table]") {
  Harness h;
  std::string dir = uniqueTempPath();
  // A fixup that would make mkdir's path point at an auxiliary buffer.
  CHECK(h.ret({__NR_mkdir,
               {0, 0700},
               {{6, withNul(dir)}, {0, std::string(8, '\0')}},
               {},
               {{0, 0, 6}}}) == -ENOSYS);
  struct stat st;
  CHECK(stat(dir.c_str(), &st) == -1);
}

TEST_CASE("deputy refuses a msghdr that points outside the request's buffers", "[deputy][table]") {
  Harness h;
  int sv[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv) == 0);
  // The iovec array is a raw address (ours, standing in for a guest's): no fixup names it.
  static char secret[] = "not for the wire";
  struct iovec raw = {secret, sizeof(secret)};
  struct msghdr msg = {};
  msg.msg_iov = &raw;
  msg.msg_iovlen = 1;
  std::string header(reinterpret_cast<const char*>(&msg), sizeof(msg));
  CHECK(h.ret({__NR_sendmsg, {uint64_t(sv[0]), 0, MSG_DONTWAIT}, {{1, header}}, {}}) == -ENOSYS);
  char buffer[64];
  CHECK(recv(sv[1], buffer, sizeof(buffer), MSG_DONTWAIT) == -1);
  CHECK(errno == EAGAIN);
  close(sv[0]);
  close(sv[1]);
}

TEST_CASE("deputy runs memfd_create, the placeholder of a node-local memfd and /proc snapshot",
          "[deputy][table]") {
  Harness h;
  int64_t fd = h.ret({__NR_memfd_create, {0, MFD_CLOEXEC}, {{0, withNul("maps")}}, {}});
  REQUIRE(fd >= 0);
  CHECK(readLinkOf("/proc/self/fd/" + std::to_string(fd)) == "/memfd:maps (deleted)");
  close(static_cast<int>(fd));
}

TEST_CASE("deputy looks up PATH arguments, not STRING ones, as the job's /proc paths",
          "[deputy][table]") {
  Harness h;
  std::string reserved = "/proc/self/fd/" + std::to_string(h.reservedFd());
  // The target of symlink(2) is a STRING: a link whose content names a deputy descriptor is
  // just bytes, and is created.
  std::string link = uniqueTempPath();
  CHECK(h.ret({__NR_symlink, {0, 0}, {{0, withNul(reserved)}, {1, withNul(link)}}, {}}) == 0);
  CHECK(readLinkOf(link) == reserved);
  unlink(link.c_str());
  // As a PATH, the same name is a descriptor the job does not have.
  CHECK(h.ret({__NR_readlink, {0, 0, 256}, {{0, withNul(reserved)}}, {{1, 256}}}) == -ENOENT);
}

TEST_CASE("deputy logs each refused syscall once and goes on", "[deputy][table]") {
  CapturedLog log;
  Harness h;
  for (int i = 0; i < 3; i++) {
    CHECK(h.ret({__NR_fork, {}, {}, {}}) == -ENOSYS);
    CHECK(h.ret({9999, {}, {}, {}}) == -ENOSYS);
  }
  CHECK(log.count("refusing forwarded syscall 57 (fork)") == 1);
  CHECK(log.count("refusing forwarded syscall 9999 (no row)") == 1);
  CHECK(h.ret({__NR_getppid, {}, {}, {}}) == getppid());
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
