// pipe2(2) between processes of one job: data flows both ways intact; EOF comes only when every
// write end in every process is closed (select(2) wakes for it); writing with no reader gives
// SIGPIPE (default action: death, shown by wait), EPIPE when SIGPIPE is ignored or caught; a
// blocking write larger than the pipe completes as the reader drains it; writes up to PIPE_BUF from
// two writers never interleave; O_NONBLOCK and F_GETPIPE_SZ; a three-process pipeline.
// socketpair(2) between processes: both directions, EOF after shutdown, EPIPE with MSG_NOSIGNAL,
// SOCK_SEQPACKET boundaries, and a descriptor passed from child to parent with SCM_RIGHTS.

#include <ctype.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/select.h>
#include <sys/socket.h>

#include <algorithm>
#include <string>
#include <vector>

#include "tree.h"

static unsigned char pattern(size_t i) {
  return static_cast<unsigned char>((i * 131 + i / 7) & 0xff);
}

static volatile sig_atomic_t pipeSignals;

static char* buf64() {
  static char buf[64];
  return buf;
}

static void onPipe(int) { pipeSignals = pipeSignals + 1; }

int main() {
  conf::deadline();
  struct sigaction ign = {};
  ign.sa_handler = SIG_IGN;
  CHECK(sigaction(SIGPIPE, &ign, nullptr) == 0);  // the parent sees EPIPE; children choose

  // 4 MiB to a child, whose check sum of them comes back; EOF when the parent closes.
  constexpr size_t SIZE = 4 << 20;
  int down[2];
  int up[2];
  CHECK(pipe2(down, O_CLOEXEC) == 0 && pipe2(up, O_CLOEXEC) == 0);
  pid_t child = conf::spawn([&] {
    close(down[1]);
    close(up[0]);
    std::vector<unsigned char> buf(65536);
    size_t total = 0;
    unsigned long sum = 0;
    bool same = true;
    while (true) {
      ssize_t r = read(down[0], buf.data(), buf.size());
      if (r < 0 && errno == EINTR) {
        continue;
      }
      if (r <= 0) {
        CHECK(r == 0);
        break;
      }
      for (ssize_t k = 0; k < r; k++) {
        same = same && buf[size_t(k)] == pattern(total + size_t(k));
        sum += buf[size_t(k)];
      }
      total += size_t(r);
    }
    CHECK(same);
    unsigned long reply[2] = {total, sum};
    CHECK(conf::writeFull(up[1], reply, sizeof reply));
    return 0;
  });
  close(down[0]);
  close(up[1]);
  std::vector<unsigned char> data(SIZE);
  unsigned long sum = 0;
  for (size_t i = 0; i < SIZE; i++) {
    data[i] = pattern(i);
    sum += data[i];
  }
  CHECK(write(down[1], data.data(), SIZE) == ssize_t(SIZE));  // one blocking write, completed
  close(down[1]);
  unsigned long reply[2] = {};
  CHECK(conf::readFull(up[0], reply, sizeof reply) == sizeof reply);
  CHECK(reply[0] == SIZE && reply[1] == sum);
  CHECK(conf::readFull(up[0], reply, 1) == 0);  // the child's end closed at its exit
  close(up[0]);
  conf::expectClean(child, "4 MiB reader");

  // No EOF while a child still holds a write end, even after the parent closed its own.
  int p[2];
  int hold[2];
  CHECK(pipe2(p, O_CLOEXEC) == 0 && pipe(hold) == 0);
  child = conf::spawn([&] {
    close(p[0]);
    close(hold[1]);
    conf::recvByte(hold[0]);
    return 0;
  });
  close(p[1]);
  close(hold[0]);
  struct pollfd pf = {p[0], POLLIN, 0};
  CHECK(poll(&pf, 1, 0) == 0);
  close(hold[1]);
  fd_set readable;
  FD_ZERO(&readable);
  FD_SET(p[0], &readable);
  struct timeval thirty = {30, 0};
  CHECK(select(p[0] + 1, &readable, nullptr, nullptr, &thirty) == 1 && FD_ISSET(p[0], &readable));
  char c;
  CHECK(read(p[0], &c, 1) == 0);
  close(p[0]);
  conf::expectClean(child, "write-end holder");

  // A child writing to a pipe without readers: killed by SIGPIPE (default), EPIPE with SIGPIPE
  // ignored, the handler and EPIPE with SIGPIPE caught.
  for (int mode = 0; mode < 3; mode++) {
    int q[2];
    int go[2];
    CHECK(pipe(q) == 0 && pipe(go) == 0);
    child = conf::spawn([&] {
      close(q[0]);
      close(go[1]);
      struct sigaction sa = {};
      sa.sa_handler = mode == 0 ? SIG_DFL : mode == 1 ? SIG_IGN : onPipe;
      sigemptyset(&sa.sa_mask);
      CHECK(sigaction(SIGPIPE, &sa, nullptr) == 0);
      conf::recvByte(go[0]);  // the parent has closed its read end
      CHECK_FAILS(write(q[1], "x", 1), EPIPE);
      CHECK(pipeSignals == (mode == 2 ? 1 : 0));
      return 0;
    });
    close(q[0]);
    close(q[1]);
    close(go[0]);
    CHECK(conf::sendByte(go[1]));
    close(go[1]);
    int status = conf::waitFor(child);
    if (mode == 0) {
      CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGPIPE);
    } else {
      CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
  }

  // The parent writes after its reader child exited: EPIPE (SIGPIPE ignored).
  CHECK(pipe(p) == 0);
  child = conf::spawn([&] {
    close(p[1]);
    return 0;
  });
  close(p[0]);
  conf::expectClean(child, "reader that leaves");
  CHECK_FAILS(write(p[1], "x", 1), EPIPE);
  close(p[1]);

  // Two writers of PIPE_BUF-sized records: every record arrives whole.
  CHECK(pipe(p) == 0);
  constexpr int RECORDS = 200;
  pid_t writers[2];
  for (int w = 0; w < 2; w++) {
    writers[w] = conf::spawn([&, w] {
      close(p[0]);
      std::vector<char> rec(PIPE_BUF, char('A' + w));
      for (int i = 0; i < RECORDS; i++) {
        CHECK(write(p[1], rec.data(), rec.size()) == PIPE_BUF);
      }
      return 0;
    });
  }
  close(p[1]);
  std::vector<char> rec(PIPE_BUF);
  int counts[2] = {0, 0};
  bool whole = true;
  while (conf::readFull(p[0], rec.data(), rec.size()) == PIPE_BUF) {
    int w = rec[0] - 'A';
    whole = whole && (w == 0 || w == 1) &&
            std::all_of(rec.begin(), rec.end(), [&](char x) { return x == rec[0]; });
    if (w == 0 || w == 1) {
      counts[w]++;
    }
  }
  CHECK(whole);
  CHECK(counts[0] == RECORDS && counts[1] == RECORDS);
  close(p[0]);
  conf::expectClean(writers[0], "writer A");
  conf::expectClean(writers[1], "writer B");

  // O_NONBLOCK: a child fills the pipe up to its size and gets EAGAIN.
  CHECK(pipe2(p, O_NONBLOCK) == 0);
  int size = fcntl(p[0], F_GETPIPE_SZ);
  CHECK(size >= 4096);
  child = conf::spawn([&] {
    close(p[0]);
    std::vector<char> chunk(4096, 'z');
    long written = 0;
    while (true) {
      ssize_t r = write(p[1], chunk.data(), chunk.size());
      if (r < 0) {
        CHECK(errno == EAGAIN);
        break;
      }
      written += r;
    }
    CHECK(written == size);
    return 0;
  });
  close(p[1]);
  conf::expectClean(child, "filler");
  std::vector<char> all(size_t(size) + 1);
  CHECK(read(p[0], all.data(), all.size()) == size);
  CHECK(read(p[0], all.data(), all.size()) == 0);  // EOF: the writer is gone
  close(p[0]);

  // A pipeline of three processes: parent -> upcase -> count -> parent.
  int a[2];
  int b[2];
  int r[2];
  CHECK(pipe(a) == 0 && pipe(b) == 0 && pipe(r) == 0);
  pid_t upcase = conf::spawn([&] {
    close(a[1]);
    close(b[0]);
    close(r[0]);
    close(r[1]);
    char buf[1000];
    ssize_t n;
    while ((n = conf::readFull(a[0], buf, sizeof buf)) > 0) {
      for (ssize_t k = 0; k < n; k++) {
        buf[k] = char(toupper(buf[k]));
      }
      CHECK(conf::writeFull(b[1], buf, size_t(n)));
    }
    return 0;
  });
  pid_t count = conf::spawn([&] {
    close(a[0]);
    close(a[1]);
    close(b[1]);
    close(r[0]);
    char buf[4096];
    ssize_t n;
    long upper = 0;
    long total = 0;
    while ((n = conf::readFull(b[0], buf, sizeof buf)) > 0) {
      for (ssize_t k = 0; k < n; k++) {
        upper += buf[k] == 'Q';
      }
      total += n;
    }
    long out[2] = {total, upper};
    CHECK(conf::writeFull(r[1], out, sizeof out));
    return 0;
  });
  close(a[0]);
  close(b[0]);
  close(b[1]);
  close(r[1]);
  std::string text;
  for (int i = 0; i < 50000; i++) {
    text += "the quick brown fox q\n";
  }
  CHECK(conf::writeFull(a[1], text.data(), text.size()));
  close(a[1]);
  long out[2] = {};
  CHECK(conf::readFull(r[0], out, sizeof out) == sizeof out);
  CHECK(out[0] == long(text.size()) && out[1] == 100000);
  close(r[0]);
  conf::expectClean(upcase, "upcase stage");
  conf::expectClean(count, "count stage");

  // socketpair: an echo child; shutdown(SHUT_WR) gives it EOF; it answers with a pipe of its
  // own, passed with SCM_RIGHTS, whose other end it writes to.
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  child = conf::spawn([&] {
    close(sv[0]);
    char buf[256];
    ssize_t got;
    long echoed = 0;
    while ((got = read(sv[1], buf, sizeof buf)) > 0) {
      CHECK(conf::writeFull(sv[1], buf, size_t(got)));
      echoed += got;
    }
    CHECK(got == 0 && echoed == 5000);
    int mine[2];
    CHECK(pipe(mine) == 0);
    char dummy = 'f';
    struct iovec iov = {&dummy, 1};
    alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    struct msghdr msg = {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    struct cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &mine[0], sizeof(int));
    CHECK(sendmsg(sv[1], &msg, 0) == 1);
    close(mine[0]);
    CHECK(conf::writeFull(mine[1], "via a passed fd", 15));
    close(mine[1]);
    return 0;
  });
  close(sv[1]);
  std::string sent;
  for (int i = 0; i < 500; i++) {
    sent += "0123456789";
  }
  std::string echo(sent.size(), '\0');
  for (size_t off = 0; off < sent.size(); off += 1000) {  // in steps: the echo cannot block
    CHECK(conf::writeFull(sv[0], sent.data() + off, 1000));
    CHECK(conf::readFull(sv[0], echo.data() + off, 1000) == 1000);
  }
  CHECK(echo == sent);
  CHECK(shutdown(sv[0], SHUT_WR) == 0);
  char dummy = 0;
  struct iovec iov = {&dummy, 1};
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  CHECK(recvmsg(sv[0], &msg, MSG_CMSG_CLOEXEC) == 1 && dummy == 'f');
  struct cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  int passed = -1;
  if (cm != nullptr && cm->cmsg_type == SCM_RIGHTS) {
    memcpy(&passed, CMSG_DATA(cm), sizeof(int));
  }
  CHECK(passed >= 0);
  char via[32] = {};
  CHECK(passed >= 0 && conf::readFull(passed, via, sizeof via) == 15);
  CHECK(memcmp(via, "via a passed fd", 15) == 0);
  close(passed);
  CHECK(conf::readFull(sv[0], &dummy, 1) == 0);  // EOF: the child is gone
  conf::expectClean(child, "socketpair echo");
  CHECK_FAILS(send(sv[0], "x", 1, MSG_NOSIGNAL), EPIPE);
  close(sv[0]);

  // SOCK_SEQPACKET keeps message boundaries between processes.
  CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) == 0);
  child = conf::spawn([&] {
    close(sv[0]);
    for (int len : {1, 300, 7}) {
      std::string m(size_t(len), char('a' + len % 26));
      CHECK(send(sv[1], m.data(), m.size(), 0) == len);
    }
    return 0;
  });
  close(sv[1]);
  for (int len : {1, 300, 7}) {
    char m[1024];
    CHECK(recv(sv[0], m, sizeof m, 0) == len);
  }
  CHECK(recv(sv[0], buf64(), 64, 0) == 0);
  conf::expectClean(child, "seqpacket sender");
  close(sv[0]);

  int status;
  CHECK_FAILS(wait(&status), ECHILD);
  return conf::finish();
}
