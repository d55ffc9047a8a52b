// A read(2) of a pipe, blocked, interrupted by signals that another process of the job sends:
// with SA_RESTART the read goes on and returns the data written after the signals; without it
// the read fails with EINTR and the data written later arrives whole in the next read. A read
// that has consumed data returns it and is never repeated: a stream of numbered messages, each
// racing a signal, arrives in order, once, with no byte lost, in both modes. nanosleep(2) is
// never restarted after a handler: EINTR with the time left, even with SA_RESTART.

#include <fcntl.h>

#include <string>

#include "tree.h"

static int ackFd = -1;  // the handler acknowledges every signal here
static volatile sig_atomic_t handled;

static void onSignal(int) {
  handled = handled + 1;
  if (ackFd >= 0) {
    char c = 'a';
    (void)!write(ackFd, &c, 1);
  }
}

static void install(int sig, int flags) {
  struct sigaction sa = {};
  sa.sa_handler = onSignal;
  sa.sa_flags = flags;
  sigemptyset(&sa.sa_mask);
  CHECK(sigaction(sig, &sa, nullptr) == 0);
}

int main() {
  conf::deadline();
  pid_t parent = getpid();
  install(SIGUSR1, SA_RESTART);
  install(SIGUSR2, 0);

  // SA_RESTART: five signals, each acknowledged by the handler, while the parent is blocked in
  // one read; then the data. The read returns the data, not EINTR.
  int data[2];
  int ack[2];
  int ctl[2];
  CHECK(pipe(data) == 0 && pipe(ack) == 0 && pipe(ctl) == 0);
  ackFd = ack[1];
  handled = 0;
  pid_t child = conf::spawn([&] {
    close(data[0]);
    close(ack[1]);
    close(ctl[1]);
    CHECK(conf::recvByte(ctl[0]) == 'r');  // the parent is about to read
    for (int i = 0; i < 5; i++) {
      CHECK(kill(parent, SIGUSR1) == 0);
      CHECK(conf::recvByte(ack[0]) == 'a');
    }
    CHECK(conf::writeFull(data[1], "after the signals", 17));
    return 0;
  });
  close(data[1]);
  close(ctl[0]);
  CHECK(conf::sendByte(ctl[1], 'r'));
  char buf[64] = {};
  errno = 0;
  ssize_t n = read(data[0], buf, sizeof buf);
  CHECK(n == 17 && memcmp(buf, "after the signals", 17) == 0);
  CHECK(handled == 5);
  conf::expectClean(child, "SA_RESTART signaller");
  close(data[0]);
  close(ack[0]);
  close(ctl[1]);

  // No SA_RESTART: the read fails with EINTR. A signal that lands before the parent entered
  // read interrupts nothing, so the child signals again until the parent reports the EINTR.
  int result[2];
  CHECK(pipe(data) == 0 && pipe(ack) == 0 && pipe(result) == 0);
  ackFd = ack[1];
  handled = 0;
  child = conf::spawn([&] {
    close(data[0]);
    close(ack[1]);
    close(result[1]);
    do {
      CHECK(kill(parent, SIGUSR2) == 0);
      CHECK(conf::recvByte(ack[0]) == 'a');
    } while (!conf::readableWithin(result[0], 200));
    CHECK(conf::recvByte(result[0]) == 'E');
    CHECK(conf::writeFull(data[1], "written later", 13));
    return 0;
  });
  close(data[1]);
  close(result[0]);
  errno = 0;
  n = read(data[0], buf, sizeof buf);
  int err = errno;
  CHECK(n == -1 && err == EINTR);
  CHECK(handled >= 1);
  CHECK(conf::sendByte(result[1], n == -1 && err == EINTR ? 'E' : 'D'));
  memset(buf, 0, sizeof buf);
  CHECK(conf::readFull(data[0], buf, 13) == 13 && memcmp(buf, "written later", 13) == 0);
  CHECK(conf::readFull(data[0], buf, 1) == 0);
  conf::expectClean(child, "EINTR signaller");
  close(data[0]);
  close(ack[0]);
  close(result[1]);
  ackFd = -1;

  // nanosleep(2) is never restarted after a handler, SA_RESTART or not: EINTR, and the time
  // left. The child signals until the parent reports the EINTR (or the 20 s sleep ends).
  CHECK(pipe(ack) == 0 && pipe(result) == 0);
  ackFd = ack[1];
  child = conf::spawn([&] {
    close(ack[1]);
    close(result[1]);
    do {
      CHECK(kill(parent, SIGUSR1) == 0);  // the SA_RESTART handler
      CHECK(conf::recvByte(ack[0]) == 'a');
    } while (!conf::readableWithin(result[0], 200));
    return 0;
  });
  close(result[0]);
  struct timespec sleep20 = {20, 0};
  struct timespec left = {};
  errno = 0;
  int slept = nanosleep(&sleep20, &left);
  err = errno;
  CHECK(slept == -1 && err == EINTR);
  // The time left is at most the request (plus the timer's slack: the kernel reports the time
  // to the slack-extended expiry) and more than nothing.
  long leftNs = left.tv_sec * 1000000000L + left.tv_nsec;
  CHECK(leftNs > 0 && leftNs <= 20 * 1000000000L + 100000000L);
  CHECK(conf::sendByte(result[1], 'E'));
  conf::expectClean(child, "nanosleep signaller");
  close(ack[0]);
  close(result[1]);
  ackFd = -1;

  // Numbered messages, each racing a signal (sent before or after the write): every byte is
  // read exactly once. EINTR is allowed only without SA_RESTART and only with nothing read.
  for (int sig : {SIGUSR1, SIGUSR2}) {
    constexpr int MESSAGES = 300;
    int next[2];
    CHECK(pipe(data) == 0 && pipe(next) == 0);
    child = conf::spawn([&] {
      close(data[0]);
      close(next[1]);
      for (int i = 0; i < MESSAGES; i++) {
        char msg[16];
        snprintf(msg, sizeof msg, "m%06d;", i);
        if (i % 2 == 0) {
          CHECK(kill(parent, sig) == 0);
        }
        CHECK(conf::writeFull(data[1], msg, 8));
        if (i % 2 == 1) {
          CHECK(kill(parent, sig) == 0);
        }
        if (conf::recvByte(next[0]) != 'n') {
          return 1;
        }
      }
      return 0;
    });
    close(data[1]);
    close(next[0]);
    std::string got;
    int eintr = 0;
    for (int i = 0; i < MESSAGES; i++) {
      char want[16];
      snprintf(want, sizeof want, "m%06d;", i);
      while (got.size() < size_t(8 * (i + 1))) {
        char chunk[64];
        ssize_t r = read(data[0], chunk, sizeof chunk);
        if (r < 0 && errno == EINTR) {
          eintr++;
          continue;
        }
        if (r <= 0) {
          break;
        }
        got.append(chunk, size_t(r));
      }
      if (got.compare(size_t(8 * i), std::string::npos, want) != 0) {
        printf("message %d: got '%s' from offset %d\n", i, got.c_str() + 8 * i, 8 * i);
        ++conf::failures;
        break;
      }
      CHECK(conf::sendByte(next[1], 'n'));
    }
    close(next[1]);
    char extra;
    CHECK(conf::readFull(data[0], &extra, 1) == 0);  // nothing repeated after the last one
    CHECK(got.size() == size_t(8 * MESSAGES));
    if (sig == SIGUSR1) {
      CHECK(eintr == 0);
    }
    conf::expectClean(child, sig == SIGUSR1 ? "racing SA_RESTART" : "racing no-restart");
    close(data[0]);
  }

  return conf::finish();
}
