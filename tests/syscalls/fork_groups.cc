// setpgid(2), getpgid, setsid, getsid, kill(2) to a process group, between a parent and its
// children: a child moved into its own group, a signal to that group, a child that starts a
// session of its own.

#include <signal.h>

#include "family.h"

int main() {
  int go[2], done[2];
  CHECK(pipe(go) == 0 && pipe(done) == 0);
  pid_t child = conf::forkOrSkip();
  if (child == 0) {
    char c;
    (void)!read(go[0], &c, 1);
    bool ok = getpgid(0) == getpid();
    (void)!write(done[1], ok ? "y" : "n", 1);
    pause();  // until the group signal
    _exit(0);
  }
  // Both sides may set the group (the race setpgid(2) documents); the parent does it here.
  CHECK(setpgid(child, child) == 0);
  CHECK(getpgid(child) == child);
  CHECK(getpgid(0) == getpgrp() && getpgrp() != child);
  CHECK(write(go[1], "g", 1) == 1);
  char c = 0;
  CHECK(read(done[0], &c, 1) == 1 && c == 'y');
  CHECK(kill(-child, SIGTERM) == 0);
  int status = conf::waitFor(child);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM);
  CHECK_FAILS(kill(-child, 0), ESRCH);

  // A child starts its own session: it leads it and its group.
  child = conf::forkOrSkip();
  if (child == 0) {
    pid_t sid = setsid();
    bool ok = sid == getpid() && getsid(0) == sid && getpgrp() == sid;
    _exit(ok ? 0 : 1);
  }
  status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  // A group leader cannot start a session of its own.
  if (getpgrp() == getpid()) {
    CHECK_FAILS(setsid(), EPERM);
  }
  return conf::finish();
}
