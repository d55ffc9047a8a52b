// The fork rewrite of guest_fork.h, end to end against the kernel: a seccomp-notified guest's
// fork and vfork become clone(CLONE_PARENT) at a chosen pid of the job's pid namespace; the
// child is the supervisor's child, the parent guest has no child of its own. Runs in a forked
// child (the pid namespace changes the caller for good); needs root.

#include "guest_fork.h"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <catch2/catch.hpp>

#include "pid_namespace.h"

using mos::remote::ForkKind;
using mos::remote::JobPidNamespace;

namespace {

constexpr int ERESTARTNOINTR = 513;

// The guest: notifies fork, vfork and clone; forks `rounds` children (fork, then vfork) that
// exit with 40 + their index and report getpid() through a pipe. Exits 0 when fork returned
// what the child saw as its pid and waitpid(-1) finds no child of its own.
[[noreturn]] void guest(int listenerOut, int reportIn, int reportOut) {
  struct sock_filter f[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 3, 0),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_fork, 2, 0),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_vfork, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
  };
  struct sock_fprog prog = {6, f};
  prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
  int l = static_cast<int>(syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                                   SECCOMP_FILTER_FLAG_NEW_LISTENER |
                                       SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
                                   &prog));
  (void)!write(listenerOut, &l, sizeof(l));
  int code = 0;
  for (int i = 0; i < 2; i++) {
    pid_t c = i == 0 ? fork() : vfork();
    if (c == 0) {
      pid_t me = static_cast<pid_t>(syscall(SYS_getpid));
      (void)!write(reportOut, &me, sizeof(me));
      _exit(40 + i);
    }
    pid_t seen = 0;
    if (read(reportIn, &seen, sizeof(seen)) != sizeof(seen) || seen != c) {
      code = 1;
    }
    int st;
    if (waitpid(-1, &st, WNOHANG) != -1 || errno != ECHILD) {
      code = 2;
    }
  }
  _exit(code);
}

// Serves one fork notification of `g` on `listener`; returns the child's node pid or -errno-ish
// negative codes on a failed step.
pid_t mirrorFork(int listener, pid_t g, JobPidNamespace& ns, pid_t want) {
  seccomp_notif n{};
  if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &n) != 0) {
    return -1;
  }
  if (ptrace(PTRACE_SEIZE, g, 0,
             PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE) != 0 ||
      ptrace(PTRACE_INTERRUPT, g, 0, 0) != 0) {
    return -2;
  }
  seccomp_notif_resp r{};
  r.id = n.id;
  r.error = -ERESTARTNOINTR;
  if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &r) != 0) {
    return -3;
  }
  int st;
  if (waitpid(g, &st, __WALL) != g || (st >> 16) != PTRACE_EVENT_STOP) {
    return -4;
  }
  user_regs_struct regs, saved;
  ptrace(PTRACE_GETREGS, g, 0, &regs);
  saved = regs;
  if (static_cast<int64_t>(regs.rax) != -ERESTARTNOINTR ||
      mos::remote::rewriteAsSiblingClone(regs) != ForkKind::PROCESS) {
    return -5;
  }
  ptrace(PTRACE_SETREGS, g, 0, &regs);
  ptrace(PTRACE_CONT, g, 0, 0);
  n = {};
  if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &n) != 0 || n.data.nr != __NR_clone ||
      !(n.data.args[0] & CLONE_PARENT)) {
    return -6;
  }
  if (ns.setNextPid(want) != 0) {
    return -7;
  }
  r = {};
  r.id = n.id;
  r.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
  ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &r);
  if (waitpid(g, &st, __WALL) != g) {
    return -8;
  }
  unsigned long child = 0;
  ptrace(PTRACE_GETEVENTMSG, g, 0, &child);
  if (waitpid(static_cast<pid_t>(child), &st, __WALL) != static_cast<pid_t>(child)) {
    return -9;
  }
  for (pid_t t : {g, static_cast<pid_t>(child)}) {
    user_regs_struct now;
    ptrace(PTRACE_GETREGS, t, 0, &now);
    mos::remote::restoreArgumentRegisters(now, saved);
    ptrace(PTRACE_SETREGS, t, 0, &now);
    ptrace(PTRACE_DETACH, t, 0, 0);
  }
  return static_cast<pid_t>(child);
}

}  // namespace

TEST_CASE("fork and vfork rewritten into clone(CLONE_PARENT) at a chosen pid", "[remote][fork]") {
  if (geteuid() != 0) {
    WARN("not root: pid namespaces and ptrace need privileges; not tested");
    return;
  }
  pid_t tester = fork();
  if (tester == 0) {
    int code = 0;
    auto ns = JobPidNamespace::create();
    int ready[2], report[2];
    if (pipe(ready) != 0 || pipe(report) != 0) {
      _exit(10);
    }
    pid_t g = fork();
    if (g == 0) {
      guest(ready[1], report[0], report[1]);
    }
    int remoteListener;
    (void)!read(ready[0], &remoteListener, sizeof(remoteListener));
    int pidfd = static_cast<int>(syscall(SYS_pidfd_open, g, 0));
    int listener = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, remoteListener, 0));
    for (int i = 0; i < 2 && code == 0; i++) {
      pid_t want = 5000 + i;
      pid_t child = mirrorFork(listener, g, ns, want);
      if (child <= 0) {
        code = 20 - child;
        break;
      }
      // The child reports its pid to the guest through the pipe; the supervisor reaps it.
      int st;
      if (waitpid(child, &st, __WALL) != child || !WIFEXITED(st) || WEXITSTATUS(st) != 40 + i) {
        code = 40 + i;
      }
    }
    int st;
    if (code == 0 && (waitpid(g, &st, __WALL) != g || !WIFEXITED(st) || WEXITSTATUS(st) != 0)) {
      code = 50 + (WIFEXITED(st) ? WEXITSTATUS(st) : 100);
    }
    _exit(code);
  }
  int status = 0;
  REQUIRE(waitpid(tester, &status, 0) == tester);
  INFO("tester status " << status);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
