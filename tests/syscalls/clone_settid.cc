// clone(2) with CLONE_PARENT_SETTID, CLONE_CHILD_SETTID and CLONE_CHILD_CLEARTID, and
// set_tid_address(2): every tid word the kernel writes equals the tid the child sees with gettid
// (and the pid clone returned); the CLEARTID word is zeroed and futex-woken when a child sharing
// the memory exits, which is how pthread_join works (checked with a CLONE_THREAD child too).

#include <linux/futex.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include "tree.h"

static pid_t parentTid;  // CLONE_PARENT_SETTID target
static pid_t childTid;   // CLONE_CHILD_SETTID target

static pid_t rawGettid() { return static_cast<pid_t>(syscall(SYS_gettid)); }

// clone(2) without CLONE_VM and without a new stack: the child continues here like a fork child.
static long rawClone(unsigned long flags, pid_t* ptid, pid_t* ctid) {
  return syscall(SYS_clone, flags, nullptr, ptid, ctid, nullptr);
}

// Waits (futex, bounded by the program's deadline) until *word becomes 0.
static bool waitCleared(volatile pid_t* word) {
  long end = conf::nowMs() + 30000;
  while (true) {
    pid_t v = *word;
    if (v == 0) {
      return true;
    }
    if (conf::nowMs() > end) {
      return false;
    }
    struct timespec oneSecond = {1, 0};
    syscall(SYS_futex, word, FUTEX_WAIT, v, &oneSecond, nullptr, 0);
  }
}

// What a CLONE_VM child saw, in the memory it shares with the parent.
struct Seen {
  volatile pid_t tid = -1;
  volatile pid_t pid = -1;
  volatile pid_t ctid = -1;
  volatile pid_t ptid = -1;
};

struct VmChild {
  Seen seen;
  volatile pid_t ptid = 0;
  volatile pid_t ctid = 0;
};

static int vmChildMain(void* arg) {
  auto* c = static_cast<VmChild*>(arg);
  c->seen.tid = rawGettid();
  c->seen.pid = static_cast<pid_t>(syscall(SYS_getpid));
  c->seen.ctid = c->ctid;
  c->seen.ptid = c->ptid;
  return 0;  // glibc's clone wrapper ends the task with exit(2): CLEARTID fires
}

int main() {
  conf::deadline();
  pid_t self = getpid();
  int report[2];
  CHECK(pipe(report) == 0);

  // CLONE_PARENT_SETTID: the parent's word holds the child's tid when clone returns.
  parentTid = 0;
  fflush(stdout);
  long r = rawClone(CLONE_PARENT_SETTID | SIGCHLD, &parentTid, nullptr);
  if (r == 0) {
    pid_t t = rawGettid();
    (void)!write(report[1], &t, sizeof t);
    syscall(SYS_exit_group, 0);
  }
  if (r < 0) {
    printf("clone: %s\n", conf::errnoName(errno));
    return 1;  // nothing below can run without clone
  }
  pid_t child = static_cast<pid_t>(r);
  CHECK(parentTid == child);
  pid_t seen = 0;
  CHECK(conf::readFull(report[0], &seen, sizeof seen) == sizeof seen);
  CHECK(seen == child && seen != self);
  int status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  // CLONE_CHILD_SETTID: the child's copy of the word holds its tid before it runs a single
  // instruction; the parent's copy is untouched.
  childTid = 0;
  fflush(stdout);
  r = rawClone(CLONE_CHILD_SETTID | SIGCHLD, nullptr, &childTid);
  if (r == 0) {
    pid_t words[2] = {childTid, rawGettid()};
    (void)!write(report[1], words, sizeof words);
    syscall(SYS_exit_group, 0);
  }
  CHECK(r > 0);
  child = static_cast<pid_t>(r);
  pid_t words[2] = {};
  CHECK(conf::readFull(report[0], words, sizeof words) == sizeof words);
  CHECK(words[0] == words[1]);
  CHECK(words[1] == child);
  CHECK(childTid == 0);
  status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  // set_tid_address(2) returns the caller's tid (in a child: the main thread's word is glibc's).
  pid_t pid = conf::spawn([] {
    static pid_t word;
    CHECK(syscall(SYS_set_tid_address, &word) == rawGettid());
    CHECK(rawGettid() == getpid());
    return 0;
  });
  conf::expectClean(pid, "set_tid_address child");

  // CLONE_VM with all three flags: the child's words equal its gettid; CLEARTID zeroes the word
  // and wakes the futex when the child exits.
  constexpr size_t STACK = 256 * 1024;
  void* stack = mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(stack != MAP_FAILED);
  auto* vm = new VmChild;
  vm->ctid = 0x7fffffff;  // CHILD_SETTID replaces it in the child, CHILD_CLEARTID zeroes it
  fflush(stdout);
  int c =
      clone(vmChildMain, static_cast<char*>(stack) + STACK,
            CLONE_VM | CLONE_PARENT_SETTID | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD,
            vm, &vm->ptid, nullptr, &vm->ctid);
  CHECK(c > 0);
  CHECK(vm->ptid == c);
  CHECK(waitCleared(&vm->ctid));
  status = conf::waitFor(c);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(vm->seen.tid == c && vm->seen.pid == c);
  CHECK(vm->seen.ctid == c && vm->seen.ptid == c);
  CHECK(vm->ctid == 0);

  // CLONE_THREAD, as pthread_create does it: one word for PARENT_SETTID and CHILD_CLEARTID; the
  // thread's tid differs from the pid it shares.
  auto* th = new VmChild;
  fflush(stdout);
  int t = clone(vmChildMain, static_cast<char*>(stack) + STACK,
                CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM |
                    CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID,
                th, &th->ctid, nullptr, &th->ctid);
  CHECK(t > 0 && t != self);
  CHECK(waitCleared(&th->ctid));
  CHECK(th->seen.tid == t && th->seen.pid == self);
  CHECK(th->seen.ctid == t);  // written by the parent's clone before the thread ran
  CHECK_FAILS(waitpid(t, &status, WNOHANG), ECHILD);  // a thread is not a child

  delete vm;
  delete th;
  munmap(stack, STACK);
  CHECK_FAILS(wait(&status), ECHILD);
  return conf::finish();
}
