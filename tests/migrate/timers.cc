// Interval timers survive a checkpoint: ITIMER_REAL and ITIMER_VIRTUAL keep their intervals and
// go on from what was left of their values (the time the process spent checkpointed does not
// count); a disarmed ITIMER_PROF stays disarmed. A fast ITIMER_REAL keeps firing afterwards.
#include <signal.h>
#include <sys/time.h>

#include "zdtm.h"

static volatile int alarms = 0;
static void onAlarm(int) { alarms = alarms + 1; }

static long long us(const timeval& tv) { return tv.tv_sec * 1000000LL + tv.tv_usec; }

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  struct sigaction sa {};
  sa.sa_handler = onAlarm;
  sa.sa_flags = SA_RESTART;
  CHECK(sigaction(SIGALRM, &sa, nullptr) == 0);
  itimerval real{{50, 0}, {100, 0}};
  CHECK(setitimer(ITIMER_REAL, &real, nullptr) == 0);
  itimerval virt{{300, 0}, {500, 0}};
  CHECK(setitimer(ITIMER_VIRTUAL, &virt, nullptr) == 0);

  zdtm::ready();
  zdtm::waitGo();

  itimerval now{};
  CHECK(getitimer(ITIMER_REAL, &now) == 0);
  CHECK_EQ(us(now.it_interval), 50000000LL);
  CHECK(us(now.it_value) > 0 && us(now.it_value) <= 101000000LL);  // + a tick of rounding
  CHECK(getitimer(ITIMER_VIRTUAL, &now) == 0);
  CHECK_EQ(us(now.it_interval), 300000000LL);
  CHECK(us(now.it_value) > 0 && us(now.it_value) <= 501000000LL);
  CHECK(getitimer(ITIMER_PROF, &now) == 0);
  CHECK_EQ(us(now.it_interval), 0);
  CHECK_EQ(us(now.it_value), 0);
  CHECK_EQ(alarms, 0);

  itimerval fast{{0, 1000}, {0, 1000}};
  CHECK(setitimer(ITIMER_REAL, &fast, nullptr) == 0);
  for (int i = 0; i < 10000 && alarms < 5; ++i) {
    timespec ts{0, 1000000};
    nanosleep(&ts, nullptr);
  }
  CHECK(alarms >= 5);
  return zdtm::finish();
}
