// /proc/self: readlink of /proc/self/fd/N names the file that N is open on, and /proc/self/fd
// lists exactly 0, 1, 2 (those that are open) and the descriptors this program opened. Under
// mosrun this proves the deputy's own descriptors stay out of the job's fd table.

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include <set>

#include "check.h"

static std::set<int> listFds() {
  std::set<int> fds;
  int dfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  DIR* d = fdopendir(dfd);
  if (d == nullptr) {
    return fds;
  }
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') {
      fds.insert(atoi(e->d_name));
    }
  }
  fds.erase(dirfd(d));  // the listing's own descriptor
  closedir(d);
  return fds;
}

static std::string linkOf(int fd) {
  char buf[PATH_MAX];
  ssize_t n = readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), buf, sizeof buf);
  return n < 0 ? "" : std::string(buf, n);
}

int main() {
  // Nothing but the standard descriptors may be open when the program starts.
  std::set<int> expected;
  for (int fd = 0; fd < 1024; ++fd) {
    if (fcntl(fd, F_GETFD) != -1) {
      if (fd > 2) {
        printf("fd %d is open at start (%s)\n", fd, linkOf(fd).c_str());
        ++conf::failures;
      }
      expected.insert(fd);
    }
  }
  CHECK(listFds() == expected);

  char real[PATH_MAX];
  CHECK(realpath(conf::tmpDir().c_str(), real) != nullptr);
  std::string dir = real;
  int a = open((dir + "/a").c_str(), O_CREAT | O_RDWR, 0600);
  int b = open((dir + "/b").c_str(), O_CREAT | O_RDWR, 0600);
  int p[2];
  CHECK(pipe(p) == 0);
  int high = dup2(a, 100);
  CHECK(a >= 0 && b >= 0 && high == 100);
  expected.insert({a, b, p[0], p[1], high});
  CHECK(listFds() == expected);

  CHECK(linkOf(a) == dir + "/a");
  CHECK(linkOf(b) == dir + "/b");
  CHECK(linkOf(100) == dir + "/a");
  CHECK(linkOf(p[0]).rfind("pipe:[", 0) == 0);
  CHECK(linkOf(p[0]) == linkOf(p[1]));
  int viaProc = open(("/proc/self/fd/" + std::to_string(b)).c_str(), O_RDONLY);
  CHECK(viaProc >= 0);
  struct stat s1, s2;
  CHECK(fstat(viaProc, &s1) == 0 && fstat(b, &s2) == 0 && s1.st_ino == s2.st_ino);
  close(viaProc);

  // /dev/fd is /proc/self/fd.
  char buf[PATH_MAX];
  ssize_t n = readlink(("/dev/fd/" + std::to_string(a)).c_str(), buf, sizeof buf);
  CHECK(n > 0 && std::string(buf, n) == dir + "/a");

  close(100);
  close(p[0]);
  close(p[1]);
  expected.erase(100);
  expected.erase(p[0]);
  expected.erase(p[1]);
  CHECK(listFds() == expected);
  CHECK(linkOf(100) == "");

  // /proc/self/exe names this program.
  n = readlink("/proc/self/exe", buf, sizeof buf);
  CHECK(n > 0 && std::string(buf, n).find("proc_self") != std::string::npos);
  std::string exe(buf, n > 0 ? n : 0);
  close(a);
  close(b);

  // The files that describe the user part describe this program: its memory map names its
  // executable, its status and stat show its own pid and parent, its cmdline is its argv.
  auto slurp = [](const char* path) {
    std::string s;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    char chunk[4096];
    for (ssize_t r; fd >= 0 && (r = read(fd, chunk, sizeof chunk)) > 0;) {
      s.append(chunk, r);
    }
    if (fd >= 0) {
      close(fd);
    }
    return s;
  };
  CHECK(slurp("/proc/self/maps").find(exe) != std::string::npos);
  std::string pidLine = "\nPid:\t" + std::to_string(getpid()) + "\n";
  std::string ppidLine = "\nPPid:\t" + std::to_string(getppid()) + "\n";
  std::string status = slurp("/proc/self/status");
  CHECK(status.find(pidLine) != std::string::npos && status.find(ppidLine) != std::string::npos);
  std::string stat = slurp(("/proc/" + std::to_string(getpid()) + "/stat").c_str());
  CHECK(stat.rfind(std::to_string(getpid()) + " (", 0) == 0);
  std::string afterComm = stat.substr(stat.rfind(')') + 2);
  CHECK(afterComm.find(" " + std::to_string(getppid()) + " ") == 1);
  std::string cmdline = slurp("/proc/self/cmdline");
  CHECK(cmdline.find("proc_self") != std::string::npos);
  // openat2(2) opens the same files as open(2): the job's own maps and cmdline, byte for byte.
  // Both are opened before either is read, into static buffers, so nothing maps or unmaps memory
  // in between (a snapshot is taken at open under mosrun, the kernel renders them at read).
  static char viaOpen[1 << 20], viaOpenat2[1 << 20];
  auto readAll = [](int fd, char* buf, size_t cap) -> ssize_t {
    size_t have = 0;
    for (ssize_t r; have < cap && (r = read(fd, buf + have, cap - have)) > 0;) {
      have += r;
    }
    return static_cast<ssize_t>(have);
  };
  for (const char* file : {"/proc/self/maps", "/proc/self/cmdline"}) {
    struct open_how how = {};
    how.flags = O_RDONLY | O_CLOEXEC;
    int plain = open(file, O_RDONLY | O_CLOEXEC);
    int two = static_cast<int>(syscall(SYS_openat2, AT_FDCWD, file, &how, sizeof how));
    if (two < 0 && errno == ENOSYS) {
      close(plain);
      break;  // a kernel before 5.6
    }
    CHECK(plain >= 0 && two >= 0);
    ssize_t n1 = readAll(plain, viaOpen, sizeof viaOpen);
    ssize_t n2 = readAll(two, viaOpenat2, sizeof viaOpenat2);
    CHECK(n1 > 0 && n1 == n2 && memcmp(viaOpen, viaOpenat2, n1) == 0);
    if (n1 != n2 || memcmp(viaOpen, viaOpenat2, n1 > 0 ? n1 : 0) != 0) {
      printf("%s differs: open gave %zd bytes, openat2 %zd\n", file, n1, n2);
    }
    CHECK(fcntl(two, F_GETFD) == FD_CLOEXEC);
    close(plain);
    close(two);
  }
  {
    // openat2 of the job's maps names this program, not the process that stands in for it.
    struct open_how how = {};
    how.flags = O_RDONLY;
    int fd = static_cast<int>(syscall(SYS_openat2, AT_FDCWD, "/proc/self/maps", &how, sizeof how));
    if (fd >= 0) {
      ssize_t n = readAll(fd, viaOpenat2, sizeof viaOpenat2);
      CHECK(n > 0 && std::string(viaOpenat2, n).find(exe) != std::string::npos);
      close(fd);
    }
  }

  // Fds are what open would give: the lowest free one.
  int maps = open("/proc/self/maps", O_RDONLY);
  int next = dup(0);
  CHECK(maps >= 0 && next == maps + 1);
  close(next);
  close(maps);
  return conf::finish();
}
