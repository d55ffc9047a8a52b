// getpid(2), gettid, getppid, getuid, geteuid, getgid, getegid, getresuid, getresgid, getpgrp,
// getpgid, getsid, getgroups: the ids agree with each other and with /proc/self.

#include <grp.h>
#include <sys/syscall.h>
#include <sys/types.h>

#include <fstream>
#include <sstream>
#include <vector>

#include "check.h"

// The whitespace-separated fields of the line in /proc/self/status that starts with `key`.
static std::vector<long> statusField(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) {
      std::istringstream fields(line.substr(strlen(key)));
      std::vector<long> out;
      long v;
      while (fields >> v) {
        out.push_back(v);
      }
      return out;
    }
  }
  return {};
}

int main() {
  pid_t pid = getpid();
  CHECK(pid > 0);
  CHECK(syscall(SYS_gettid) == pid);  // single-threaded: the tid is the pid
  CHECK(syscall(SYS_getpid) == pid);
  char self[64] = {};
  CHECK(readlink("/proc/self", self, sizeof self - 1) > 0);
  CHECK(atoi(self) == pid);

  // /proc/self/stat: pid (comm) state ppid pgrp session ...
  std::ifstream statFile("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(statFile)), std::istreambuf_iterator<char>());
  size_t close = stat.rfind(')');
  CHECK(close != std::string::npos);
  std::istringstream rest(stat.substr(close + 2));
  char state;
  long ppid, pgrp, session;
  rest >> state >> ppid >> pgrp >> session;
  CHECK(atol(stat.c_str()) == pid);
  CHECK(getppid() == ppid);
  CHECK(getpgrp() == pgrp);
  CHECK(getpgid(0) == pgrp);
  CHECK(getpgid(pid) == pgrp);
  CHECK(getsid(0) == session);
  CHECK_FAILS(getpgid(-5), ESRCH);

  std::vector<long> uids = statusField("Uid:"), gids = statusField("Gid:");
  CHECK(uids.size() == 4 && gids.size() == 4);
  if (uids.size() == 4 && gids.size() == 4) {
    CHECK(getuid() == static_cast<uid_t>(uids[0]) && geteuid() == static_cast<uid_t>(uids[1]));
    CHECK(getgid() == static_cast<gid_t>(gids[0]) && getegid() == static_cast<gid_t>(gids[1]));
    uid_t r, e, s;
    CHECK(getresuid(&r, &e, &s) == 0 && r == getuid() && e == geteuid() &&
          s == static_cast<uid_t>(uids[2]));
    gid_t gr, ge, gs;
    CHECK(getresgid(&gr, &ge, &gs) == 0 && gr == getgid() && gs == static_cast<gid_t>(gids[2]));
  }
  std::vector<long> groups = statusField("Groups:");
  int n = getgroups(0, nullptr);
  CHECK(n == static_cast<int>(groups.size()));
  std::vector<gid_t> list(n + 1);
  CHECK(getgroups(n + 1, list.data()) == n);
  for (int i = 0; i < n && i < static_cast<int>(groups.size()); ++i) {
    CHECK(list[i] == static_cast<gid_t>(groups[i]));
  }
  if (n > 0) {
    CHECK_FAILS(getgroups(n - 1 == 0 ? -1 : n - 1, list.data()), EINVAL);
  }
  // Credential calls that change nothing succeed (GNU make does them around every child).
  uid_t uid = getuid(), euid = geteuid();
  gid_t gid = getgid(), egid = getegid();
  CHECK(setreuid(static_cast<uid_t>(-1), static_cast<uid_t>(-1)) == 0);
  CHECK(setresuid(uid, euid, static_cast<uid_t>(-1)) == 0);
  CHECK(setregid(gid, egid) == 0);
  CHECK(setresgid(static_cast<gid_t>(-1), egid, static_cast<gid_t>(-1)) == 0);
  CHECK(syscall(SYS_setfsuid, euid) == static_cast<long>(euid));
  CHECK(syscall(SYS_setfsgid, egid) == static_cast<long>(egid));
  CHECK(getuid() == uid && geteuid() == euid && getgid() == gid && getegid() == egid);
  return conf::finish();
}
