#include "pid_namespace.h"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include <kj/debug.h>
#include <kj/io.h>

namespace mos::remote {

void runReaper(int parentPidfd) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  pollfd p{parentPidfd, POLLIN, 0};
  if (::poll(&p, 1, 0) != 0) {
    ::_exit(0);  // the supervisor already died: so does its namespace
  }
  // Nothing of the supervisor's: a job channel held open here would hide the supervisor's end
  // from the deputy.
  ::syscall(SYS_close_range, 3u, ~0u, 0u);
  char name[] = "mos-reaper";
  ::prctl(PR_SET_NAME, name, 0, 0, 0);
  // Init of a pid namespace gets only the signals it has handlers for from inside it, and
  // SIGKILL from outside; SIGCHLD is blocked and taken with sigwaitinfo.
  sigset_t all;
  sigfillset(&all);
  ::sigprocmask(SIG_SETMASK, &all, nullptr);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  for (;;) {
    int status;
    while (::waitpid(-1, &status, WNOHANG | __WALL) > 0) {
    }
    siginfo_t info;
    ::sigwaitinfo(&chld, &info);
  }
}

JobPidNamespace JobPidNamespace::create() {
  KJ_SYSCALL(::unshare(CLONE_NEWPID), "a pid namespace for the job");
  int pidfd;
  KJ_SYSCALL(pidfd = static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
  kj::AutoCloseFd pidfdOwner(pidfd);
  pid_t pid;
  KJ_SYSCALL(pid = ::fork(), "the reaper of the job's pid namespace");
  if (pid == 0) {
    runReaper(pidfd);
  }
  return JobPidNamespace(pid);
}

JobPidNamespace::JobPidNamespace(JobPidNamespace&& other) noexcept : reaper_(other.reaper_) {
  other.reaper_ = -1;
}

JobPidNamespace& JobPidNamespace::operator=(JobPidNamespace&& other) noexcept {
  if (this != &other) {
    this->~JobPidNamespace();
    reaper_ = other.reaper_;
    other.reaper_ = -1;
  }
  return *this;
}

JobPidNamespace::~JobPidNamespace() {
  if (reaper_ > 0) {
    ::kill(reaper_, SIGKILL);
    // The reaper's exit completes only once every process of the namespace is released, and a
    // guest is released when its parent (this process) reaps it: reap them all on the way.
    for (;;) {
      int status;
      pid_t pid = ::waitpid(-1, &status, __WALL);
      if (pid == reaper_ || (pid < 0 && errno != EINTR)) {
        break;
      }
    }
    reaper_ = -1;
  }
}

}  // namespace mos::remote
