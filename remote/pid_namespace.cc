#include "pid_namespace.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>

#include <kj/debug.h>

namespace mos::remote {

namespace {

constexpr int REAPER_CONTROL_FD = 3;

// Writes `pid` - 1 to this process's pid namespace's ns_last_pid; 0 or errno.
int32_t writeLastPid(int32_t pid) {
  if (pid < 2) {
    return EINVAL;
  }
  int fd = ::open("/proc/sys/kernel/ns_last_pid", O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    return errno;
  }
  char text[16];
  int n = snprintf(text, sizeof(text), "%d", pid - 1);
  int32_t err = ::write(fd, text, n) == n ? 0 : errno;
  ::close(fd);
  return err;
}

}  // namespace

void runReaper(int parentPidfd, int control) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  pollfd alive{parentPidfd, POLLIN, 0};
  if (::poll(&alive, 1, 0) != 0) {
    ::_exit(0);  // the supervisor already died: so does its namespace
  }
  // Nothing of the supervisor's: a job channel held open here would hide the supervisor's end
  // from the deputy.
  if (control != REAPER_CONTROL_FD) {
    if (::dup2(control, REAPER_CONTROL_FD) < 0) {
      ::_exit(127);
    }
  }
  ::fcntl(REAPER_CONTROL_FD, F_SETFD, 0);
  ::syscall(SYS_close_range, REAPER_CONTROL_FD + 1u, ~0u, 0u);
  char name[] = "mos-reaper";
  ::prctl(PR_SET_NAME, name, 0, 0, 0);
  // Init of a pid namespace gets only the signals it has handlers for from inside it, and
  // SIGKILL from outside; every signal is blocked, SIGCHLD is read from a signalfd.
  sigset_t all;
  sigfillset(&all);
  ::sigprocmask(SIG_SETMASK, &all, nullptr);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  int sfd = ::signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) {
    ::_exit(127);
  }
  for (;;) {
    int status;
    while (::waitpid(-1, &status, WNOHANG | __WALL) > 0) {
    }
    pollfd fds[2] = {{REAPER_CONTROL_FD, POLLIN, 0}, {sfd, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      continue;
    }
    if (fds[1].revents & POLLIN) {
      signalfd_siginfo info;
      while (::read(sfd, &info, sizeof(info)) == sizeof(info)) {
      }
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      int32_t request[5];
      ssize_t n = ::recv(REAPER_CONTROL_FD, request, sizeof(request), 0);
      if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) {
        ::_exit(0);  // the supervisor is gone
      }
      if (n == sizeof(int32_t)) {
        int32_t err = writeLastPid(request[0]);
        ::send(REAPER_CONTROL_FD, &err, sizeof(err), MSG_NOSIGNAL);
      } else if (n == sizeof(request)) {
        // queueSignal: target, signal, si_pid, si_uid, si_value
        siginfo_t info = {};
        info.si_signo = request[1];
        info.si_code = SI_QUEUE;
        info.si_pid = request[2];
        info.si_uid = static_cast<uid_t>(request[3]);
        info.si_value.sival_int = request[4];
        int32_t err =
            ::syscall(SYS_rt_tgsigqueueinfo, request[0], request[0], request[1], &info) == 0
                ? 0
                : errno;
        ::send(REAPER_CONTROL_FD, &err, sizeof(err), MSG_NOSIGNAL);
      }
    }
  }
}

JobPidNamespace JobPidNamespace::create() {
  int pair[2];
  KJ_SYSCALL(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair));
  kj::AutoCloseFd mine(pair[0]), theirs(pair[1]);
  // The job's IPC namespace too (docs/design.md, "Memory shared between job processes"): System V
  // shared memory, semaphores and message queues of its guests are the job's alone, shared by
  // its processes on this node and gone with them. CLONE_NEWIPC applies to us at once (we use no
  // System V IPC), CLONE_NEWPID to our later children.
  KJ_SYSCALL(::unshare(CLONE_NEWPID | CLONE_NEWIPC), "pid and IPC namespaces for the job");
  int pidfd;
  KJ_SYSCALL(pidfd = static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
  kj::AutoCloseFd pidfdOwner(pidfd);
  pid_t pid;
  KJ_SYSCALL(pid = ::fork(), "the reaper of the job's pid namespace");
  if (pid == 0) {
    runReaper(pidfd, theirs.get());
  }
  return JobPidNamespace(pid, kj::mv(mine));
}

int JobPidNamespace::ask(const void* request, size_t bytes) {
  if (control_ == nullptr) {
    return EPIPE;
  }
  if (::send(control_.get(), request, bytes, MSG_NOSIGNAL) != static_cast<ssize_t>(bytes)) {
    return EPIPE;
  }
  int32_t err;
  ssize_t n;
  do {
    n = ::recv(control_.get(), &err, sizeof(err), 0);
  } while (n < 0 && errno == EINTR);
  return n == sizeof(err) ? err : EPIPE;
}

int JobPidNamespace::queueSignal(pid_t pid, int sig, pid_t fromPid, uid_t uid, int value) {
  int32_t request[5] = {pid, sig, fromPid, static_cast<int32_t>(uid), value};
  return ask(request, sizeof(request));
}

int JobPidNamespace::setNextPid(pid_t pid) {
  int32_t request = pid;
  return ask(&request, sizeof(request));
}

JobPidNamespace::JobPidNamespace(JobPidNamespace&& other) noexcept
    : reaper_(other.reaper_), control_(kj::mv(other.control_)) {
  other.reaper_ = -1;
}

JobPidNamespace& JobPidNamespace::operator=(JobPidNamespace&& other) noexcept {
  if (this != &other) {
    end();
    reaper_ = other.reaper_;
    control_ = kj::mv(other.control_);
    other.reaper_ = -1;
  }
  return *this;
}

JobPidNamespace::~JobPidNamespace() { end(); }

void JobPidNamespace::end() {
  control_ = nullptr;
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
