// libmigrate capture + restore of a guest on this machine: a program captured (captureImage) at
// its exec stop and restored from the migration stream into a fresh stub (restoreGuest) must
// behave exactly as if it had run natively.
#include <fcntl.h>
#include <poll.h>
#include <seccomp.h>
#include <linux/seccomp.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <capnp/message.h>
#include <catch2/catch.hpp>
#include <kj/exception.h>

#include "checkpoint.h"
#include "migrate.h"

namespace {

using mos::migrate::RestoreOptions;

// A migration stream in memory.
struct Image {
  kj::VectorOutputStream bytes;
  // A reader of the stream from its start; `in` must outlive it.
  std::unique_ptr<mos::migrate::ImageReader> read(std::unique_ptr<kj::ArrayInputStream>& in) {
    in = std::make_unique<kj::ArrayInputStream>(bytes.getArray());
    return std::make_unique<mos::migrate::ImageReader>(*in);
  }
};

// Captures the stopped tracee `pid` into a new Image; returns the error text, empty on success.
std::string captureStopped(pid_t pid, Image& image) {
  try {
    KJ_SYSCALL(ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD));
    mos::migrate::captureImage(pid, image.bytes);
  } catch (kj::Exception& e) {
    return e.getDescription().cStr();
  }
  return "";
}

// Runs argv under PTRACE_TRACEME, captures it at its exec stop, kills it.
std::unique_ptr<Image> captureAtExec(std::vector<std::string> args) {
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    std::vector<char*> argv;
    for (auto& a : args) {
      argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    ptrace(PTRACE_TRACEME, 0, 0, 0);
    execv(argv[0], argv.data());
    _exit(127);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSTOPPED(status));
  REQUIRE(WSTOPSIG(status) == SIGTRAP);
  auto image = std::make_unique<Image>();
  std::string error = captureStopped(pid, *image);
  kill(pid, SIGKILL);
  REQUIRE(waitpid(pid, &status, 0) == pid);
  INFO(error);
  REQUIRE(error.empty());
  return image;
}

std::string localPath(mos::proto::FileRef::Reader ref) {
  return std::string(reinterpret_cast<const char*>(ref.getPath().begin()), ref.getPath().size());
}

struct Outcome {
  std::string output;
  int status = -1;
  pid_t pid = -1;
};

// Restores `image` with stdout on a pipe; `whileRunning` runs between restore and reading.
Outcome runRestored(Image& image, RestoreOptions options,
                    std::function<void(mos::migrate::RestoredGuest&)> whileRunning = {}) {
  int out[2];
  REQUIRE(pipe2(out, O_CLOEXEC) == 0);
  options.fdMap.push_back({out[1], 1});
  options.fdMap.push_back({2, 2});
  Outcome outcome;
  std::string error;
  mos::migrate::RestoredGuest guest;
  try {
    std::unique_ptr<kj::ArrayInputStream> in;
    auto reader = image.read(in);
    guest = mos::migrate::restoreGuest(*reader, localPath, options);
  } catch (kj::Exception& e) {
    error = e.getDescription().cStr();
  }
  close(out[1]);
  if (!error.empty()) {
    close(out[0]);
    FAIL(error);
  }
  outcome.pid = guest.pid;
  if (whileRunning) {
    whileRunning(guest);
  }
  char buf[4096];
  ssize_t n;
  while ((n = read(out[0], buf, sizeof(buf))) > 0) {
    outcome.output.append(buf, n);
  }
  close(out[0]);
  REQUIRE(waitpid(guest.pid, &outcome.status, 0) == guest.pid);
  return outcome;
}

// Notifies on getppid and on close (the real filter forwards close too, so restore's own
// injected close of the listener is trapped and must be answered by restore itself).
std::vector<sock_filter> notifyOnGetppidAndClose() {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  REQUIRE(ctx != nullptr);
  REQUIRE(seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(getppid), 0) == 0);
  REQUIRE(seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(close), 0) == 0);
  int fd = memfd_create("bpf", MFD_CLOEXEC);
  REQUIRE(seccomp_export_bpf(ctx, fd) == 0);
  seccomp_release(ctx);
  off_t size = lseek(fd, 0, SEEK_CUR);
  std::vector<sock_filter> prog(size / sizeof(sock_filter));
  REQUIRE(pread(fd, prog.data(), size, 0) == size);
  close(fd);
  return prog;
}

}  // namespace

