// A pipe whose both ends are the process's own (a self-pipe, as xz and event loops use) is
// recreated on resume at the same descriptor numbers, with O_NONBLOCK and close-on-exec as they
// were, with its capacity (256 KiB here) and the 100000 bytes that were queued in it when it was
// captured, and works: what is written to one end is read from the other. The original, whose
// pipe the capture drained and refilled, reads the same bytes.
#include <fcntl.h>

#include <vector>

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
  constexpr int QUEUED = 100000;
  CHECK(fcntl(21, F_SETPIPE_SZ, 256 * 1024) >= 256 * 1024);
  std::vector<unsigned char> sent(QUEUED);
  for (int i = 0; i < QUEUED; i++) {
    sent[i] = static_cast<unsigned char>(i * 7 + i / 251);
  }
  CHECK(write(21, sent.data(), QUEUED) == QUEUED);

  zdtm::ready();
  zdtm::waitGo();

  CHECK_EQ(fcntl(20, F_GETFD), FD_CLOEXEC);
  CHECK_EQ(fcntl(21, F_GETFD), 0);
  CHECK(fcntl(20, F_GETFL) & O_NONBLOCK);
  CHECK(!(fcntl(21, F_GETFL) & O_NONBLOCK));
  CHECK_EQ(fcntl(20, F_GETFL) & O_ACCMODE, O_RDONLY);
  CHECK_EQ(fcntl(21, F_GETFL) & O_ACCMODE, O_WRONLY);
  CHECK(fcntl(20, F_GETPIPE_SZ) >= 256 * 1024);
  std::vector<unsigned char> got(QUEUED + 1);
  CHECK_EQ(read(20, got.data(), got.size()), QUEUED);  // all of it queued, nothing more
  got.resize(QUEUED);
  CHECK(got == sent);
  char c;
  errno = 0;
  CHECK(read(20, &c, 1) == -1 && errno == EAGAIN);
  CHECK(write(21, "z", 1) == 1);
  CHECK(read(20, &c, 1) == 1 && c == 'z');
  return zdtm::finish();
}
