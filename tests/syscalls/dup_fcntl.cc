// dup(2), dup2, dup3, fcntl (F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL,
// F_SETLK, F_GETLK, F_OFD_SETLK, F_OFD_GETLK), flock, close_range.

#include <fcntl.h>
#include <sys/file.h>
#include <sys/syscall.h>

#include "check.h"

int main() {
  std::string path = conf::tmpPath("f");
  int fd = open(path.c_str(), O_CREAT | O_RDWR, 0600);
  CHECK(fd >= 3);
  int d = dup(fd);
  CHECK(d == fd + 1);  // the lowest free number
  CHECK(fcntl(d, F_GETFD) == 0);
  CHECK(dup2(fd, 40) == 40);
  CHECK(dup2(40, 40) == 40);
  CHECK(dup3(fd, 41, O_CLOEXEC) == 41);
  CHECK(fcntl(41, F_GETFD) == FD_CLOEXEC);
  CHECK_FAILS(dup3(fd, fd, 0), EINVAL);
  CHECK_FAILS(dup(-1), EBADF);
  CHECK_FAILS(dup2(99, 42), EBADF);
  CHECK(fcntl(fd, F_DUPFD, 50) == 50);
  CHECK(fcntl(fd, F_DUPFD_CLOEXEC, 50) == 51);
  CHECK(fcntl(51, F_GETFD) == FD_CLOEXEC);
  CHECK(fcntl(51, F_SETFD, 0) == 0 && fcntl(51, F_GETFD) == 0);

  // Descriptors share the open file description: offset and status flags.
  CHECK(write(fd, "abcdef", 6) == 6);
  CHECK(lseek(d, 0, SEEK_CUR) == 6);
  CHECK((fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDWR);
  CHECK(fcntl(d, F_SETFL, O_APPEND) == 0);
  CHECK((fcntl(fd, F_GETFL) & O_APPEND) != 0);
  CHECK_FAILS(fcntl(fd, 12345), EINVAL);

  // close_range closes exactly the range.
  CHECK(syscall(SYS_close_range, 40, 41, 0) == 0);
  CHECK_FAILS(fcntl(40, F_GETFD), EBADF);
  CHECK_FAILS(fcntl(41, F_GETFD), EBADF);
  CHECK(fcntl(50, F_GETFD) == 0);
  CHECK(syscall(SYS_close_range, 50, 51, 0) == 0);

  // Record locks: a process never conflicts with itself...
  struct flock lk = {};
  lk.l_type = F_WRLCK;
  lk.l_whence = SEEK_SET;
  lk.l_start = 0;
  lk.l_len = 10;
  CHECK(fcntl(fd, F_SETLK, &lk) == 0);
  struct flock q = lk;
  CHECK(fcntl(d, F_GETLK, &q) == 0 && q.l_type == F_UNLCK);
  lk.l_type = F_UNLCK;
  CHECK(fcntl(fd, F_SETLK, &lk) == 0);
  // ...but open file description locks on separate opens do.
  int other = open(path.c_str(), O_RDWR);
  CHECK(other >= 0);
  struct flock ofd = {};
  ofd.l_type = F_WRLCK;
  ofd.l_whence = SEEK_SET;
  ofd.l_start = 2;
  ofd.l_len = 3;
  CHECK(fcntl(fd, F_OFD_SETLK, &ofd) == 0);
  struct flock probe = {};
  probe.l_type = F_RDLCK;
  probe.l_whence = SEEK_SET;
  probe.l_start = 0;
  probe.l_len = 0;
  CHECK(fcntl(other, F_OFD_GETLK, &probe) == 0);
  CHECK(probe.l_type == F_WRLCK && probe.l_start == 2 && probe.l_len == 3 && probe.l_pid == -1);
  probe.l_type = F_RDLCK;
  probe.l_pid = 0;  // OFD requests must have l_pid 0
  CHECK_FAILS(fcntl(other, F_OFD_SETLK, &probe), EAGAIN);

  // flock locks follow the open file description too.
  CHECK(flock(fd, LOCK_EX) == 0);
  CHECK_FAILS(flock(other, LOCK_EX | LOCK_NB), EWOULDBLOCK);
  CHECK(flock(fd, LOCK_UN) == 0);
  CHECK(flock(other, LOCK_EX | LOCK_NB) == 0);
  close(other);
  close(d);
  close(fd);
  return conf::finish();
}