TEST_CASE("restored echo prints its arguments and exits 0", "[migrate][restore]") {
  auto image = captureAtExec({"/bin/echo", "hello", "world"});
  {
    std::unique_ptr<kj::ArrayInputStream> in;
    auto reader = image->read(in);
    auto header = reader->header();
    REQUIRE(header.getThreads().size() == 1);
    REQUIRE(std::string(header.getCommand().cStr()) == "echo");
  }
  RestoreOptions options;
  options.dropPrivileges = false;
  Outcome o = runRestored(*image, options);
  CHECK(o.output == "hello world\n");
  REQUIRE(WIFEXITED(o.status));
  CHECK(WEXITSTATUS(o.status) == 0);
}

TEST_CASE("restored python prints json and exits 3", "[migrate][restore]") {
  auto image = captureAtExec(
      {"/usr/bin/python3", "-c", "import json,sys; print(json.dumps({\"a\":[1,2]})); sys.exit(3)"});
  RestoreOptions options;
  options.dropPrivileges = false;
  Outcome o = runRestored(*image, options);
  CHECK(o.output == "{\"a\": [1, 2]}\n");
  REQUIRE(WIFEXITED(o.status));
  CHECK(WEXITSTATUS(o.status) == 3);
}

TEST_CASE("restored process has its vDSO at the image's address", "[migrate][restore]") {
  auto image = captureAtExec({"/bin/cat", "/proc/self/maps"});
  uint64_t start = 0, end = 0;
  {
    std::unique_ptr<kj::ArrayInputStream> in;
    auto reader = image->read(in);
    for (auto m : reader->header().getMappings()) {
      if (m.getKind() == mos::proto::Mapping::Kind::VDSO) {
        start = m.getStart();
        end = m.getEnd();
      }
    }
  }
  REQUIRE(start != 0);
  RestoreOptions options;
  options.dropPrivileges = false;
  Outcome o = runRestored(*image, options);
  REQUIRE(WIFEXITED(o.status));
  CHECK(WEXITSTATUS(o.status) == 0);
  std::string vdsoLine;
  std::istringstream lines(o.output);
  for (std::string line; std::getline(lines, line);) {
    if (line.find("[vdso]") != std::string::npos) {
      vdsoLine = line;
    }
  }
  char expected[64];
  snprintf(expected, sizeof(expected), "%lx-%lx ", static_cast<unsigned long>(start),
           static_cast<unsigned long>(end));
  INFO(o.output);
  CHECK(vdsoLine.rfind(expected, 0) == 0);
  // Nothing of the stub is left in the restored address space.
  CHECK(o.output.find("3f0000000000") == std::string::npos);
  CHECK(o.output.find("mos-stub") == std::string::npos);
}

TEST_CASE("restored program sees its own pid from getpid", "[migrate][restore]") {
  auto image = captureAtExec({MIGRATE_TEST_GETPPID});
  RestoreOptions options;
  options.dropPrivileges = false;
  Outcome o = runRestored(*image, options);
  REQUIRE(WIFEXITED(o.status));
  CHECK(WEXITSTATUS(o.status) == 0);
  int ppid = 0, pid = 0, uid = -1;
  REQUIRE(sscanf(o.output.c_str(), "%d %d %d", &ppid, &pid, &uid) == 3);
  CHECK(pid == o.pid);
  CHECK(ppid == getpid());
  CHECK(uid == 0);
}

TEST_CASE("seccomp listener of a restored guest answers its getppid", "[migrate][restore]") {
  auto filter = notifyOnGetppidAndClose();
  auto image = captureAtExec({MIGRATE_TEST_GETPPID});
  RestoreOptions options;
  options.dropPrivileges = true;  // uid/gid 65534
  options.seccompFilter = filter;
  int getppids = 0, closes = 0, others = 0;
  Outcome o = runRestored(*image, options, [&](mos::migrate::RestoredGuest& guest) {
    REQUIRE(guest.listener.get() >= 0);
    // Serve until the guest is gone (POLLHUP: no task uses the filter any more).
    for (;;) {
      pollfd p{guest.listener.get(), POLLIN, 0};
      REQUIRE(poll(&p, 1, 10000) == 1);
      if (!(p.revents & POLLIN)) {
        break;
      }
      seccomp_notif req{};
      if (ioctl(guest.listener.get(), SECCOMP_IOCTL_NOTIF_RECV, &req) != 0) {
        continue;  // the task died meanwhile
      }
      CHECK(static_cast<pid_t>(req.pid) == guest.pid);
      seccomp_notif_resp resp{};
      resp.id = req.id;
      if (req.data.nr == __NR_getppid) {
        resp.val = 4242;
        ++getppids;
      } else if (req.data.nr == __NR_close) {
        resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
        ++closes;
      } else {
        ++others;
        resp.error = -ENOSYS;
      }
      ioctl(guest.listener.get(), SECCOMP_IOCTL_NOTIF_SEND, &resp);
    }
  });
  CHECK(getppids == 1);
  CHECK(closes >= 1);  // ld.so closes the libraries it mapped
  CHECK(others == 0);
  REQUIRE(WIFEXITED(o.status));
  CHECK(WEXITSTATUS(o.status) == 0);
  int ppid = 0, pid = 0, uid = -1;
  REQUIRE(sscanf(o.output.c_str(), "%d %d %d", &ppid, &pid, &uid) == 3);
  CHECK(ppid == 4242);
  CHECK(pid == o.pid);
  CHECK(uid == 65534);
}

