// The guest filter, installed for real in a forked child with a listener: which calls run in the
// child's kernel and which reach the supervisor (here: the test process) as notifications.

#include "seccomp_filter.h"

#include <asm/unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <vector>

#include "syscall_table.h"

using namespace mos;

namespace {

// Shared between the test and the filtered child; the child makes no syscall to report (every
// report is a store), since any non-local call would be notified.
struct Shared {
  std::atomic<int> listener{-1};
  std::atomic<int> go{0};
  std::atomic<int> step{0};
  long results[16];
  int errnos[16];
};

long rawSyscall(long nr, long a = 0, long b = 0, long c = 0, long d = 0, long e = 0, long f = 0) {
  long ret;
  register long r10 asm("r10") = d;
  register long r8 asm("r8") = e;
  register long r9 asm("r9") = f;
  asm volatile("syscall"
               : "=a"(ret)
               : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
               : "rcx", "r11", "memory");
  return ret;
}

int installFilter(unsigned flags) {
  static std::vector<sock_filter> prog = buildGuestFilter();
  sock_fprog fprog{static_cast<unsigned short>(prog.size()), prog.data()};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
    return -1;
  }
  return rawSyscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, flags, reinterpret_cast<long>(&fprog));
}

// The child's script. Every result is a raw syscall return (-errno on failure).
[[noreturn]] void childScript(Shared* s, int fileFd) {
  int listener = installFilter(SECCOMP_FILTER_FLAG_NEW_LISTENER);
  s->listener.store(listener);
  while (s->go.load() == 0) {
    rawSyscall(__NR_sched_yield);  // LOCAL
  }
  timespec ts;
  s->results[0] = rawSyscall(__NR_clock_getres, CLOCK_MONOTONIC, reinterpret_cast<long>(&ts));
  s->results[1] = rawSyscall(__NR_getppid);  // FORWARD: answered 4242 by the test
  long anon = rawSyscall(__NR_mmap, 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                         -1, 0);
  s->results[2] = anon;
  if (anon > 0) {
    *reinterpret_cast<volatile int*>(anon) = 7;  // really mapped
    s->results[3] = *reinterpret_cast<volatile int*>(anon);
  }
  s->results[4] = rawSyscall(__NR_mmap, 0, 4096, PROT_READ, MAP_PRIVATE, fileFd, 0);  // notified
  s->results[5] = rawSyscall(0x40000000 | __NR_getppid);  // x32: notified
  s->results[6] = rawSyscall(__NR_getpid);                // EMULATE: notified
  s->results[7] = rawSyscall(__NR_fork);                  // DENY: notified too
  s->step.store(1);
  rawSyscall(__NR_exit_group, 0);
  __builtin_unreachable();
}

}  // namespace

TEST_CASE("the guest filter is small and starts with the architecture check",
          "[runtime][seccomp]") {
  std::vector<sock_filter> prog = buildGuestFilter();
  REQUIRE(prog.size() > 6);
  CHECK(prog.size() < 200);
  CHECK(prog[0].code == (BPF_LD | BPF_W | BPF_ABS));
  CHECK(prog[2].k == SECCOMP_RET_KILL_PROCESS);
  CHECK(prog[5].k == SECCOMP_RET_USER_NOTIF);
}

TEST_CASE("local calls run in the guest's kernel and the rest reach the supervisor",
          "[runtime][seccomp]") {
  int fileFd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
  REQUIRE(fileFd >= 0);
  auto* s = static_cast<Shared*>(
      mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  REQUIRE(s != MAP_FAILED);
  new (s) Shared();
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    childScript(s, fileFd);
  }
  close(fileFd);

  // Take the child's listener (60 s: only a broken child takes longer).
  for (int i = 0; i < 60000 && s->listener.load() == -1; ++i) {
    usleep(1000);
  }
  int childListener = s->listener.load();
  REQUIRE(childListener >= 0);
  int pidfd = syscall(SYS_pidfd_open, child, 0);
  REQUIRE(pidfd >= 0);
  int listener = syscall(SYS_pidfd_getfd, pidfd, childListener, 0);
  REQUIRE(listener >= 0);
  close(pidfd);
  s->go.store(1);

  // Answer notifications in order; every one must come within 60 s.
  std::vector<int> seen;
  auto answer = [&](int64_t val, int error) {
    pollfd p{listener, POLLIN, 0};
    if (poll(&p, 1, 60000) != 1 || !(p.revents & POLLIN)) {
      return false;
    }
    seccomp_notif req;
    memset(&req, 0, sizeof req);
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0) {
      return false;
    }
    seen.push_back(req.data.nr);
    seccomp_notif_resp resp;
    memset(&resp, 0, sizeof resp);
    resp.id = req.id;
    resp.val = val;
    resp.error = -error;
    return ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp) == 0;
  };
  CHECK(answer(4242, 0));        // getppid
  CHECK(answer(0, ENODEV));      // file-backed mmap
  CHECK(answer(0, ENOSYS));      // x32
  CHECK(answer(777, 0));         // getpid
  CHECK(answer(0, ENOSYS));      // fork
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  // After the last target is gone the listener reports POLLHUP: no notification was left over.
  pollfd p{listener, POLLIN, 0};
  CHECK(poll(&p, 1, 60000) == 1);
  CHECK((p.revents & POLLHUP) != 0);
  close(listener);

  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(s->step.load() == 1);
  REQUIRE(seen.size() == 5);
  CHECK(seen[0] == __NR_getppid);
  CHECK(seen[1] == __NR_mmap);
  CHECK(seen[2] == (0x40000000 | __NR_getppid));
  CHECK(seen[3] == __NR_getpid);
  CHECK(seen[4] == __NR_fork);
  CHECK(s->results[0] == 0);      // clock_getres ran locally
  CHECK(s->results[1] == 4242);   // getppid got the supervisor's answer
  CHECK(s->results[2] > 0);       // anonymous mmap ran locally
  CHECK(s->results[3] == 7);
  CHECK(s->results[4] == -ENODEV);
  CHECK(s->results[5] == -ENOSYS);
  CHECK(s->results[6] == 777);
  CHECK(s->results[7] == -ENOSYS);
  munmap(s, sizeof(Shared));
}

TEST_CASE("a call through the i386 entry kills the guest", "[runtime][seccomp]") {
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    if (installFilter(0) < 0) {
      _exit(3);
    }
    long ret;
    asm volatile("int $0x80" : "=a"(ret) : "a"(20) : "memory");  // i386 getpid
    _exit(4);
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFSIGNALED(status));
  if (WTERMSIG(status) == SIGSEGV) {
    WARN("this kernel has no ia32 emulation: int 0x80 faults before seccomp sees it");
  } else {
    CHECK(WTERMSIG(status) == SIGSYS);
  }
}
