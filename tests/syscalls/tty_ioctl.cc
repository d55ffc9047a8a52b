// ioctl(2) on terminals (TIOCGPTN, TIOCSPTLCK, TCGETS, TCSETS, TIOCGWINSZ, TIOCSWINSZ, FIONREAD,
// TCFLSH, FIONBIO, FIOCLEX, TIOCGPGRP) through a pseudo-terminal pair, and ENOTTY elsewhere.

#include <fcntl.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <termios.h>

#include "check.h"

int main() {
  int master = posix_openpt(O_RDWR | O_NOCTTY);
  if (master < 0) {
    printf("no /dev/ptmx (%s): skipping\n", strerror(errno));
    return 77;
  }
  CHECK(grantpt(master) == 0);
  CHECK(unlockpt(master) == 0);  // TIOCSPTLCK
  const char* name = ptsname(master);  // TIOCGPTN
  CHECK(name != nullptr);
  unsigned ptn = 999;
  CHECK(ioctl(master, TIOCGPTN, &ptn) == 0);
  CHECK(name != nullptr && std::string(name) == "/dev/pts/" + std::to_string(ptn));
  int slave = open(name, O_RDWR | O_NOCTTY);
  CHECK(slave >= 0);
  CHECK(isatty(slave) == 1);  // TCGETS

  termios t;
  CHECK(tcgetattr(slave, &t) == 0);
  termios raw = t;
  cfmakeraw(&raw);
  cfsetospeed(&raw, B9600);
  CHECK(tcsetattr(slave, TCSANOW, &raw) == 0);
  termios back;
  CHECK(tcgetattr(slave, &back) == 0);
  CHECK((back.c_lflag & ICANON) == 0 && (back.c_lflag & ECHO) == 0);
  CHECK(cfgetospeed(&back) == B9600);

  winsize ws = {33, 101, 0, 0}, got = {};
  CHECK(ioctl(master, TIOCSWINSZ, &ws) == 0);
  CHECK(ioctl(slave, TIOCGWINSZ, &got) == 0 && got.ws_row == 33 && got.ws_col == 101);

  CHECK(write(master, "abc", 3) == 3);
  int avail = -1;
  // The tty layer moves data asynchronously (a kernel worker): wait for it, up to 30 s.
  for (int i = 0; i < 30000 && avail != 3; ++i) {
    CHECK(ioctl(slave, FIONREAD, &avail) == 0);
    if (avail != 3) {
      usleep(1000);
    }
  }
  CHECK(avail == 3);
  CHECK(tcflush(slave, TCIFLUSH) == 0);
  CHECK(ioctl(slave, FIONREAD, &avail) == 0 && avail == 0);

  int on = 1;
  CHECK(ioctl(slave, FIONBIO, &on) == 0);
  CHECK((fcntl(slave, F_GETFL) & O_NONBLOCK) != 0);
  char c;
  CHECK_FAILS(read(slave, &c, 1), EAGAIN);
  CHECK(ioctl(slave, FIOCLEX) == 0 && fcntl(slave, F_GETFD) == FD_CLOEXEC);
  CHECK(ioctl(slave, FIONCLEX) == 0 && fcntl(slave, F_GETFD) == 0);
  pid_t pgrp;
  CHECK_FAILS(ioctl(slave, TIOCGPGRP, &pgrp), ENOTTY);  // not our controlling terminal

  // Not a terminal.
  int p[2];
  CHECK(pipe(p) == 0);
  CHECK_FAILS(ioctl(p[0], TCGETS, &t), ENOTTY);
  CHECK(isatty(p[0]) == 0 && errno == ENOTTY);
  close(p[0]);
  close(p[1]);
  close(slave);
  close(master);
  return conf::finish();
}
