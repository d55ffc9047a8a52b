// rt_sigaction(2), rt_sigprocmask, rt_sigpending, rt_sigtimedwait, rt_sigsuspend, sigaltstack,
// kill, tgkill, alarm, pause, setitimer, and a blocking read interrupted by a signal with and
// without SA_RESTART.

#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/time.h>

#include <atomic>

#include "check.h"

static volatile sig_atomic_t hits[65];
static volatile sig_atomic_t lastCode;
static char* altBase;
static size_t altSize;
static volatile sig_atomic_t onAltStack;
static int wakeFd = -1;  // the handler writes here to end a restarted read

static void handler(int sig, siginfo_t* info, void*) {
  hits[sig] = hits[sig] + 1;
  lastCode = info->si_code;
  char here;
  if (altBase != nullptr && &here >= altBase && &here < altBase + altSize) {
    onAltStack = 1;
  }
  if (wakeFd >= 0) {
    (void)!write(wakeFd, "w", 1);
  }
}

static void install(int sig, int flags) {
  struct sigaction sa = {};
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO | flags;
  sigemptyset(&sa.sa_mask);
  CHECK(sigaction(sig, &sa, nullptr) == 0);
}

int main() {
  install(SIGUSR1, 0);
  install(SIGUSR2, 0);

  // A signal to oneself is delivered before kill returns. On a remote node the supervisor
  // queues it with the job's home pid as sender, which the kernel allows only as SI_QUEUE
  // (docs/design.md, "signals"): si_pid is checked exactly, si_code may be SI_QUEUE.
  CHECK(kill(getpid(), SIGUSR1) == 0);
  CHECK(hits[SIGUSR1] == 1 && (lastCode == SI_USER || lastCode == SI_QUEUE));
  CHECK(syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), SIGUSR2) == 0);
  CHECK(hits[SIGUSR2] == 1 && (lastCode == SI_TKILL || lastCode == SI_QUEUE));
  CHECK(raise(SIGUSR2) == 0 && hits[SIGUSR2] == 2);
  CHECK_FAILS(kill(getpid(), 12345), EINVAL);
  CHECK(kill(getpid(), 0) == 0);

  // Blocked signals wait in the pending set.
  sigset_t block, old, pending;
  sigemptyset(&block);
  sigaddset(&block, SIGUSR1);
  CHECK(sigprocmask(SIG_BLOCK, &block, &old) == 0);
  CHECK(kill(getpid(), SIGUSR1) == 0);
  CHECK(hits[SIGUSR1] == 1);
  CHECK(sigpending(&pending) == 0 && sigismember(&pending, SIGUSR1));
  CHECK(sigprocmask(SIG_SETMASK, &old, nullptr) == 0);
  CHECK(hits[SIGUSR1] == 2);

  // sigtimedwait takes a blocked signal without running the handler.
  CHECK(sigprocmask(SIG_BLOCK, &block, nullptr) == 0);
  CHECK(kill(getpid(), SIGUSR1) == 0);
  siginfo_t si;
  timespec tmo = {1, 0};
  CHECK(sigtimedwait(&block, &si, &tmo) == SIGUSR1 && si.si_pid == getpid());
  CHECK(hits[SIGUSR1] == 2);
  timespec zero = {0, 0};
  CHECK_FAILS(sigtimedwait(&block, &si, &zero), EAGAIN);
  CHECK(sigprocmask(SIG_SETMASK, &old, nullptr) == 0);

  // Ignored signals vanish.
  signal(SIGUSR2, SIG_IGN);
  CHECK(kill(getpid(), SIGUSR2) == 0);
  CHECK(hits[SIGUSR2] == 2);
  install(SIGUSR2, SA_ONSTACK);

  // A handler can run on an alternate stack.
  altSize = 64 * 1024;
  altBase = static_cast<char*>(malloc(altSize));
  stack_t ss = {};
  ss.ss_sp = altBase;
  ss.ss_size = altSize;
  CHECK(sigaltstack(&ss, nullptr) == 0);
  CHECK(kill(getpid(), SIGUSR2) == 0);
  CHECK(hits[SIGUSR2] == 3 && onAltStack == 1);
  stack_t cur;
  CHECK(sigaltstack(nullptr, &cur) == 0 && cur.ss_sp == altBase && cur.ss_flags == 0);

  // SIGALRM from alarm interrupts pause.
  install(SIGALRM, 0);
  CHECK(alarm(1) == 0);
  CHECK_FAILS(pause(), EINTR);
  CHECK(hits[SIGALRM] == 1);

  // rt_sigsuspend waits with a temporary mask and returns EINTR after the handler.
  CHECK(sigprocmask(SIG_BLOCK, &block, nullptr) == 0);
  CHECK(kill(getpid(), SIGUSR1) == 0);
  sigset_t none;
  sigemptyset(&none);
  CHECK_FAILS(sigsuspend(&none), EINTR);
  CHECK(hits[SIGUSR1] == 3);
  CHECK(sigprocmask(SIG_SETMASK, &old, nullptr) == 0);

  // A blocking read interrupted by a handler without SA_RESTART fails EINTR...
  // The timer repeats every 100 ms until it is switched off: on a busy machine a first tick may
  // come before the call blocks, and the next one interrupts it.
  int p[2];
  CHECK(pipe(p) == 0);
  itimerval soon = {{0, 100 * 1000}, {0, 100 * 1000}};
  itimerval off = {};
  int before = hits[SIGALRM];
  CHECK(setitimer(ITIMER_REAL, &soon, nullptr) == 0);
  char c;
  CHECK_FAILS(read(p[0], &c, 1), EINTR);
  CHECK(setitimer(ITIMER_REAL, &off, nullptr) == 0);
  CHECK(hits[SIGALRM] > before);
  // ...and with SA_RESTART it resumes and sees what the handler wrote.
  install(SIGALRM, SA_RESTART);
  wakeFd = p[1];
  before = hits[SIGALRM];
  CHECK(setitimer(ITIMER_REAL, &soon, nullptr) == 0);
  CHECK(read(p[0], &c, 1) == 1 && c == 'w');
  CHECK(setitimer(ITIMER_REAL, &off, nullptr) == 0);
  CHECK(hits[SIGALRM] > before);
  wakeFd = -1;
  // Empty the pipe of the 'w's of further ticks.
  int avail = 0;
  CHECK(ioctl(p[0], FIONREAD, &avail) == 0);
  for (; avail > 0; avail--) {
    CHECK(read(p[0], &c, 1) == 1 && c == 'w');
  }
  // poll(2) is never restarted after a handler, even with SA_RESTART (signal(7)).
  before = hits[SIGALRM];
  CHECK(setitimer(ITIMER_REAL, &soon, nullptr) == 0);
  struct pollfd pfd = {p[0], POLLIN, 0};
  CHECK_FAILS(poll(&pfd, 1, -1), EINTR);
  CHECK(setitimer(ITIMER_REAL, &off, nullptr) == 0);
  CHECK(hits[SIGALRM] > before);
  close(p[0]);
  close(p[1]);
  return conf::finish();
}
