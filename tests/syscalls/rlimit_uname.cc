// uname(2), sysinfo, getrlimit, setrlimit, prlimit64, getpriority, setpriority.

#include <sys/resource.h>
#include <sys/sysinfo.h>
#include <sys/utsname.h>

#include <fstream>

#include "check.h"

static std::string firstLine(const char* path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  return s;
}

int main() {
  utsname u;
  CHECK(uname(&u) == 0);
  CHECK(std::string(u.sysname) == "Linux");
  CHECK(std::string(u.machine) == "x86_64");
  CHECK(std::string(u.nodename) == firstLine("/proc/sys/kernel/hostname"));
  CHECK(std::string(u.release) == firstLine("/proc/sys/kernel/osrelease"));

  struct sysinfo si;
  CHECK(sysinfo(&si) == 0);
  CHECK(si.totalram > 0 && si.mem_unit > 0 && si.procs > 0);
  double up = atof(firstLine("/proc/uptime").c_str());
  CHECK(si.uptime >= static_cast<long>(up) - 2 && si.uptime <= static_cast<long>(up) + 2);

  rlimit lim, again;
  CHECK(getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur > 64);
  CHECK(prlimit(0, RLIMIT_NOFILE, nullptr, &again) == 0);
  CHECK(again.rlim_cur == lim.rlim_cur && again.rlim_max == lim.rlim_max);
  rlimit low = {64, lim.rlim_max};
  CHECK(setrlimit(RLIMIT_NOFILE, &low) == 0);
  CHECK(dup2(0, 63) == 63);
  CHECK_FAILS(dup2(0, 64), EBADF);
  close(63);
  rlimit previous;
  CHECK(prlimit(0, RLIMIT_NOFILE, &lim, &previous) == 0 && previous.rlim_cur == 64);
  CHECK(getrlimit(RLIMIT_NOFILE, &again) == 0 && again.rlim_cur == lim.rlim_cur);
  rlimit tooHigh = {lim.rlim_max, lim.rlim_max == RLIM_INFINITY ? lim.rlim_max : lim.rlim_max - 1};
  if (lim.rlim_max != RLIM_INFINITY) {
    CHECK_FAILS(setrlimit(RLIMIT_NOFILE, &tooHigh), EINVAL);
  }
  CHECK_FAILS(getrlimit(static_cast<__rlimit_resource>(999), &again), EINVAL);

  errno = 0;
  int nice0 = getpriority(PRIO_PROCESS, 0);
  CHECK(errno == 0);
  if (nice0 < 19) {
    CHECK(setpriority(PRIO_PROCESS, 0, nice0 + 1) == 0);
    CHECK(getpriority(PRIO_PROCESS, 0) == nice0 + 1);
  }
  return conf::finish();
}
