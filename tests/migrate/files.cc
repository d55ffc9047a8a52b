// Open home files are reopened by path on resume, at their numbers, offsets and flags: a file
// read from offset 37, an O_APPEND log, a close-on-exec descriptor at fd 50, a directory; the
// working directory and the umask come back too.
#include <fcntl.h>
#include <sys/stat.h>

#include "zdtm.h"

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  std::string data = zdtm::path("data.txt");
  {
    int fd = open(data.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    for (int i = 0; i < 100; ++i) {
      CHECK(write(fd, "0123456789", 10) == 10);
    }
    close(fd);
  }
  int reader = open(data.c_str(), O_RDONLY);
  CHECK(lseek(reader, 37, SEEK_SET) == 37);
  std::string logPath = zdtm::path("log.txt");
  int log = open(logPath.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  CHECK(write(log, "before\n", 7) == 7);
  int high = open(data.c_str(), O_RDWR | O_CLOEXEC);
  CHECK(dup3(high, 50, O_CLOEXEC) == 50);
  close(high);
  CHECK(lseek(50, 990, SEEK_SET) == 990);
  int dirFd = open(zdtm::dir.c_str(), O_RDONLY | O_DIRECTORY);
  CHECK(chdir(zdtm::dir.c_str()) == 0);
  umask(027);

  zdtm::ready();
  zdtm::waitGo();

  CHECK_EQ(lseek(reader, 0, SEEK_CUR), 37);
  char buf[8] = {};
  CHECK(read(reader, buf, 5) == 5);
  CHECK(memcmp(buf, "78901", 5) == 0);
  CHECK_EQ(fcntl(reader, F_GETFL) & O_ACCMODE, O_RDONLY);
  CHECK_EQ(fcntl(reader, F_GETFD), 0);

  CHECK(fcntl(log, F_GETFL) & O_APPEND);
  struct stat before;
  CHECK(fstat(log, &before) == 0);
  CHECK(write(log, "after\n", 6) == 6);
  struct stat after;
  CHECK(fstat(log, &after) == 0);
  CHECK_EQ(after.st_size, before.st_size + 6);

  CHECK_EQ(fcntl(50, F_GETFD), FD_CLOEXEC);
  CHECK_EQ(fcntl(50, F_GETFL) & O_ACCMODE, O_RDWR);
  CHECK_EQ(lseek(50, 0, SEEK_CUR), 990);
  CHECK(read(50, buf, 3) == 3);
  CHECK(memcmp(buf, "012", 3) == 0);

  struct stat st;
  CHECK(fstat(dirFd, &st) == 0 && S_ISDIR(st.st_mode));
  char cwd[4096];
  CHECK(getcwd(cwd, sizeof(cwd)) != nullptr);
  char real[4096];
  CHECK(realpath(zdtm::dir.c_str(), real) != nullptr);
  CHECK(strcmp(cwd, real) == 0);
  mode_t old = umask(0);
  CHECK_EQ(old, 027);
  // Nothing else is open but 0..2 and the ones above.
  for (int fd = 3; fd < 64; ++fd) {
    if (fd != reader && fd != log && fd != 50 && fd != dirFd) {
      if (fcntl(fd, F_GETFD) != -1) {
        printf("fd %d is open\n", fd);
        ++zdtm::failures;
      }
    }
  }
  return zdtm::finish();
}
