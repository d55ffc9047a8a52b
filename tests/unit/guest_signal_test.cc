// guest_signal.h end to end against the kernel: a traced child (the "guest") queues home
// siginfos on itself — CLD_EXITED for a sigtimedwait, SI_USER for a handler while it computes —
// and a notified pselect6 with its own signal mask takes a signal blocked outside it and
// returns EINTR with the caller's mask back. Needs root (ptrace with PTRACE_O_SUSPEND_SECCOMP).

#include "guest_signal.h"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#include <catch2/catch.hpp>

using mos::remote::InjectHost;
using mos::remote::InjectOutcome;
using mos::remote::InjectRequest;
using mos::remote::PendingAnswer;

namespace {

constexpr int64_t ERESTARTNOHAND = 514;

// What the child saw, written to the test through a pipe.
struct Seen {
  int ret;           // the call's result
  int err;           // its errno
  int sig;           // the signal taken
  int code;          // its si_code
  pid_t pid;         // si_pid
  uid_t uid;         // si_uid
  int status;        // si_status
  int handled;       // the handler ran
  int stillBlocked;  // the signal is blocked again after the call
};

volatile sig_atomic_t handled = 0;
siginfo_t handledInfo;

void onSignal(int, siginfo_t* info, void*) {
  handledInfo = *info;
  handled = 1;
}

InjectHost hostFor(int listener) {
  InjectHost host;
  host.send = [listener](uint64_t id, int64_t value) {
    seccomp_notif_resp resp = {};
    resp.id = id;
    if (value < 0) {
      resp.error = static_cast<int32_t>(value);
    } else {
      resp.val = value;
    }
    return ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp) == 0 ? 0 : errno;
  };
  host.wait = [](pid_t pid) {
    int status;
    while (waitpid(pid, &status, __WALL) < 0) {
      if (errno != EINTR) {
        return -1;
      }
    }
    return status;
  };
  return host;
}

// Waits until `pid` sleeps in syscall `nr` (its /proc/PID/syscall), up to 10 s.
bool waitInSyscall(pid_t pid, long nr) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/syscall");
    long now = -2;
    in >> now;
    std::ifstream st("/proc/" + std::to_string(pid) + "/stat");
    std::string stat((std::istreambuf_iterator<char>(st)), std::istreambuf_iterator<char>());
    size_t close = stat.rfind(')');
    if (now == nr && close != std::string::npos && stat.size() > close + 2 &&
        stat[close + 2] == 'S') {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

Seen readSeen(int fd) {
  Seen seen = {};
  REQUIRE(read(fd, &seen, sizeof(seen)) == static_cast<ssize_t>(sizeof(seen)));
  return seen;
}

siginfo_t homeInfo(int sig, int code, pid_t pid, uid_t uid, int status) {
  siginfo_t info = {};
  info.si_signo = sig;
  info.si_code = code;
  info.si_pid = pid;
  info.si_uid = uid;
  info.si_status = status;
  return info;
}

}  // namespace

TEST_CASE("a guest in sigtimedwait takes a CLD_EXITED siginfo queued by itself, not EINTR",
          "[remote][signals]") {
  int report[2];
  REQUIRE(pipe(report) == 0);
  pid_t child = fork();
  if (child == 0) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, nullptr);
    siginfo_t info = {};
    struct timespec thirty = {30, 0};
    Seen seen = {};
    seen.ret = sigtimedwait(&set, &info, &thirty);
    seen.err = errno;
    seen.sig = info.si_signo;
    seen.code = info.si_code;
    seen.pid = info.si_pid;
    seen.uid = info.si_uid;
    seen.status = info.si_status;
    (void)!write(report[1], &seen, sizeof(seen));
    _exit(0);
  }
  REQUIRE(waitInSyscall(child, __NR_rt_sigtimedwait));
  InjectRequest request;
  request.pid = child;
  request.homePid = child;
  request.signals = {homeInfo(SIGCHLD, CLD_EXITED, 4242, 1234, 42)};
  CHECK(injectSignals(request, hostFor(-1)) == InjectOutcome::DONE);
  Seen seen = readSeen(report[0]);
  CHECK(seen.ret == SIGCHLD);
  CHECK(seen.code == CLD_EXITED);
  CHECK(seen.pid == 4242);
  CHECK(seen.uid == 1234u);
  CHECK(seen.status == 42);
  int status;
  REQUIRE(waitpid(child, &status, 0) == child);
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
}

