// Signal dispositions (handler, flags, mask), SIG_IGN and the alternate signal stack survive a
// checkpoint: afterwards a SIGUSR2 runs its handler on the alternate stack with SIGTERM
// blocked, SIGPIPE is still ignored, SIGHUP still has its plain handler.
#include <signal.h>

#include <cstdint>

#include "zdtm.h"

static uint8_t altStack[65536];
static volatile int usr2Runs = 0;
static volatile int onAltStack = 0;
static volatile int termBlocked = 0;
static volatile int hupRuns = 0;

static void onUsr2(int, siginfo_t* info, void*) {
  uint8_t local;
  onAltStack = &local >= altStack && &local < altStack + sizeof(altStack);
  sigset_t now;
  sigprocmask(SIG_BLOCK, nullptr, &now);
  termBlocked = sigismember(&now, SIGTERM);
  usr2Runs = usr2Runs + 1;
}

static void onHup(int) { hupRuns = hupRuns + 1; }

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  stack_t ss{};
  ss.ss_sp = altStack;
  ss.ss_size = sizeof(altStack);
  CHECK(sigaltstack(&ss, nullptr) == 0);
  struct sigaction sa {};
  sa.sa_sigaction = onUsr2;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGTERM);
  CHECK(sigaction(SIGUSR2, &sa, nullptr) == 0);
  struct sigaction hup {};
  hup.sa_handler = onHup;
  CHECK(sigaction(SIGHUP, &hup, nullptr) == 0);
  CHECK(signal(SIGPIPE, SIG_IGN) != SIG_ERR);
  struct sigaction before;
  sigaction(SIGUSR2, nullptr, &before);

  zdtm::ready();
  zdtm::waitGo();

  struct sigaction now;
  CHECK(sigaction(SIGUSR2, nullptr, &now) == 0);
  CHECK(now.sa_sigaction == onUsr2);
  CHECK_EQ(now.sa_flags, before.sa_flags);
  CHECK(sigismember(&now.sa_mask, SIGTERM));
  CHECK(sigaction(SIGPIPE, nullptr, &now) == 0);
  CHECK(now.sa_handler == SIG_IGN);
  CHECK(sigaction(SIGINT, nullptr, &now) == 0);
  CHECK(now.sa_handler == SIG_DFL);
  stack_t cur{};
  CHECK(sigaltstack(nullptr, &cur) == 0);
  CHECK(cur.ss_sp == altStack);
  CHECK_EQ(cur.ss_size, sizeof(altStack));
  CHECK_EQ(cur.ss_flags, 0);

  CHECK(raise(SIGUSR2) == 0);
  CHECK_EQ(usr2Runs, 1);
  CHECK(onAltStack);
  CHECK(termBlocked);
  CHECK(raise(SIGPIPE) == 0);
  CHECK(raise(SIGHUP) == 0);
  CHECK_EQ(hupRuns, 1);
  return zdtm::finish();
}