TEST_CASE("restore refuses an image whose files cannot be resolved", "[migrate][restore]") {
  auto image = captureAtExec({"/bin/echo", "x"});
  RestoreOptions options;
  options.dropPrivileges = false;
  bool threw = false;
  try {
    std::unique_ptr<kj::ArrayInputStream> in;
    auto reader = image->read(in);
    mos::migrate::restoreGuest(
        *reader,
        [](mos::proto::FileRef::Reader) -> std::string {
          throw std::runtime_error("no such file in the cache");
        },
        options);
  } catch (std::exception&) {
    threw = true;
  }
  CHECK(threw);
  int status;
  CHECK(waitpid(-1, &status, WNOHANG) == -1);  // no stub left behind
}

TEST_CASE("a process captured mid-run continues with its heap and TLS", "[migrate][restore]") {
  // python3 builds a large list (heap, brk), stops itself; captured at that stop, the restored
  // copy resumes after os.kill and prints the sum computed from the captured heap.
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ptrace(PTRACE_TRACEME, 0, 0, 0);
    execl("/usr/bin/python3", "python3", "-c",
          "import os, signal\n"
          "x = [i * 3 for i in range(200000)]\n"
          "b = bytearray(8 << 20); b[-1] = 7\n"
          "os.kill(os.getpid(), signal.SIGSTOP)\n"
          "print(sum(x), b[-1], os.getpid() != 0)\n",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);  // exec SIGTRAP
  REQUIRE(ptrace(PTRACE_CONT, pid, 0, 0) == 0);
  REQUIRE(waitpid(pid, &status, 0) == pid);  // SIGSTOP delivery stop
  REQUIRE(WIFSTOPPED(status));
  REQUIRE(WSTOPSIG(status) == SIGSTOP);
  Image image;
  std::string error = captureStopped(pid, image);
  kill(pid, SIGKILL);
  REQUIRE(waitpid(pid, &status, 0) == pid);
  INFO(error);
  REQUIRE(error.empty());
  {
    std::unique_ptr<kj::ArrayInputStream> in;
    auto reader = image.read(in);
    auto header = reader->header();
    bool heap = false;
    for (auto m : header.getMappings()) {
      heap = heap || m.getKind() == mos::proto::Mapping::Kind::HEAP;
    }
    CHECK(heap);
    // glibc registered rseq; restore re-registers it
    CHECK(header.getThreads()[0].getRseqAddr() != 0);
  }
  RestoreOptions options;
  options.dropPrivileges = false;
  Outcome o = runRestored(image, options);
  CHECK(o.output == "59999700000 7 True\n");
  REQUIRE(WIFEXITED(o.status));
  CHECK(WEXITSTATUS(o.status) == 0);
}

// A job process whose threads cannot be given their ids back at home (no CAP_SYS_ADMIN, no
// CAP_CHECKPOINT_RESTORE: an ordinary user) is refused a move with a reason; root is not.
TEST_CASE("threadIdsRefusal names the missing capability") {
  if (geteuid() != 0) {
    WARN("skipped: needs root");
    return;
  }
  CHECK(mos::migrate::threadIdsRefusal(getpid(), 3).empty());
  int ready[2];
  REQUIRE(pipe(ready) == 0);
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    close(ready[0]);
    if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) {
      _exit(1);
    }
    (void)!write(ready[1], "r", 1);
    pause();
    _exit(0);
  }
  close(ready[1]);
  char c;
  REQUIRE(read(ready[0], &c, 1) == 1);
  close(ready[0]);
  std::string why = mos::migrate::threadIdsRefusal(child, 3);
  kill(child, SIGKILL);
  int status;
  waitpid(child, &status, 0);
  CHECK(why.find("3 threads") != std::string::npos);
  CHECK(why.find("CAP_CHECKPOINT_RESTORE") != std::string::npos);
}
