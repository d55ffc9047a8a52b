// setpgid(2), getpgid(2), getpgrp, setsid(2), getsid(2) across the processes of one job: a child
// moved into its own group (by itself or by its parent), a session leader without a terminal
// (one child made by the legacy fork syscall),
// and the errors: EPERM for setsid in a group leader and for a group in another session, EACCES
// for a child that has exec'ed, ESRCH for an unknown or non-child pid, EINVAL for a negative
// pgid.

#include <fcntl.h>
#include <sys/syscall.h>

#include "tree.h"

int main() {
  conf::deadline();
  pid_t self = getpid();
  // Started in a session or group whose leader lives outside our pid namespace (a container's
  // CI runner, `unshare -pf`), getsid/getpgrp answer 0. Make a session of our own, as a job
  // started from a terminal has, so every id below is one we can see.
  if (getsid(0) == 0 || getpgrp() == 0) CHECK(setsid() == self);
  pid_t myGroup = getpgrp();
  pid_t mySession = getsid(0);
  CHECK(getpgid(0) == myGroup && getpgid(self) == myGroup);
  CHECK(mySession > 0 && getsid(self) == mySession);

  // A child moves itself into a group of its own; the parent sees it.
  int done[2];
  int hold[2];
  CHECK(pipe(done) == 0 && pipe(hold) == 0);
  pid_t child = conf::spawn([&] {
    close(hold[1]);
    CHECK(getpgrp() == myGroup);
    CHECK(setpgid(0, 0) == 0);
    CHECK(getpgrp() == getpid() && getpgid(0) == getpid());
    CHECK(getsid(0) == mySession);
    conf::sendByte(done[1]);
    conf::recvByte(hold[0]);
    return 0;
  });
  close(hold[0]);
  CHECK(conf::recvByte(done[0]) == '.');
  CHECK(getpgid(child) == child);
  CHECK(getsid(child) == mySession);
  CHECK(getpgrp() == myGroup);  // the parent stayed where it was
  // The parent moves it back into its own group, then into the group again.
  CHECK(setpgid(child, myGroup) == 0);
  CHECK(getpgid(child) == myGroup);
  CHECK(setpgid(child, 0) == 0);
  CHECK(getpgid(child) == child);
  close(hold[1]);
  conf::expectClean(child, "own group");

  // setsid in a child: new session and group named after it, no controlling terminal; a group
  // leader cannot; a group in another session cannot be joined.
  CHECK(pipe(done) == 0 && pipe(hold) == 0);
  pid_t leader = conf::spawn([&] {
    close(hold[1]);
    CHECK(setsid() == getpid());
    CHECK(getsid(0) == getpid() && getpgrp() == getpid());
    CHECK_FAILS(open("/dev/tty", O_RDWR), ENXIO);
    CHECK_FAILS(setsid(), EPERM);
    CHECK_FAILS(setpgid(0, myGroup), EPERM);  // a group of another session
    conf::sendByte(done[1]);
    conf::recvByte(hold[0]);
    return 0;
  });
  pid_t other = conf::spawn([&] {
    close(hold[1]);
    CHECK(setpgid(0, 0) == 0);
    CHECK_FAILS(setsid(), EPERM);  // a process group leader
    conf::sendByte(done[1]);
    conf::recvByte(hold[0]);
    return 0;
  });
  close(hold[0]);
  CHECK(conf::recvByte(done[0]) == '.' && conf::recvByte(done[0]) == '.');
  CHECK(getsid(leader) == leader && getpgid(leader) == leader);
  CHECK(getsid(other) == mySession && getpgid(other) == other);
  CHECK_FAILS(setpgid(other, leader), EPERM);    // leader's group is in another session
  CHECK_FAILS(setpgid(leader, myGroup), EPERM);  // a session leader cannot move
  close(hold[1]);
  conf::expectClean(leader, "session leader");
  conf::expectClean(other, "group leader");

  // The legacy fork(2) syscall (static and old binaries make it): its child makes a session of
  // its own too.
  int report[2];
  CHECK(pipe(report) == 0);
  fflush(stdout);
  long raw = syscall(SYS_fork);
  if (raw == 0) {
    pid_t me = static_cast<pid_t>(syscall(SYS_getpid));
    pid_t ids[2] = {static_cast<pid_t>(syscall(SYS_setsid)), me};
    (void)!write(report[1], ids, sizeof ids);
    syscall(SYS_exit_group, 0);
  }
  CHECK(raw > 0);
  if (raw > 0) {
    pid_t ids[2] = {};
    CHECK(conf::readFull(report[0], ids, sizeof ids) == sizeof ids);
    CHECK(ids[0] == raw && ids[1] == raw);
    int st = conf::waitFor(static_cast<pid_t>(raw));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  }
  close(report[0]);
  close(report[1]);

  // A child that has exec'ed cannot be moved by its parent (EACCES). The close-on-exec pipe
  // reads EOF once the exec happened.
  int execed[2];
  int in[2];
  CHECK(pipe2(execed, O_CLOEXEC) == 0 && pipe2(in, O_CLOEXEC) == 0);
  fflush(stdout);
  child = fork();
  if (child == 0) {
    dup2(in[0], 0);
    execl("/bin/cat", "cat", static_cast<char*>(nullptr));
    _exit(127);
  }
  CHECK(child > 0);
  close(execed[1]);
  close(in[0]);
  char c;
  CHECK(conf::readFull(execed[0], &c, 1) == 0);
  CHECK_FAILS(setpgid(child, child), EACCES);
  close(in[1]);
  int status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  // Unknown pids and bad arguments.
  CHECK_FAILS(getpgid(child), ESRCH);  // reaped
  CHECK_FAILS(getsid(child), ESRCH);
  CHECK_FAILS(setpgid(child, 0), ESRCH);
  CHECK_FAILS(setpgid(0, -1), EINVAL);
  if (getppid() > 0) CHECK_FAILS(setpgid(getppid(), 0), ESRCH);  // not a child

  return conf::finish();
}
