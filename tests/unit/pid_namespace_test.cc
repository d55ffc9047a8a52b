// JobPidNamespace: the job's pid namespace on a remote node, its reaper, and setNextPid. Each
// case runs in a forked child (unshare(CLONE_NEWPID) changes the caller for good), which reports
// failures through its exit status. Needs root (CAP_SYS_ADMIN).

#include "pid_namespace.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

using mos::remote::JobPidNamespace;

namespace {

// NSpid of /proc/PID/status: the pid in each namespace, outermost first; empty when gone.
std::vector<int> nsPids(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("NSpid:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      std::vector<int> out;
      int v;
      while (fields >> v) {
        out.push_back(v);
      }
      return out;
    }
  }
  return {};
}

// Runs `body` in a forked child; returns its exit status (0: every check held).
template <typename F>
int inChild(F body) {
  pid_t pid = fork();
  if (pid == 0) {
    int code = 1;
    try {
      code = body();
    } catch (...) {
      code = 2;
    }
    _exit(code);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool gone(pid_t pid) {
  for (int i = 0; i < 500; i++) {  // 5 s
    if (kill(pid, 0) != 0) {
      return true;
    }
    usleep(10000);
  }
  return false;
}

}  // namespace

TEST_CASE("the reaper is pid 1 of a new namespace and children are born in it", "[remote][pidns]") {
  if (geteuid() != 0) {
    WARN("not root: pid namespaces need CAP_SYS_ADMIN; not tested");
    return;
  }
  CHECK(inChild([] {
          auto ns = JobPidNamespace::create();
          if (nsPids(ns.reaper()) != std::vector<int>{ns.reaper(), 1}) {
            return 10;
          }
          // setNextPid places the next child exactly.
          for (int want : {4242, 300, 4243, 100000}) {  // 100000: above a default pid_max
            if (ns.setNextPid(want) != 0) {
              return 11;
            }
            pid_t child = fork();
            if (child == 0) {
              _exit(getpid() == want ? 0 : 1);
            }
            if (nsPids(child) != std::vector<int>{child, want}) {
              return 12;
            }
            int status;
            waitpid(child, &status, 0);
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
              return 13;
            }
          }
          if (ns.setNextPid(1) != EINVAL || ns.setNextPid(-5) != EINVAL) {
            return 14;
          }
          return 0;
        }) == 0);
}

TEST_CASE("the reaper reaps orphans of the namespace", "[remote][pidns]") {
  if (geteuid() != 0) {
    WARN("not root: pid namespaces need CAP_SYS_ADMIN; not tested");
    return;
  }
  CHECK(inChild([] {
          auto ns = JobPidNamespace::create();
          int pipeFds[2], release[2];
          if (pipe(pipeFds) != 0 || pipe(release) != 0) {
            return 10;
          }
          pid_t child = fork();
          if (child == 0) {
            pid_t orphan = fork();
            if (orphan == 0) {
              char c;
              (void)!read(release[0], &c, 1);  // until the test lets it go
              _exit(0);
            }
            (void)!write(pipeFds[1], &orphan, sizeof(orphan));
            _exit(0);  // orphan is now the reaper's
          }
          int status;
          waitpid(child, &status, 0);
          pid_t orphanInNs;
          if (read(pipeFds[0], &orphanInNs, sizeof(orphanInNs)) != sizeof(orphanInNs)) {
            return 11;
          }
          // Find the orphan's node pid among the reaper's children.
          std::ifstream in("/proc/" + std::to_string(ns.reaper()) + "/task/" +
                           std::to_string(ns.reaper()) + "/children");
          pid_t orphan = 0;
          in >> orphan;
          if (orphan <= 0 || nsPids(orphan).back() != orphanInNs) {
            return 12;
          }
          (void)!write(release[1], "x", 1);
          return gone(orphan) ? 0 : 13;  // reaped: not even a zombie
        }) == 0);
}

TEST_CASE("ending the namespace kills its processes; the caller's death ends the reaper",
          "[remote][pidns]") {
  if (geteuid() != 0) {
    WARN("not root: pid namespaces need CAP_SYS_ADMIN; not tested");
    return;
  }
  int report[2];
  REQUIRE(pipe(report) == 0);
  CHECK(inChild([&] {
          auto ns = JobPidNamespace::create();
          pid_t child = fork();
          if (child == 0) {
            for (;;) {
              pause();
            }
          }
          pid_t reaper = ns.reaper();
          ns = JobPidNamespace();  // kills the reaper, and with it the child; reaps both
          if (kill(child, 0) == 0 || kill(reaper, 0) == 0) {
            return 10;
          }
          // A second namespace is not possible in this process (unshare once): its death must
          // take the reaper of the first one along, checked by the parent.
          return 0;
        }) == 0);
  // The supervisor dies without cleaning up: its reaper follows (PR_SET_PDEATHSIG).
  CHECK(inChild([&] {
          auto ns = JobPidNamespace::create();
          pid_t reaper = ns.reaper();
          (void)!write(report[1], &reaper, sizeof(reaper));
          _exit(0);
          return 0;
        }) == 0);
  pid_t reaper = 0;
  REQUIRE(read(report[0], &reaper, sizeof(reaper)) == sizeof(reaper));
  CHECK(gone(reaper));
  close(report[0]);
  close(report[1]);
}

TEST_CASE("a signal queued through the reaper keeps its si_pid", "[remote][pidns]") {
  if (geteuid() != 0) {
    WARN("not root: pid namespaces need CAP_SYS_ADMIN; not tested");
    return;
  }
  CHECK(inChild([] {
          auto ns = JobPidNamespace::create();
          if (ns.setNextPid(777) != 0) {
            return 10;
          }
          int ready[2];
          if (pipe(ready) != 0) {
            return 11;
          }
          pid_t child = fork();
          if (child == 0) {
            sigset_t set;
            sigemptyset(&set);
            sigaddset(&set, SIGCHLD);
            sigprocmask(SIG_BLOCK, &set, nullptr);
            (void)!write(ready[1], "r", 1);
            siginfo_t info = {};
            if (sigwaitinfo(&set, &info) != SIGCHLD) {
              _exit(1);
            }
            bool ok = info.si_code == SI_QUEUE && info.si_pid == 4321 && info.si_uid == 65534 &&
                      info.si_value.sival_int == 42;
            _exit(ok ? 0 : 2);
          }
          char r;
          if (read(ready[0], &r, 1) != 1) {
            return 12;
          }
          if (ns.queueSignal(777, SIGCHLD, 4321, 65534, 42) != 0) {
            return 13;
          }
          if (ns.queueSignal(99999, SIGCHLD, 1, 0, 0) != ESRCH) {
            return 14;
          }
          int status;
          waitpid(child, &status, 0);
          if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            return 20 + (WIFEXITED(status) ? WEXITSTATUS(status) : 9);
          }
          return 0;
        }) == 0);
}
