// A process with a pipe and a socket open (beyond fds 0..2) can be checkpointed, but its
// checkpoint cannot be resumed: mosrun -R refuses it and names each descriptor (run.py checks
// the message). The original runs on unharmed.
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
  zdtm::ready();
  zdtm::waitGo();
  char c = 0;
  CHECK(read(7, &c, 1) == 1 && c == 'x');
  return zdtm::finish();
}
