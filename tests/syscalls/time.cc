// clock_gettime(2), clock_getres, gettimeofday, time, nanosleep, clock_nanosleep, getitimer,
// setitimer, times, getrusage: through the vDSO and through the real syscall.

#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/times.h>
#include <time.h>

#include "check.h"

static double seconds(const timespec& t) { return t.tv_sec + t.tv_nsec / 1e9; }

int main() {
  timespec a, b, res;
  CHECK(clock_gettime(CLOCK_MONOTONIC, &a) == 0);
  CHECK(syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &b) == 0);  // not the vDSO
  CHECK(seconds(b) >= seconds(a));
  CHECK(clock_getres(CLOCK_MONOTONIC, &res) == 0 && res.tv_sec == 0 && res.tv_nsec > 0);
  CHECK(syscall(SYS_clock_getres, CLOCK_REALTIME, &res) == 0 && res.tv_nsec <= 1000000);
  CHECK_FAILS(syscall(SYS_clock_gettime, 12345, &a), EINVAL);

  timespec rt;
  timeval tv;
  CHECK(clock_gettime(CLOCK_REALTIME, &rt) == 0);
  CHECK(syscall(SYS_gettimeofday, &tv, nullptr) == 0);
  CHECK(tv.tv_sec - rt.tv_sec <= 1 && tv.tv_sec >= rt.tv_sec);
  time_t t = 0;
  CHECK(syscall(SYS_time, &t) == t && t - rt.tv_sec <= 1);

  // Sleeps last at least as long as asked.
  CHECK(clock_gettime(CLOCK_MONOTONIC, &a) == 0);
  timespec req = {0, 30 * 1000 * 1000};
  CHECK(nanosleep(&req, nullptr) == 0);
  CHECK(clock_gettime(CLOCK_MONOTONIC, &b) == 0);
  CHECK(seconds(b) - seconds(a) >= 0.029);
  timespec until = b;
  until.tv_nsec += 20 * 1000 * 1000;
  if (until.tv_nsec >= 1000000000) {
    until.tv_sec += 1;
    until.tv_nsec -= 1000000000;
  }
  CHECK(clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, nullptr) == 0);
  CHECK(clock_gettime(CLOCK_MONOTONIC, &a) == 0 && seconds(a) >= seconds(until));
  timespec bad = {0, 2000000000};
  CHECK_FAILS(nanosleep(&bad, nullptr), EINVAL);

  // An interval timer counts down (and is disarmed before it fires).
  itimerval it = {{0, 0}, {10, 0}}, cur, old;
  CHECK(setitimer(ITIMER_REAL, &it, nullptr) == 0);
  CHECK(getitimer(ITIMER_REAL, &cur) == 0);
  CHECK(cur.it_value.tv_sec <= 10 && cur.it_value.tv_sec >= 9);
  itimerval off = {};
  CHECK(setitimer(ITIMER_REAL, &off, &old) == 0 && old.it_value.tv_sec >= 9);
  CHECK(getitimer(ITIMER_REAL, &cur) == 0 && cur.it_value.tv_sec == 0 && cur.it_value.tv_usec == 0);

  // CPU time accounting sees a busy loop.
  volatile unsigned long spin = 0;
  timespec c0, c1;
  CHECK(clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0) == 0);
  do {
    for (int i = 0; i < 100000; ++i) {
      spin = spin + i;
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
  } while (seconds(c1) - seconds(c0) < 0.05);
  rusage ru;
  CHECK(getrusage(RUSAGE_SELF, &ru) == 0);
  CHECK(ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec + ru.ru_stime.tv_sec * 1000000 +
            ru.ru_stime.tv_usec >=
        40000);
  tms tm;
  CHECK(times(&tm) != static_cast<clock_t>(-1));
  CHECK(tm.tms_utime + tm.tms_stime >= 4 * sysconf(_SC_CLK_TCK) / 100);
  return conf::finish();
}
