#pragma once
// Helpers for the conformance programs of process families (issue 6: fork, vfork, clone,
// threads, wait, pipes and shared memory between the processes of one job).
//
// Every program arms a deadline with conf::deadline() (alarm(2): SIGALRM ends a hung program as
// a failure instead of a stuck suite); a fork child arms its own, as alarms are not inherited.
// A child reports its failed checks on the shared stdout and exits 1; the parent checks that
// every child exited 0. Where fork fails (ENOSYS on a node that cannot run process families yet)
// the program fails: the cluster suite marks those remote runs as expected failures until the
// mechanism lands.

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>

#include "check.h"
#include "family.h"

namespace conf {

// Seconds after which a program (or one of its children) is ended by SIGALRM.
constexpr unsigned DEADLINE_S = 60;

inline void deadline() { alarm(DEADLINE_S); }

// fork(2): the child arms its deadline, runs body() and _exits with 1 if body returned non-zero
// or recorded a failed check, else 0. The parent gets the child's pid; a failed fork ends the
// program (exit 1).
template <typename F>
pid_t spawn(F body) {
  fflush(stdout);
  pid_t pid = fork();
  if (pid < 0) {
    printf("fork: %s\n", errnoName(errno));
    exit(1);
  }
  if (pid == 0) {
    alarm(DEADLINE_S);
    failures = 0;  // the parent's count is its own
    int rc = body();
    fflush(stdout);
    _exit(rc != 0 || failures > 0 ? 1 : 0);
  }
  return pid;
}

// Reaps pid and records a failure unless it exited with status 0; `what` names it.
inline void expectClean(pid_t pid, const char* what) {
  int status = waitFor(pid);
  if (status != -1 && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
    printf("%s (pid %d): status 0x%x (exited %d, signal %d)\n", what, pid, status,
           WIFEXITED(status) ? WEXITSTATUS(status) : -1,
           WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    ++failures;
  }
}

// Reads up to n bytes, retrying EINTR and short reads; returns the count (less than n at EOF),
// or -1 on an error.
inline ssize_t readFull(int fd, void* buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, static_cast<char*>(buf) + got, n - got);
    if (r < 0 && errno == EINTR) {
      continue;
    }
    if (r < 0) {
      return -1;
    }
    if (r == 0) {
      break;
    }
    got += size_t(r);
  }
  return ssize_t(got);
}

// Writes all n bytes, retrying EINTR and short writes; false on an error.
inline bool writeFull(int fd, const void* buf, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = write(fd, static_cast<const char*>(buf) + done, n - done);
    if (r < 0 && errno == EINTR) {
      continue;
    }
    if (r <= 0) {
      return false;
    }
    done += size_t(r);
  }
  return true;
}

// One byte through a pipe: the simplest handshake between processes.
inline bool sendByte(int fd, char c = '.') { return writeFull(fd, &c, 1); }

inline char recvByte(int fd) {
  char c = 0;
  return readFull(fd, &c, 1) == 1 ? c : 0;
}

// True when fd becomes readable (data or EOF) within ms milliseconds.
inline bool readableWithin(int fd, int ms) {
  struct pollfd p = {fd, POLLIN, 0};
  int r;
  do {
    r = poll(&p, 1, ms);
  } while (r < 0 && errno == EINTR);
  return r == 1;
}

// CLOCK_MONOTONIC in milliseconds, for polling loops with a deadline.
inline long nowMs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000L + ts.tv_nsec / 1000000;
}

// Polls pred() every millisecond until it holds (true) or `ms` pass (false).
template <typename P>
bool waitUntil(P pred, long ms = 30000) {
  long end = nowMs() + ms;
  while (!pred()) {
    if (nowMs() > end) {
      return false;
    }
    struct timespec oneMs = {0, 1000000};
    nanosleep(&oneMs, nullptr);
  }
  return true;
}

}  // namespace conf
