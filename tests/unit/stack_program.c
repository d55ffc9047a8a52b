/* A program with a known call stack at its one write(2): main -> outer -> inner -> write.
 * Built with -g -O0 (tests/unit/meson.build) for tests/unit/guest_stack_test.cc, which compares
 * the stack unwound at the trapped write with gdb's backtrace at the same syscall. It first
 * reads one byte from stdin, so a test can get ready while it waits; a second byte makes it
 * write again. */
#include <string.h>
#include <unistd.h>

__attribute__((noinline)) void inner(const char* text) {
  if (write(1, text, strlen(text)) < 0) {
    _exit(1);
  }
}

__attribute__((noinline)) void outer(const char* text) { inner(text); }

int main(void) {
  char c;
  if (read(0, &c, 1) < 0) {
    return 1;
  }
  outer("stack\n");
  if (read(0, &c, 1) == 1) {  /* a second byte: a second write, for a test that wants two */
    outer("stack\n");
  }
  return 0;
}
