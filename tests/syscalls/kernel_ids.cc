// The ids that the kernel itself writes agree with getpid(2)/gettid(2)/getuid(2): the tid
// FUTEX_LOCK_PI stores in a futex word (futex(2)), and si_pid/si_code/si_uid of a signal a
// process sends itself with kill(2) and tgkill(2). On a remote node the guest's pid there is its
// home pid (docs/design.md, "Home ids in the guest's kernel"), and its uid there is the node's
// nobody: si_uid must still be the job's uid.

#include <linux/futex.h>
#include <signal.h>
#include <sys/syscall.h>

#include <cstdint>

#include "check.h"

static volatile sig_atomic_t seenPid;
static volatile sig_atomic_t seenCode;
static volatile sig_atomic_t seenUid;

static void handler(int, siginfo_t* info, void*) {
  seenPid = info->si_pid;
  seenCode = info->si_code;
  seenUid = static_cast<sig_atomic_t>(info->si_uid);
}

int main() {
  pid_t pid = getpid();
  pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
  CHECK(pid == tid);

  // FUTEX_LOCK_PI on a free word: the kernel writes the caller's tid into it.
  uint32_t word = 0;
  CHECK(syscall(SYS_futex, &word, FUTEX_LOCK_PI_PRIVATE, 0, nullptr, nullptr, 0) == 0);
  CHECK((word & FUTEX_TID_MASK) == static_cast<uint32_t>(tid));
  CHECK(syscall(SYS_futex, &word, FUTEX_UNLOCK_PI_PRIVATE, 0, nullptr, nullptr, 0) == 0);
  CHECK(word == 0);

  struct sigaction sa = {};
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  CHECK(sigaction(SIGUSR1, &sa, nullptr) == 0);

  // kill(2) to oneself: delivered before kill returns, sent by the caller's pid.
  seenPid = -1;
  CHECK(kill(pid, SIGUSR1) == 0);
  CHECK(seenPid == pid);
  CHECK(seenCode == SI_USER);
  CHECK(static_cast<uid_t>(seenUid) == getuid());

  seenPid = -1;
  CHECK(syscall(SYS_tgkill, pid, tid, SIGUSR1) == 0);
  CHECK(seenPid == pid);
  CHECK(seenCode == SI_TKILL);
  CHECK(static_cast<uid_t>(seenUid) == getuid());

  // A blocked one is taken with its sender by sigtimedwait.
  sigset_t block;
  sigemptyset(&block);
  sigaddset(&block, SIGUSR2);
  CHECK(sigprocmask(SIG_BLOCK, &block, nullptr) == 0);
  CHECK(kill(pid, SIGUSR2) == 0);
  siginfo_t si = {};
  timespec tmo = {5, 0};
  CHECK(sigtimedwait(&block, &si, &tmo) == SIGUSR2);
  CHECK(si.si_pid == pid && si.si_code == SI_USER && si.si_uid == getuid());

  return conf::finish();
}
