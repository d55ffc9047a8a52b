// A process waiting in sigtimedwait(2) when it is checkpointed or moved. The kernel answers a
// woken sigtimedwait with EINTR, not a restart code, so the capture's ptrace interrupt would
// make the call fail where natively it times out: the capture issues it again (the syscall
// table's eintrWhenWoken). The program waits 100 ms at a time for a blocked SIGUSR1 until the
// harness says go, and every wait must time out (EAGAIN), never fail with EINTR, in the original
// and in the resumed process. Then a SIGUSR1 it sends itself is taken by the next wait.
#include <signal.h>

#include "zdtm.h"

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  CHECK(sigprocmask(SIG_BLOCK, &set, nullptr) == 0);
  zdtm::ready();
  std::string go = zdtm::path("go");
  int waits = 0;
  while (access(go.c_str(), F_OK) != 0 && waits < 1200) {
    timespec timeout{0, 100000000};
    errno = 0;
    int r = sigtimedwait(&set, nullptr, &timeout);
    if (r != -1 || errno != EAGAIN) {
      CHECK_EQ(r, -1);
      CHECK_EQ(errno, EAGAIN);
      break;
    }
    ++waits;
  }
  CHECK(waits < 1200);
  CHECK(kill(getpid(), SIGUSR1) == 0);
  timespec timeout{5, 0};
  siginfo_t info{};
  CHECK_EQ(sigtimedwait(&set, &info, &timeout), SIGUSR1);
  CHECK_EQ(info.si_pid, getpid());
  return zdtm::finish();
}
