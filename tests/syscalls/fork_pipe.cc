// pipe2(2) between a parent and its child: data flows both ways, EOF arrives when the last
// writer closes (the parent's copy included), EPIPE and SIGPIPE when the last reader is gone;
// a loop of forks (each child reports through the pipe and exits with its index).

#include <fcntl.h>
#include <signal.h>

#include "family.h"

int main() {
  // Child writes, parent reads to EOF (the parent closed its own write end).
  int p[2];
  CHECK(pipe2(p, O_CLOEXEC) == 0);
  pid_t child = conf::forkOrSkip();
  if (child == 0) {
    close(p[0]);
    const char msg[] = "hello from the child";
    bool ok = write(p[1], msg, sizeof(msg) - 1) == sizeof(msg) - 1;
    _exit(ok ? 0 : 1);
  }
  close(p[1]);
  std::string got;
  char buf[64];
  ssize_t n;
  while ((n = read(p[0], buf, sizeof(buf))) > 0) {
    got.append(buf, n);
  }
  CHECK(n == 0);
  CHECK(got == "hello from the child");
  int status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  close(p[0]);

  // The reader exits: the writer gets EPIPE (SIGPIPE ignored), then SIGPIPE kills a child that
  // does not ignore it.
  CHECK(pipe(p) == 0);
  child = conf::forkOrSkip();
  if (child == 0) {
    close(p[1]);
    char c;
    _exit(read(p[0], &c, 1) == 1 && c == 'x' ? 0 : 1);
  }
  close(p[0]);
  signal(SIGPIPE, SIG_IGN);
  CHECK(write(p[1], "x", 1) == 1);
  status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK_FAILS(write(p[1], "y", 1), EPIPE);
  signal(SIGPIPE, SIG_DFL);
  child = conf::forkOrSkip();
  if (child == 0) {
    (void)!write(p[1], "z", 1);
    _exit(0);
  }
  status = conf::waitFor(child);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGPIPE);
  close(p[1]);

  // Many children, one after the other, each reporting its index through one pipe.
  CHECK(pipe(p) == 0);
  const int COUNT = 50;
  for (int i = 0; i < COUNT; i++) {
    child = conf::forkOrSkip();
    if (child == 0) {
      unsigned char b = static_cast<unsigned char>(i);
      (void)!write(p[1], &b, 1);
      _exit(i);
    }
    status = conf::waitFor(child);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == i);
  }
  close(p[1]);
  unsigned char all[COUNT + 1];
  size_t total = 0;
  while ((n = read(p[0], all + total, sizeof(all) - total)) > 0) {
    total += n;
  }
  CHECK(total == COUNT);
  for (int i = 0; i < COUNT && i < static_cast<int>(total); i++) {
    CHECK(all[i] == i);
  }
  return conf::finish();
}
