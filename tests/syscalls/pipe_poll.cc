// pipe(2), pipe2, poll, ppoll, select, pselect6, epoll_create1/ctl/wait/pwait, eventfd2,
// timerfd_create/settime/gettime, splice, tee, FIONREAD, lseek on a pipe.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/timerfd.h>
#include <time.h>

#include "check.h"

static double now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main() {
  int p[2];
  CHECK(pipe2(p, O_CLOEXEC) == 0);
  CHECK(fcntl(p[0], F_GETFD) == FD_CLOEXEC);
  int q[2];
  CHECK(pipe(q) == 0);
  CHECK(fcntl(q[1], F_GETFD) == 0);

  // Readiness follows the data.
  pollfd pf[2] = {{p[0], POLLIN, 0}, {q[1], POLLOUT, 0}};
  CHECK(poll(pf, 2, 0) == 1);
  CHECK(pf[0].revents == 0 && pf[1].revents == POLLOUT);
  CHECK(write(p[1], "xyz", 3) == 3);
  int avail = -1;
  CHECK(ioctl(p[0], FIONREAD, &avail) == 0 && avail == 3);
  CHECK(poll(pf, 2, 1000) == 2 && pf[0].revents == POLLIN);

  double t0 = now();
  pollfd none = {q[0], POLLIN, 0};
  timespec tmo = {0, 30 * 1000 * 1000};
  CHECK(ppoll(&none, 1, &tmo, nullptr) == 0);
  CHECK(now() - t0 >= 0.029);

  fd_set rd;
  FD_ZERO(&rd);
  FD_SET(p[0], &rd);
  FD_SET(q[0], &rd);
  timeval tv = {1, 0};
  CHECK(select((q[0] > p[0] ? q[0] : p[0]) + 1, &rd, nullptr, nullptr, &tv) == 1);
  CHECK(FD_ISSET(p[0], &rd) && !FD_ISSET(q[0], &rd));
  FD_ZERO(&rd);
  FD_SET(q[0], &rd);
  timespec ts = {0, 20 * 1000 * 1000};
  sigset_t mask;
  sigemptyset(&mask);
  t0 = now();
  CHECK(pselect(q[0] + 1, &rd, nullptr, nullptr, &ts, &mask) == 0);
  CHECK(now() - t0 >= 0.019);
  CHECK(!FD_ISSET(q[0], &rd));

  char buf[8] = {};
  CHECK(read(p[0], buf, sizeof buf) == 3 && memcmp(buf, "xyz", 3) == 0);
  CHECK_FAILS(lseek(p[0], 0, SEEK_SET), ESPIPE);

  // epoll keeps the caller's data word.
  int ep = epoll_create1(EPOLL_CLOEXEC);
  CHECK(ep >= 0);
  epoll_event ev = {};
  ev.events = EPOLLIN;
  ev.data.u64 = 0x1122334455667788ull;
  CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev) == 0);
  CHECK_FAILS(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev), EEXIST);
  epoll_event got[4];
  CHECK(epoll_wait(ep, got, 4, 0) == 0);
  CHECK(write(p[1], "!", 1) == 1);
  memset(got, 0, sizeof got);
  CHECK(epoll_wait(ep, got, 4, 1000) == 1);
  CHECK(got[0].events == EPOLLIN && got[0].data.u64 == 0x1122334455667788ull);
  CHECK(epoll_pwait(ep, got, 4, 0, &mask) == 1);
  CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, p[0], nullptr) == 0);
  CHECK(epoll_wait(ep, got, 4, 0) == 0);
  CHECK(read(p[0], buf, 1) == 1);

  // eventfd counts.
  int efd = eventfd(5, EFD_CLOEXEC | EFD_NONBLOCK);
  CHECK(efd >= 0);
  uint64_t v = 3;
  CHECK(write(efd, &v, 8) == 8);
  v = 0;
  CHECK(read(efd, &v, 8) == 8 && v == 8);
  CHECK_FAILS(read(efd, &v, 8), EAGAIN);

  // A timerfd fires once after 20 ms.
  int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
  CHECK(tfd >= 0);
  itimerspec its = {{0, 0}, {0, 20 * 1000 * 1000}}, old;
  t0 = now();
  CHECK(timerfd_settime(tfd, 0, &its, &old) == 0);
  CHECK(old.it_value.tv_sec == 0 && old.it_value.tv_nsec == 0);
  itimerspec cur;
  CHECK(timerfd_gettime(tfd, &cur) == 0 && cur.it_value.tv_nsec > 0);
  uint64_t expirations = 0;
  CHECK(read(tfd, &expirations, 8) == 8 && expirations == 1);
  CHECK(now() - t0 >= 0.019);

  // splice and tee move pipe data without copies through the caller.
  CHECK(write(p[1], "splice", 6) == 6);
  CHECK(tee(p[0], q[1], 6, 0) == 6);
  CHECK(splice(q[0], nullptr, p[1], nullptr, 6, 0) == 6);
  char twelve[13] = {};
  CHECK(read(p[0], twelve, 12) == 12 && std::string(twelve) == "splicesplice");

  // End of file and a broken pipe.
  close(p[1]);
  CHECK(read(p[0], buf, 1) == 0);
  signal(SIGPIPE, SIG_IGN);
  close(q[0]);
  CHECK_FAILS(write(q[1], "x", 1), EPIPE);
  close(p[0]);
  close(q[1]);
  close(ep);
  close(efd);
  close(tfd);
  return conf::finish();
}
