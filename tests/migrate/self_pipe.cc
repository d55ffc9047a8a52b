// A pipe whose both ends are the process's own (a self-pipe, as xz and event loops use) is
// recreated on resume at the same descriptor numbers, with O_NONBLOCK and close-on-exec as they
// were, and works: what is written to one end is read from the other.
#include <fcntl.h>

#include "zdtm.h"

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  int p[2];
  CHECK(pipe2(p, O_CLOEXEC) == 0);
  CHECK(dup3(p[0], 20, O_CLOEXEC) == 20);
  CHECK(dup2(p[1], 21) == 21);
  close(p[0]);
  close(p[1]);
  CHECK(fcntl(20, F_SETFL, O_NONBLOCK) == 0);

  zdtm::ready();
  zdtm::waitGo();

  CHECK_EQ(fcntl(20, F_GETFD), FD_CLOEXEC);
  CHECK_EQ(fcntl(21, F_GETFD), 0);
  CHECK(fcntl(20, F_GETFL) & O_NONBLOCK);
  CHECK(!(fcntl(21, F_GETFL) & O_NONBLOCK));
  CHECK_EQ(fcntl(20, F_GETFL) & O_ACCMODE, O_RDONLY);
  CHECK_EQ(fcntl(21, F_GETFL) & O_ACCMODE, O_WRONLY);
  char c;
  errno = 0;
  CHECK(read(20, &c, 1) == -1 && errno == EAGAIN);
  CHECK(write(21, "z", 1) == 1);
  CHECK(read(20, &c, 1) == 1 && c == 'z');
  return zdtm::finish();
}
