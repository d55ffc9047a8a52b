// stat(2), fstat, lstat, newfstatat, statx, statfs, fstatfs, access, faccessat, chmod, fchmod,
// fchmodat, utimensat, truncate, symlink: what the calls report matches what was done.

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/time.h>

#include "check.h"

int main() {
  std::string file = conf::tmpPath("f");
  std::string link = conf::tmpPath("l");
  int fd = open(file.c_str(), O_CREAT | O_RDWR, 0600);
  CHECK(fd >= 0);
  CHECK(write(fd, "12345", 5) == 5);

  struct stat a, b, c, d;
  CHECK(stat(file.c_str(), &a) == 0);
  CHECK(S_ISREG(a.st_mode) && a.st_size == 5 && (a.st_mode & 0777) == 0600);
  CHECK(a.st_uid == getuid() && a.st_nlink == 1);
  CHECK(fstat(fd, &b) == 0);
  CHECK(a.st_ino == b.st_ino && a.st_dev == b.st_dev);
  int dirfd = open(conf::tmpDir().c_str(), O_RDONLY | O_DIRECTORY);
  CHECK(dirfd >= 0);
  CHECK(fstatat(dirfd, "f", &c, 0) == 0 && c.st_ino == a.st_ino);
  CHECK(fstatat(fd, "", &d, AT_EMPTY_PATH) == 0 && d.st_ino == a.st_ino);

  struct statx sx;
  CHECK(statx(dirfd, "f", 0, STATX_BASIC_STATS, &sx) == 0);
  CHECK(sx.stx_size == 5 && sx.stx_ino == a.st_ino && S_ISREG(sx.stx_mode));

  CHECK(symlink("f", link.c_str()) == 0);
  CHECK(lstat(link.c_str(), &c) == 0 && S_ISLNK(c.st_mode) && c.st_size == 1);
  CHECK(stat(link.c_str(), &d) == 0 && d.st_ino == a.st_ino);
  char target[16] = {};
  CHECK(readlink(link.c_str(), target, sizeof target) == 1 && target[0] == 'f');
  CHECK(readlinkat(dirfd, "l", target, sizeof target) == 1);

  CHECK_FAILS(stat(conf::tmpPath("none").c_str(), &c), ENOENT);
  CHECK_FAILS(stat((file + "/x").c_str(), &c), ENOTDIR);
  CHECK_FAILS(stat("", &c), ENOENT);
  CHECK_FAILS(fstat(-5, &c), EBADF);
  std::string longName(300, 'n');
  CHECK_FAILS(stat(conf::tmpPath(longName.c_str()).c_str(), &c), ENAMETOOLONG);

  // Modes and times.
  CHECK(chmod(file.c_str(), 0640) == 0);
  CHECK(stat(file.c_str(), &c) == 0 && (c.st_mode & 0777) == 0640);
  CHECK(fchmod(fd, 0604) == 0);
  CHECK(fstat(fd, &c) == 0 && (c.st_mode & 0777) == 0604);
  CHECK(fchmodat(dirfd, "f", 0600, 0) == 0);
  CHECK(fstat(fd, &c) == 0 && (c.st_mode & 0777) == 0600);
  struct timespec times[2] = {{1000000, 0}, {2000000, 500}};
  CHECK(utimensat(dirfd, "f", times, 0) == 0);
  CHECK(stat(file.c_str(), &c) == 0);
  CHECK(c.st_atim.tv_sec == 1000000 && c.st_mtim.tv_sec == 2000000 && c.st_mtim.tv_nsec == 500);
  CHECK(futimens(fd, nullptr) == 0);  // utimensat(fd, NULL, NULL, 0): now
  CHECK(fstat(fd, &c) == 0 && c.st_mtim.tv_sec > 2000000);
  struct timeval tv[2] = {{3000000, 0}, {4000000, 0}};
  CHECK(utimes(file.c_str(), tv) == 0);
  CHECK(stat(file.c_str(), &c) == 0 && c.st_mtim.tv_sec == 4000000);

  CHECK(access(file.c_str(), R_OK | W_OK) == 0);
  CHECK(faccessat(dirfd, "f", F_OK, 0) == 0);
  CHECK_FAILS(access(conf::tmpPath("none").c_str(), F_OK), ENOENT);

  CHECK(truncate(file.c_str(), 2) == 0);
  CHECK(fstat(fd, &c) == 0 && c.st_size == 2);

  struct statfs fa, fb;
  CHECK(statfs(file.c_str(), &fa) == 0 && fa.f_bsize > 0);
  CHECK(fstatfs(fd, &fb) == 0 && fb.f_type == fa.f_type);
  CHECK_FAILS(statfs(conf::tmpPath("none").c_str(), &fa), ENOENT);
  close(fd);
  close(dirfd);
  return conf::finish();
}
