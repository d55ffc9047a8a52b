// getrandom(2), sched_yield, sched_getaffinity, getcpu, prctl, xattrs (setxattr, getxattr,
// listxattr, removexattr and their f-variants), inotify.

#include <fcntl.h>
#include <sched.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/xattr.h>

#include "check.h"

int main() {
  unsigned char a[32] = {}, b[32] = {};
  CHECK(getrandom(a, sizeof a, 0) == sizeof a);
  CHECK(getrandom(b, sizeof b, GRND_NONBLOCK) == sizeof b);
  CHECK(memcmp(a, b, sizeof a) != 0);
  CHECK(sched_yield() == 0);
  cpu_set_t set;
  CHECK(sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) >= 1);
  unsigned cpu = 9999;
  CHECK(getcpu(&cpu, nullptr) == 0 && CPU_ISSET(cpu, &set));
  char name[16] = {};
  CHECK(prctl(PR_SET_NAME, "umosix-test") == 0);
  CHECK(prctl(PR_GET_NAME, name) == 0 && std::string(name) == "umosix-test");

  // Extended attributes (tmpfs and ext4 support user.*; others may not).
  std::string path = conf::tmpPath("x");
  int fd = open(path.c_str(), O_CREAT | O_RDWR, 0600);
  CHECK(fd >= 0);
  if (setxattr(path.c_str(), "user.umosix", "v1", 2, 0) == 0) {
    char v[16] = {};
    CHECK(getxattr(path.c_str(), "user.umosix", v, sizeof v) == 2 && std::string(v) == "v1");
    CHECK(getxattr(path.c_str(), "user.umosix", nullptr, 0) == 2);
    CHECK_FAILS(getxattr(path.c_str(), "user.umosix", v, 1), ERANGE);
    CHECK(fsetxattr(fd, "user.second", "value2", 6, XATTR_CREATE) == 0);
    CHECK_FAILS(fsetxattr(fd, "user.second", "x", 1, XATTR_CREATE), EEXIST);
    memset(v, 0, sizeof v);
    CHECK(fgetxattr(fd, "user.second", v, sizeof v) == 6 && std::string(v) == "value2");
    char names[64] = {};
    ssize_t n = listxattr(path.c_str(), names, sizeof names);
    CHECK(n == static_cast<ssize_t>(sizeof "user.umosix" + sizeof "user.second"));
    CHECK(flistxattr(fd, names, sizeof names) == n);
    CHECK(removexattr(path.c_str(), "user.umosix") == 0);
    CHECK(fremovexattr(fd, "user.second") == 0);
    CHECK_FAILS(getxattr(path.c_str(), "user.umosix", v, sizeof v), ENODATA);
    CHECK(listxattr(path.c_str(), names, sizeof names) == 0);
  } else {
    CHECK(errno == ENOTSUP);
    printf("note: no user xattrs on %s\n", conf::tmpDir().c_str());
  }
  close(fd);

  // inotify reports a file created in a watched directory, by name.
  int in = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  CHECK(in >= 0);
  int wd = inotify_add_watch(in, conf::tmpDir().c_str(), IN_CREATE);
  CHECK(wd >= 0);
  int nf = open(conf::tmpPath("created").c_str(), O_CREAT | O_WRONLY, 0600);
  close(nf);
  alignas(inotify_event) char ev[sizeof(inotify_event) + 64];
  ssize_t n = read(in, ev, sizeof ev);
  CHECK(n >= static_cast<ssize_t>(sizeof(inotify_event)));
  if (n >= static_cast<ssize_t>(sizeof(inotify_event))) {
    auto* e = reinterpret_cast<inotify_event*>(ev);
    CHECK(e->wd == wd && (e->mask & IN_CREATE) && std::string(e->name) == "created");
  }
  CHECK(inotify_rm_watch(in, wd) == 0);
  CHECK_FAILS(inotify_rm_watch(in, wd), EINVAL);
  close(in);
  return conf::finish();
}
