// Calls that never block natively never fail with EINTR, whatever signals arrive: lseek, fstat,
// getcwd, getdents and getdents64 on a directory, run 20000 times each while a 200 µs
// ITIMER_REAL delivers SIGALRM to a handler installed without SA_RESTART (signal(7): only a call
// that waits can be interrupted). Under mosrun this fails today: a forwarded call interrupted by
// a guest-local signal before the supervisor has received its seccomp notification comes back
// ERESTARTSYS, which the handler turns into EINTR (docs/design.md, "Known limits").

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>

#include "check.h"

static volatile sig_atomic_t alarms;

static void onAlarm(int) { alarms = alarms + 1; }

int main() {
  struct sigaction sa = {};
  sa.sa_handler = onAlarm;  // no SA_RESTART
  sigemptyset(&sa.sa_mask);
  CHECK(sigaction(SIGALRM, &sa, nullptr) == 0);
  int file = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
  int dir = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  CHECK(file >= 0 && dir >= 0);
  struct itimerval every = {{0, 200}, {0, 200}};
  CHECK(setitimer(ITIMER_REAL, &every, nullptr) == 0);
  long eintr[4] = {};
  char buf[4096];
  for (int i = 0; i < 20000; i++) {
    struct stat st;
    if (lseek(file, 0, SEEK_SET) < 0 && errno == EINTR) {
      eintr[0]++;
    }
    if (fstat(file, &st) < 0 && errno == EINTR) {
      eintr[1]++;
    }
    if (getcwd(buf, sizeof(buf)) == nullptr && errno == EINTR) {
      eintr[2]++;
    }
    if (lseek(dir, 0, SEEK_SET) < 0 && errno == EINTR) {
      eintr[3]++;
    }
    if (syscall(SYS_getdents64, dir, buf, sizeof(buf)) < 0 && errno == EINTR) {
      eintr[3]++;
    }
    if (lseek(dir, 0, SEEK_SET) < 0 && errno == EINTR) {
      eintr[3]++;
    }
    if (syscall(SYS_getdents, dir, buf, sizeof(buf)) < 0 && errno == EINTR) {
      eintr[3]++;
    }
  }
  struct itimerval off = {};
  CHECK(setitimer(ITIMER_REAL, &off, nullptr) == 0);
  if (eintr[0] + eintr[1] + eintr[2] + eintr[3] != 0) {
    printf(
        "EINTR from calls that never block (%ld SIGALRM): lseek %ld, fstat %ld, getcwd %ld, "
        "getdents %ld\n",
        long(alarms), eintr[0], eintr[1], eintr[2], eintr[3]);
  }
  CHECK(eintr[0] == 0 && eintr[1] == 0 && eintr[2] == 0 && eintr[3] == 0);
  return conf::finish();
}
