#pragma once
// Helpers for the conformance programs of process families (fork, wait, pipes between a parent
// and its child). Where fork itself is refused with ENOSYS (a node that cannot run process
// families yet), the program skips (exit 77) instead of failing.

#include <sys/wait.h>

#include "check.h"

namespace conf {

// fork(2), or exit 77 when this node refuses forks with ENOSYS.
inline pid_t forkOrSkip() {
  pid_t pid = fork();
  if (pid < 0 && errno == ENOSYS) {
    printf("fork: ENOSYS here; skipped\n");
    exit(77);
  }
  return pid;
}

// waitpid(2) that retries EINTR; returns the status, or -1 (and records a failure).
inline int waitFor(pid_t pid) {
  int status = 0;
  pid_t r;
  do {
    r = waitpid(pid, &status, 0);
  } while (r < 0 && errno == EINTR);
  if (r != pid) {
    printf("waitpid(%d) returned %d (errno %s)\n", pid, r, errnoName(errno));
    ++failures;
    return -1;
  }
  return status;
}

}  // namespace conf
