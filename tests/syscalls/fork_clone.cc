// clone(2) of a process with CLONE_PARENT_SETTID and CLONE_CHILD_SETTID: the kernel writes the
// child's pid into the parent's word and into the child's word. These words are written by the
// kernel that runs the process, so on a remote node they hold home pids only if the guest's
// kernel pid is its home pid. (CLONE_CHILD_CLEARTID acts only on memory shared with another
// thread, so it belongs to the thread programs.)

#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include <cstdint>

#include "family.h"

int main() {
  // The child's words live in shared memory so that the parent sees what the kernel wrote there.
  auto* words = static_cast<volatile int32_t*>(
      mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  CHECK(words != MAP_FAILED);
  int32_t parentWord = 0;
  words[0] = 0;  // CLONE_CHILD_SETTID target
  words[1] = 0;  // the child's own getpid()
  long r = syscall(SYS_clone, CLONE_PARENT_SETTID | CLONE_CHILD_SETTID | SIGCHLD, nullptr,
                   &parentWord, const_cast<int32_t*>(&words[0]), 0);
  if (r < 0 && errno == ENOSYS) {
    printf("clone: ENOSYS here; skipped\n");
    return 77;
  }
  if (r == 0) {
    words[1] = static_cast<int32_t>(syscall(SYS_getpid));
    _exit(0);
  }
  pid_t child = static_cast<pid_t>(r);
  CHECK(child > 0);
  CHECK(parentWord == child);
  int status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(words[0] == child);
  CHECK(words[1] == child);
  return conf::finish();
}
