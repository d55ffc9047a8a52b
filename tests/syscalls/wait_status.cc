// wait4(2) and waitid(2): exit statuses, deaths by signal, stops and continues (WUNTRACED,
// WSTOPPED, WCONTINUED), WNOHANG on a running child, WNOWAIT, waiting for any child, for a
// process group, ECHILD; a pidfd (pidfd_open, poll, waitid P_PIDFD); SIGCHLD's siginfo for an
// exit and a stop; SIGCHLD ignored reaps
// children itself.

#include <sys/resource.h>
#include <sys/syscall.h>

#include <set>

#include "tree.h"

int main() {
  conf::deadline();
  struct rlimit noCore = {0, 0};
  CHECK(setrlimit(RLIMIT_CORE, &noCore) == 0);

  // Exited: wait4 with rusage, and SIGCHLD's siginfo (SIGCHLD blocked, taken by sigtimedwait).
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  CHECK(sigprocmask(SIG_BLOCK, &chld, nullptr) == 0);
  pid_t child = conf::spawn([] {
    _exit(42);
    return 0;
  });
  struct timespec thirty = {30, 0};
  siginfo_t info = {};
  CHECK(sigtimedwait(&chld, &info, &thirty) == SIGCHLD);
  CHECK(info.si_pid == child && info.si_code == CLD_EXITED && info.si_status == 42);
  int status = 0;
  struct rusage usage = {};
  CHECK(wait4(child, &status, 0, &usage) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 42);
  CHECK(usage.ru_maxrss > 0);

  // WNOHANG on a running child returns 0 (wait4) or an empty siginfo (waitid); WNOWAIT leaves
  // the zombie waitable.
  int hold[2];
  CHECK(pipe(hold) == 0);
  child = conf::spawn([&] {
    close(hold[1]);
    conf::recvByte(hold[0]);  // EOF when the parent closes its end
    return 3;                 // spawn() turns a non-zero result into exit 1
  });
  close(hold[0]);
  CHECK(wait4(child, &status, WNOHANG, nullptr) == 0);
  info = {};
  CHECK(waitid(P_PID, child, &info, WEXITED | WNOHANG) == 0);
  CHECK(info.si_pid == 0);
  close(hold[1]);
  info = {};
  CHECK(waitid(P_PID, child, &info, WEXITED | WNOWAIT) == 0);
  CHECK(info.si_pid == child && info.si_code == CLD_EXITED && info.si_status == 1);
  info = {};
  CHECK(waitid(P_PID, child, &info, WEXITED) == 0);
  CHECK(info.si_pid == child && info.si_code == CLD_EXITED && info.si_status == 1);
  CHECK_FAILS(waitid(P_PID, child, &info, WEXITED), ECHILD);
  CHECK(sigtimedwait(&chld, &info, &thirty) == SIGCHLD);  // drain

  // Killed by a signal: wait4 and waitid (CLD_KILLED).
  child = conf::spawn([] {
    for (;;) {
      pause();
    }
    return 0;
  });
  CHECK(kill(child, SIGTERM) == 0);
  info = {};
  CHECK(waitid(P_PID, child, &info, WEXITED | WNOWAIT) == 0);
  CHECK(info.si_code == CLD_KILLED && info.si_status == SIGTERM);
  CHECK(wait4(child, &status, 0, nullptr) == child);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM && !WCOREDUMP(status));
  CHECK(sigtimedwait(&chld, &info, &thirty) == SIGCHLD);

  // Stopped by itself (SIGSTOP), continued by the parent: wait4 WUNTRACED / WCONTINUED, the
  // SIGCHLDs of both, then waitid WSTOPPED / WCONTINUED for a stop sent by the parent.
  int resumed[2];
  CHECK(pipe(resumed) == 0);
  child = conf::spawn([&] {
    kill(getpid(), SIGSTOP);
    conf::sendByte(resumed[1], 'c');
    for (;;) {
      pause();
    }
    return 0;
  });
  CHECK(wait4(child, &status, WUNTRACED, nullptr) == child);
  CHECK(WIFSTOPPED(status) && WSTOPSIG(status) == SIGSTOP);
  info = {};
  CHECK(sigtimedwait(&chld, &info, &thirty) == SIGCHLD);
  CHECK(info.si_pid == child && info.si_code == CLD_STOPPED && info.si_status == SIGSTOP);
  CHECK(wait4(child, &status, WUNTRACED | WNOHANG, nullptr) == 0);  // reported once
  CHECK(kill(child, SIGCONT) == 0);
  CHECK(wait4(child, &status, WCONTINUED, nullptr) == child);
  CHECK(WIFCONTINUED(status));
  CHECK(conf::recvByte(resumed[0]) == 'c');
  info = {};
  CHECK(sigtimedwait(&chld, &info, &thirty) == SIGCHLD);
  CHECK(info.si_pid == child && info.si_code == CLD_CONTINUED && info.si_status == SIGCONT);
  CHECK(kill(child, SIGSTOP) == 0);
  info = {};
  CHECK(waitid(P_PID, child, &info, WSTOPPED) == 0);
  CHECK(info.si_pid == child && info.si_code == CLD_STOPPED && info.si_status == SIGSTOP);
  CHECK(kill(child, SIGCONT) == 0);
  info = {};
  CHECK(waitid(P_PID, child, &info, WCONTINUED) == 0);
  CHECK(info.si_pid == child && info.si_code == CLD_CONTINUED && info.si_status == SIGCONT);
  CHECK(kill(child, SIGKILL) == 0);
  info = {};
  CHECK(waitid(P_PID, child, &info, WEXITED) == 0);
  CHECK(info.si_pid == child && info.si_code == CLD_KILLED && info.si_status == SIGKILL);
  struct timespec zero = {0, 0};
  while (sigtimedwait(&chld, &info, &zero) == SIGCHLD) {
  }

  // Any child (-1, P_ALL), a process group (-pgid, P_PGID), and one's own group (0).
  std::set<int> codes;
  pid_t a = conf::spawn([] {
    _exit(11);
    return 0;
  });
  pid_t b = conf::spawn([] {
    _exit(12);
    return 0;
  });
  for (int i = 0; i < 2; i++) {
    pid_t w = wait4(-1, &status, 0, nullptr);
    CHECK(w == a || w == b);
    codes.insert(WEXITSTATUS(status));
  }
  CHECK((codes == std::set<int>{11, 12}));
  a = conf::spawn([] {
    _exit(13);
    return 0;
  });
  info = {};
  CHECK(waitid(P_ALL, 0, &info, WEXITED) == 0);
  CHECK(info.si_pid == a && info.si_status == 13);
  a = conf::spawn([] {
    _exit(14);
    return 0;
  });
  CHECK(waitpid(0, &status, 0) == a && WEXITSTATUS(status) == 14);

  int go[2];
  CHECK(pipe(go) == 0);
  a = conf::spawn([&] {
    close(go[1]);
    conf::recvByte(go[0]);
    _exit(15);
    return 0;
  });
  CHECK(setpgid(a, a) == 0);
  b = conf::spawn([&] {
    close(go[1]);
    conf::recvByte(go[0]);
    _exit(16);
    return 0;
  });
  close(go[0]);
  CHECK(waitpid(-a, &status, WNOHANG) == 0);
  close(go[1]);
  CHECK(waitpid(-a, &status, 0) == a && WEXITSTATUS(status) == 15);
  info = {};
  CHECK(waitid(P_PGID, getpgrp(), &info, WEXITED) == 0);
  CHECK(info.si_pid == b && info.si_status == 16);
  CHECK_FAILS(waitpid(-1, &status, WNOHANG), ECHILD);
  CHECK_FAILS(waitpid(getppid(), &status, 0), ECHILD);
  CHECK_FAILS(waitid(P_PID, child, &info, WEXITED | WNOHANG), ECHILD);
  CHECK_FAILS(waitid(P_ALL, 0, &info, 0), EINVAL);

  // pidfd_open: the descriptor polls readable when the child exits; waitid(P_PIDFD) reaps it;
  // a reaped pid has no pidfd (ESRCH).
  int release[2];
  CHECK(pipe(release) == 0);
  a = conf::spawn([&] {
    close(release[1]);
    conf::recvByte(release[0]);
    _exit(17);
    return 0;
  });
  close(release[0]);
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, a, 0));
  CHECK(pidfd >= 0);
  CHECK(!conf::readableWithin(pidfd, 0));
  close(release[1]);
  CHECK(conf::readableWithin(pidfd, 30000));
  info = {};
  CHECK(waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd), &info, WEXITED) == 0);
  CHECK(info.si_pid == a && info.si_code == CLD_EXITED && info.si_status == 17);
  close(pidfd);
  CHECK_FAILS(syscall(SYS_pidfd_open, a, 0), ESRCH);

  // SIGCHLD ignored: children are reaped by the kernel; wait4 blocks until they are gone, then
  // reports ECHILD.
  CHECK(sigprocmask(SIG_UNBLOCK, &chld, nullptr) == 0);
  struct sigaction ign = {};
  ign.sa_handler = SIG_IGN;
  CHECK(sigaction(SIGCHLD, &ign, nullptr) == 0);
  a = conf::spawn([] { return 0; });
  CHECK_FAILS(wait4(-1, &status, 0, nullptr), ECHILD);
  CHECK_FAILS(kill(a, 0), ESRCH);

  return conf::finish();
}
