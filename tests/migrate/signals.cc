// Blocked signals and the queued ones survive a checkpoint with their siginfo: a SIGUSR1 queued
// on the thread with a value (rt_tgsigqueueinfo: the thread's own queue), two real-time signals
// queued with values (sigqueue: the process-wide queue), a SIGTERM sent with kill; all blocked, so
// still pending after the resume. The mask itself, and an unblocked ignored signal, too.
#include <signal.h>
#include <sys/syscall.h>

#include "zdtm.h"

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  int rt = SIGRTMIN + 2;
  sigset_t block;
  sigemptyset(&block);
  sigaddset(&block, SIGUSR1);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, rt);
  sigaddset(&block, SIGWINCH);
  CHECK(sigprocmask(SIG_BLOCK, &block, nullptr) == 0);
  pid_t self = getpid();
  siginfo_t usr1{};
  usr1.si_signo = SIGUSR1;
  usr1.si_code = SI_QUEUE;
  usr1.si_pid = self;
  usr1.si_uid = getuid();
  usr1.si_value.sival_int = 77;
  CHECK(syscall(SYS_rt_tgsigqueueinfo, self, syscall(SYS_gettid), SIGUSR1, &usr1) == 0);
  CHECK(sigqueue(self, rt, sigval{.sival_int = 42}) == 0);
  CHECK(sigqueue(self, rt, sigval{.sival_int = 43}) == 0);
  CHECK(kill(self, SIGTERM) == 0);

  zdtm::ready();
  zdtm::waitGo();

  sigset_t mask;
  CHECK(sigprocmask(SIG_BLOCK, nullptr, &mask) == 0);
  CHECK(sigismember(&mask, SIGUSR1) && sigismember(&mask, SIGTERM) && sigismember(&mask, rt) &&
        sigismember(&mask, SIGWINCH));
  CHECK(!sigismember(&mask, SIGUSR2));
  sigset_t pending;
  CHECK(sigpending(&pending) == 0);
  CHECK(sigismember(&pending, SIGUSR1));
  CHECK(sigismember(&pending, SIGTERM));
  CHECK(sigismember(&pending, rt));
  CHECK(!sigismember(&pending, SIGWINCH));

  timespec now{0, 0};
  siginfo_t info;
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, rt);
  CHECK_EQ(sigtimedwait(&one, &info, &now), rt);
  CHECK_EQ(info.si_code, SI_QUEUE);
  CHECK_EQ(info.si_value.sival_int, 42);
  CHECK_EQ(info.si_pid, self);  // the sender as it was: the original process
  CHECK_EQ(sigtimedwait(&one, &info, &now), rt);
  CHECK_EQ(info.si_value.sival_int, 43);
  CHECK_EQ(sigtimedwait(&one, &info, &now), -1);

  sigemptyset(&one);
  sigaddset(&one, SIGUSR1);
  CHECK_EQ(sigtimedwait(&one, &info, &now), SIGUSR1);
  CHECK_EQ(info.si_code, SI_QUEUE);
  CHECK_EQ(info.si_value.sival_int, 77);
  sigemptyset(&one);
  sigaddset(&one, SIGTERM);
  CHECK_EQ(sigtimedwait(&one, &info, &now), SIGTERM);
  CHECK_EQ(info.si_code, SI_USER);
  CHECK(sigpending(&pending) == 0);
  CHECK(sigisemptyset(&pending));
  return zdtm::finish();
}