TEST_CASE("a computing guest runs its handler with the home SI_USER siginfo", "[remote][signals]") {
  int report[2];
  REQUIRE(pipe(report) == 0);
  pid_t child = fork();
  if (child == 0) {
    struct sigaction action = {};
    action.sa_sigaction = onSignal;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR1, &action, nullptr);
    (void)!write(report[1], "r", 1);
    while (!handled) {
    }
    Seen seen = {};
    seen.sig = handledInfo.si_signo;
    seen.code = handledInfo.si_code;
    seen.pid = handledInfo.si_pid;
    seen.uid = handledInfo.si_uid;
    seen.handled = 1;
    (void)!write(report[1], &seen, sizeof(seen));
    _exit(0);
  }
  char ready;
  REQUIRE(read(report[0], &ready, 1) == 1);
  InjectRequest request;
  request.pid = child;
  request.homePid = child;
  request.signals = {homeInfo(SIGUSR1, SI_USER, 777, 1000, 0)};
  CHECK(injectSignals(request, hostFor(-1)) == InjectOutcome::DONE);
  Seen seen = readSeen(report[0]);
  CHECK(seen.sig == SIGUSR1);
  CHECK(seen.code == SI_USER);
  CHECK(seen.pid == 777);
  CHECK(seen.uid == 1000u);
  int status;
  REQUIRE(waitpid(child, &status, 0) == child);
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
}

TEST_CASE(
    "a notified pselect6 cut short at home takes SIGCHLD under its own mask and returns EINTR",
    "[remote][signals]") {
  int report[2], listenerPipe[2];
  REQUIRE(pipe(report) == 0);
  REQUIRE(pipe(listenerPipe) == 0);
  pid_t child = fork();
  if (child == 0) {
    struct sigaction action = {};
    action.sa_sigaction = onSignal;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGCHLD, &action, nullptr);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, nullptr);
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_pselect6, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
    };
    struct sock_fprog prog = {4, f};
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    int l = static_cast<int>(
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, &prog));
    (void)!write(listenerPipe[1], &l, sizeof(l));
    uint64_t empty = 0;
    struct {
      const uint64_t* mask;
      size_t size;
    } pair = {&empty, 8};
    Seen seen = {};
    seen.ret =
        static_cast<int>(syscall(SYS_pselect6, 0, nullptr, nullptr, nullptr, nullptr, &pair));
    seen.err = errno;
    seen.handled = handled;
    seen.sig = handledInfo.si_signo;
    seen.code = handledInfo.si_code;
    seen.pid = handledInfo.si_pid;
    seen.status = handledInfo.si_status;
    sigset_t now;
    sigprocmask(SIG_BLOCK, nullptr, &now);
    seen.stillBlocked = sigismember(&now, SIGCHLD);
    (void)!write(report[1], &seen, sizeof(seen));
    _exit(0);
  }
  int childListener;
  REQUIRE(read(listenerPipe[0], &childListener, sizeof(childListener)) == sizeof(childListener));
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, child, 0));
  REQUIRE(pidfd >= 0);
  int listener = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, childListener, 0));
  REQUIRE(listener >= 0);
  seccomp_notif notif = {};
  REQUIRE(ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &notif) == 0);
  CHECK(notif.data.nr == __NR_pselect6);
  InjectRequest request;
  request.pid = child;
  request.homePid = child;
  request.signals = {homeInfo(SIGCHLD, CLD_EXITED, 5151, 0, 7)};
  PendingAnswer answer;
  answer.id = notif.id;
  answer.value = -ERESTARTNOHAND;
  answer.interrupted = true;
  answer.callMask = uint64_t{0};
  request.answer = answer;
  CHECK(injectSignals(request, hostFor(listener)) == InjectOutcome::DONE);
  Seen seen = readSeen(report[0]);
  CHECK(seen.ret == -1);
  CHECK(seen.err == EINTR);
  CHECK(seen.handled == 1);
  CHECK(seen.sig == SIGCHLD);
  CHECK(seen.code == CLD_EXITED);
  CHECK(seen.pid == 5151);
  CHECK(seen.status == 7);
  CHECK(seen.stillBlocked == 1);
  int status;
  REQUIRE(waitpid(child, &status, 0) == child);
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  close(listener);
  close(pidfd);
}
