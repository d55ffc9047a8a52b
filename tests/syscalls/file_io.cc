// read(2), write(2), pread64, pwrite64, readv, writev, preadv, lseek, ftruncate, fsync,
// fdatasync, fallocate, copy_file_range, sendfile, open/creat errors: bytes land where they
// should and nowhere else.

#include <fcntl.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include <vector>

#include "check.h"

int main() {
  std::string path = conf::tmpPath("data");
  int fd = open(path.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  CHECK(fd >= 0);
  CHECK(write(fd, "hello world", 11) == 11);
  CHECK(lseek(fd, 0, SEEK_CUR) == 11);
  char buf[16];
  memset(buf, 'z', sizeof buf);
  CHECK(pread(fd, buf, 5, 6) == 5);
  CHECK(memcmp(buf, "world", 5) == 0);
  CHECK(buf[5] == 'z');
  CHECK(pwrite(fd, "HELLO", 5, 0) == 5);
  CHECK(lseek(fd, 0, SEEK_CUR) == 11);  // pwrite does not move the offset
  CHECK(lseek(fd, 0, SEEK_SET) == 0);

  // A read asking for more than is there returns what is there and leaves the rest alone.
  memset(buf, 'z', sizeof buf);
  CHECK(read(fd, buf, 8) == 8);
  CHECK(memcmp(buf, "HELLO wo", 8) == 0);
  memset(buf, 'z', sizeof buf);
  CHECK(read(fd, buf, 10) == 3);
  CHECK(memcmp(buf, "rldzzzzzzzzzzzzz", 16) == 0);
  CHECK(read(fd, buf, 10) == 0);

  // Vectored I/O.
  char a[3] = {'A', 'B', 'C'}, b[2] = {'D', 'E'};
  iovec out[2] = {{a, 3}, {b, 2}};
  CHECK(lseek(fd, 0, SEEK_END) == 11);
  CHECK(writev(fd, out, 2) == 5);
  char x[4] = {}, y[4] = {};
  iovec in[2] = {{x, 4}, {y, 4}};
  CHECK(preadv(fd, in, 2, 9) == 7);
  CHECK(memcmp(x, "ldAB", 4) == 0);
  CHECK(memcmp(y, "CDE", 3) == 0);
  CHECK(lseek(fd, 11, SEEK_SET) == 11);
  memset(x, 0, 4);
  memset(y, 0, 4);
  CHECK(readv(fd, in, 2) == 5);
  CHECK(memcmp(x, "ABCD", 4) == 0 && y[0] == 'E');

  // Size changes.
  CHECK(ftruncate(fd, 4) == 0);
  struct stat st;
  CHECK(fstat(fd, &st) == 0 && st.st_size == 4);
  CHECK(fsync(fd) == 0);
  CHECK(fdatasync(fd) == 0);
  int fa = fallocate(fd, 0, 0, 8192);
  if (fa == 0) {
    CHECK(fstat(fd, &st) == 0 && st.st_size == 8192);
    CHECK(ftruncate(fd, 4) == 0);
  } else {
    CHECK(errno == EOPNOTSUPP);
  }

  // A megabyte round trip: bigger than any single message buffer.
  std::vector<char> big(1 << 20), back(1 << 20);
  for (size_t i = 0; i < big.size(); ++i) {
    big[i] = static_cast<char>(i * 7 + i / 4096);
  }
  CHECK(pwrite(fd, big.data(), big.size(), 0) == static_cast<ssize_t>(big.size()));
  size_t got = 0;
  while (got < back.size()) {
    ssize_t n = pread(fd, back.data() + got, back.size() - got, got);
    if (n <= 0) {
      break;
    }
    got += n;
  }
  CHECK(got == back.size());
  CHECK(big == back);

  // Copies between files.
  std::string copy = conf::tmpPath("copy");
  int cfd = open(copy.c_str(), O_CREAT | O_RDWR | O_TRUNC, 0600);
  CHECK(cfd >= 0);
  loff_t inOff = 0, outOff = 0;
  CHECK(copy_file_range(fd, &inOff, cfd, &outOff, 1000, 0) == 1000);
  CHECK(inOff == 1000 && outOff == 1000);
  off_t sendOff = 1000;
  CHECK(lseek(cfd, 1000, SEEK_SET) == 1000);
  CHECK(sendfile(cfd, fd, &sendOff, 24) == 24);
  CHECK(sendOff == 1024);
  std::vector<char> c(1024);
  CHECK(pread(cfd, c.data(), c.size(), 0) == 1024);
  CHECK(memcmp(c.data(), big.data(), 1024) == 0);
  close(cfd);

  // Errors.
  CHECK_FAILS(syscall(SYS_read, fd, nullptr, 4), EFAULT);
  CHECK_FAILS(syscall(SYS_write, fd, nullptr, 4), EFAULT);
  CHECK_FAILS(syscall(SYS_read, fd, reinterpret_cast<void*>(8), 4), EFAULT);
  int ro = open(path.c_str(), O_RDONLY);
  CHECK(ro >= 0);
  CHECK_FAILS(write(ro, "x", 1), EBADF);
  close(ro);
  CHECK_FAILS(read(ro, buf, 1), EBADF);
  CHECK_FAILS(close(-1), EBADF);
  CHECK_FAILS(open(conf::tmpPath("missing").c_str(), O_RDONLY), ENOENT);
  CHECK_FAILS(open(path.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600), EEXIST);
  CHECK_FAILS(open((path + "/below").c_str(), O_RDONLY), ENOTDIR);
  int cr = creat(conf::tmpPath("created").c_str(), 0640);
  CHECK(cr >= 0);
  CHECK(fstat(cr, &st) == 0 && (st.st_mode & 0777) == (0640 & ~umask(022)));
  close(cr);
  close(fd);
  return conf::finish();
}
