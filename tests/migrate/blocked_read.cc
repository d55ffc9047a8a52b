// A process blocked in read(2) when it is checkpointed: the read is interrupted for the capture
// and issued again, both in the original, which goes on, and in the resumed process, whose
// standard input is the resuming mosrun's. run.py writes "go\n" to standard input at the end;
// the read must return it, never EINTR.
#include "zdtm.h"

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  zdtm::ready();
  char buf[8] = {};
  ssize_t n = read(0, buf, 3);
  CHECK_EQ(n, 3);
  CHECK(memcmp(buf, "go\n", 3) == 0);
  return zdtm::finish();
}
