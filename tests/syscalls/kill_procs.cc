// kill(2), tgkill(2), rt_sigqueueinfo (sigqueue) and killpg between the processes of one job:
// the receiver's siginfo names the sender's pid and uid and the right si_code (SI_USER; for
// tgkill SI_TKILL, or SI_USER where the kernel reports that; SI_QUEUE with its value); a process
// group receives a signal in every member, kill(0, ...) reaches the sender's own group;
// kill(pid, 0) probes; ESRCH for a reaped pid and a wrong tgid.

#include <sys/syscall.h>

#include "tree.h"

// What a receiver took with sigtimedwait, sent back to the parent through a pipe.
struct Got {
  int sig;
  int code;
  pid_t pid;
  uid_t uid;
  int value;
};

// tgkill's si_code: SI_TKILL, or SI_USER on kernels that report it so (6.18 does).
static bool isTkill(int code) { return code == SI_TKILL || code == SI_USER; }

static Got take(const sigset_t& set) {
  siginfo_t info = {};
  struct timespec thirty = {30, 0};
  Got g = {};
  g.sig = sigtimedwait(&set, &info, &thirty);
  g.code = info.si_code;
  g.pid = info.si_pid;
  g.uid = info.si_uid;
  g.value = info.si_value.sival_int;
  return g;
}

int main() {
  conf::deadline();
  pid_t self = getpid();
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  sigaddset(&set, SIGUSR2);
  sigaddset(&set, SIGRTMIN);
  CHECK(sigprocmask(SIG_BLOCK, &set, nullptr) == 0);  // inherited: no signal is lost to a race

  // Parent to child: kill, tgkill and sigqueue, each with its si_code.
  int back[2];
  CHECK(pipe(back) == 0);
  pid_t child = conf::spawn([&] {
    for (int i = 0; i < 3; i++) {
      Got g = take(set);
      conf::writeFull(back[1], &g, sizeof g);
    }
    return 0;
  });
  CHECK(kill(child, 0) == 0);
  Got g = {};
  CHECK(kill(child, SIGUSR1) == 0);
  CHECK(conf::readFull(back[0], &g, sizeof g) == sizeof g);
  CHECK(g.sig == SIGUSR1 && g.code == SI_USER && g.pid == self && g.uid == getuid());
  CHECK(syscall(SYS_tgkill, child, child, SIGUSR2) == 0);
  CHECK(conf::readFull(back[0], &g, sizeof g) == sizeof g);
  CHECK(g.sig == SIGUSR2 && isTkill(g.code) && g.pid == self && g.uid == getuid());
  union sigval v;
  v.sival_int = 1234;
  CHECK(sigqueue(child, SIGRTMIN, v) == 0);
  CHECK(conf::readFull(back[0], &g, sizeof g) == sizeof g);
  CHECK(g.sig == SIGRTMIN && g.code == SI_QUEUE && g.pid == self && g.value == 1234);
  conf::expectClean(child, "receiver");
  CHECK_FAILS(kill(child, 0), ESRCH);
  CHECK_FAILS(kill(child, SIGUSR1), ESRCH);

  // Child to parent, and a tgkill naming a tid with the wrong tgid.
  int hold[2];
  CHECK(pipe(hold) == 0);
  child = conf::spawn([&] {
    close(hold[1]);
    CHECK(kill(getppid(), SIGUSR1) == 0);
    CHECK(syscall(SYS_tgkill, getppid(), getppid(), SIGUSR2) == 0);
    conf::recvByte(hold[0]);
    return 0;
  });
  close(hold[0]);
  g = take(set);
  Got g2 = take(set);
  if (g.sig == SIGUSR2) {
    std::swap(g, g2);
  }
  CHECK(g.sig == SIGUSR1 && g.code == SI_USER && g.pid == child);
  CHECK(g2.sig == SIGUSR2 && isTkill(g2.code) && g2.pid == child);
  CHECK_FAILS(syscall(SYS_tgkill, self, child, SIGUSR1), ESRCH);
  CHECK(syscall(SYS_tgkill, child, child, 0) == 0);
  close(hold[1]);
  conf::expectClean(child, "sender");

  // A process group of two: killpg / kill(-pgid) reaches both members.
  auto member = [&] {
    Got got = take(set);
    conf::writeFull(back[1], &got, sizeof got);
    return 0;
  };
  pid_t leader = conf::spawn(member);
  CHECK(setpgid(leader, leader) == 0);
  pid_t other = conf::spawn(member);
  CHECK(setpgid(other, leader) == 0);
  CHECK(getpgid(other) == leader);
  CHECK(kill(-leader, SIGUSR1) == 0);
  for (int i = 0; i < 2; i++) {
    CHECK(conf::readFull(back[0], &g, sizeof g) == sizeof g);
    CHECK(g.sig == SIGUSR1 && g.code == SI_USER && g.pid == self);
  }
  conf::expectClean(leader, "group leader");
  conf::expectClean(other, "group member");

  // kill(0, sig) from a child that leads its own group reaches itself and its own child.
  child = conf::spawn([&] {
    CHECK(setpgid(0, 0) == 0);
    pid_t grandchild = conf::spawn([&] {
      Got got = take(set);
      conf::writeFull(back[1], &got, sizeof got);
      return 0;
    });
    CHECK(kill(0, SIGUSR2) == 0);
    Got got = take(set);
    conf::writeFull(back[1], &got, sizeof got);
    conf::expectClean(grandchild, "grandchild");
    return 0;
  });
  for (int i = 0; i < 2; i++) {
    CHECK(conf::readFull(back[0], &g, sizeof g) == sizeof g);
    CHECK(g.sig == SIGUSR2 && g.code == SI_USER && g.pid == child);
  }
  conf::expectClean(child, "group of its own");

  // SIGKILL and SIGTERM with the default action end a child; SIGCONT of a running one is
  // harmless.
  child = conf::spawn([] {
    for (;;) {
      pause();
    }
    return 0;
  });
  CHECK(kill(child, SIGCONT) == 0);
  CHECK(kill(child, SIGKILL) == 0);
  int status = conf::waitFor(child);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

  return conf::finish();
}
