// vfork(2) and posix_spawn(3) (glibc: clone with CLONE_VM | CLONE_VFORK): the parent stays
// suspended, sharing its memory with the child, until the child execs or exits; an exec that
// fails leaves the parent suspended until the child's _exit; the exec'ed program runs as the
// same pid; vfork + execveat of a descriptor (fexecve).

#include <fcntl.h>
#include <sched.h>
#include <spawn.h>
#include <sys/syscall.h>

#include "tree.h"

extern char** environ;

// Written by the vfork child in the memory it shares with its suspended parent.
static volatile int shared;
static volatile pid_t childSawPid;
static volatile pid_t childSawPpid;
static volatile int execErrno;

// vfork(2) of a child that only _exits with `code`; returns its wait status.
static int vforkExit(int code) {
  pid_t child = vfork();
  if (child == 0) {
    _exit(code);
  }
  return conf::waitFor(child);
}

int main() {
  conf::deadline();
  pid_t self = getpid();

  // The child exits: the parent resumes only after _exit and sees every store of the child,
  // the last one made after a thousand yields.
  shared = 0;
  pid_t child = vfork();
  if (child == 0) {
    shared = 1;
    childSawPid = static_cast<pid_t>(getpid());
    childSawPpid = getppid();
    for (int i = 0; i < 50; i++) {
      sched_yield();
    }
    shared = 2;
    _exit(5);
  }
  if (child < 0) {
    printf("vfork: %s\n", conf::errnoName(errno));
    return 1;  // nothing below can run without vfork
  }
  CHECK(shared == 2);
  CHECK(childSawPid == child && childSawPpid == self);
  int status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 5);

  // The child execs cat, which blocks on a pipe: the parent resumes at the exec while the child
  // lives on, and talks to the new program through the pipes the child set up before exec.
  int in[2];
  int out[2];
  CHECK(pipe2(in, O_CLOEXEC) == 0 && pipe2(out, O_CLOEXEC) == 0);
  shared = 0;
  child = vfork();
  if (child == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    shared = 1;
    for (int i = 0; i < 50; i++) {
      sched_yield();
    }
    shared = 2;
    execl("/bin/cat", "cat", static_cast<char*>(nullptr));
    _exit(127);
  }
  CHECK(child > 0);
  CHECK(shared == 2);
  close(in[0]);
  close(out[1]);
  int dummy = 0;
  CHECK(waitpid(child, &dummy, WNOHANG) == 0);  // resumed at the exec, not at an exit
  const char msg[] = "through cat\n";
  CHECK(conf::writeFull(in[1], msg, sizeof msg - 1));
  char back[sizeof msg] = {};
  CHECK(conf::readFull(out[0], back, sizeof msg - 1) == ssize_t(sizeof msg - 1));
  CHECK(memcmp(back, msg, sizeof msg - 1) == 0);
  close(in[1]);  // cat reads EOF and exits 0
  CHECK(conf::readFull(out[0], back, 1) == 0);
  close(out[0]);
  status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  // An exec that fails returns to the child, which is still sharing the parent's memory.
  execErrno = 0;
  child = vfork();
  if (child == 0) {
    execl("/nonexistent/umosix-prog", "x", static_cast<char*>(nullptr));
    execErrno = errno;
    _exit(127);
  }
  CHECK(execErrno == ENOENT);
  status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 127);

  // vfork + execveat(AT_EMPTY_PATH) of a descriptor the parent opened (fexecve).
  int shFd = open("/bin/sh", O_PATH | O_CLOEXEC);
  CHECK(shFd >= 0);
  child = vfork();
  if (child == 0) {
    const char* shArgv[] = {"sh", "-c", "exit 4", nullptr};
    syscall(SYS_execveat, shFd, "", shArgv, environ, AT_EMPTY_PATH);
    execErrno = errno;
    _exit(127);
  }
  status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 4);
  close(shFd);

  // posix_spawn: the exit status of the program, and ENOENT for a missing one.
  const char* argv[] = {"sh", "-c", "exit 9", nullptr};
  pid_t spawned = 0;
  CHECK(posix_spawn(&spawned, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ) == 0);
  CHECK(spawned > 0 && spawned != self);
  status = conf::waitFor(spawned);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 9);
  const char* missing[] = {"umosix-no-such-program", nullptr};
  CHECK(posix_spawnp(&spawned, missing[0], nullptr, nullptr, const_cast<char**>(missing),
                     environ) == ENOENT);

  // Many vforks in a row (a shell running a script does this).
  for (int i = 0; i < 200; i++) {
    status = vforkExit(i & 0x7f);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == (i & 0x7f))) {
      CHECK(!"vfork loop: wrong status");
      break;
    }
  }

  CHECK_FAILS(wait(&status), ECHILD);
  return conf::finish();
}
