#include "supervisor.h"

#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <catch2/catch.hpp>

using mos::remote::jobProcFile;

TEST_CASE("the job's own /proc files are recognised under every name of the job",
          "[remote][proc]") {
  CHECK(jobProcFile("/proc/self/maps", 4242) == "maps");
  CHECK(jobProcFile("/proc/thread-self/status", 4242) == "status");
  CHECK(jobProcFile("/proc/4242/cmdline", 4242) == "cmdline");
  CHECK(jobProcFile("/proc/4242/task/4242/stat", 4242) == "stat");
  CHECK(jobProcFile("/proc/self/task/4242/smaps", 4242) == "smaps");
}

TEST_CASE("other /proc files and other processes stay at home", "[remote][proc]") {
  // Files that are right at home: the deputy is the job's home process.
  CHECK(jobProcFile("/proc/self/fd", 4242) == "");
  CHECK(jobProcFile("/proc/self/limits", 4242) == "");
  CHECK(jobProcFile("/proc/self/mountinfo", 4242) == "");
  // Another process, a prefix of the pid, and non-/proc paths.
  CHECK(jobProcFile("/proc/1/maps", 4242) == "");
  CHECK(jobProcFile("/proc/424/maps", 4242) == "");
  CHECK(jobProcFile("/proc/42420/maps", 4242) == "");
  CHECK(jobProcFile("/srv/proc/self/maps", 4242) == "");
  CHECK(jobProcFile("/proc/self/maps/x", 4242) == "");
}

TEST_CASE("interrupted calls answer the restart code of their native counterpart",
          "[remote][signal]") {
  CHECK(mos::remote::restartCode(__NR_read) == mos::remote::ERESTARTSYS);
  CHECK(mos::remote::restartCode(__NR_wait4) == mos::remote::ERESTARTSYS);
  CHECK(mos::remote::restartCode(__NR_poll) == mos::remote::ERESTARTNOHAND);
  CHECK(mos::remote::restartCode(__NR_pselect6) == mos::remote::ERESTARTNOHAND);
  CHECK(mos::remote::restartCode(__NR_epoll_wait) == mos::remote::ERESTARTNOHAND);
  CHECK(mos::remote::Answer::interrupted(__NR_read).value == -512);
}

TEST_CASE("signal masks are read from /proc status lines", "[remote][signal]") {
  sigset_t set, old;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  REQUIRE(sigprocmask(SIG_BLOCK, &set, &old) == 0);
  std::string status = mos::remote::readStatus(getpid());
  uint64_t blocked = mos::remote::statusMask(status, "SigBlk:");
  REQUIRE(sigprocmask(SIG_SETMASK, &old, nullptr) == 0);
  CHECK((blocked & (uint64_t{1} << (SIGUSR1 - 1))) != 0);
  CHECK(mos::remote::statusMask(status, "NoSuchKey:") == 0);
  CHECK(mos::remote::readStatus(-5) == "");
}
