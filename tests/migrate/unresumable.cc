// A process with a pipe to another process and a socket open (beyond fds 0..2) can be
// checkpointed, but its checkpoint cannot be resumed: mosrun -R refuses it and names each of
// those descriptors, and not the pipe of its own that holds unread data, which the image carries
// (run.py checks the messages). The original runs on unharmed and reads that data.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>

#include "zdtm.h"

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  int p[2];
  CHECK(pipe(p) == 0);
  CHECK(dup2(p[0], 7) == 7);
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  CHECK(dup2(sv[0], 8) == 8);
  CHECK(write(p[1], "x", 1) == 1);
  // A pipe whose write end belongs to a child that waits.
  int q[2];
  CHECK(pipe(q) == 0);
  pid_t child = fork();
  if (child == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives a failed test
    close(q[0]);
    pause();
    _exit(0);
  }
  close(q[1]);
  CHECK(dup2(q[0], 12) == 12);
  close(q[0]);
  zdtm::ready();
  zdtm::waitGo();
  char c = 0;
  CHECK(read(7, &c, 1) == 1 && c == 'x');
  kill(child, SIGKILL);
  return zdtm::finish();
}
