// fork(2), vfork(2), wait4(2), waitid(2), getppid, kill between parent and child: fork returns
// the child's pid, which the child sees as its own getpid and as the tid word of
// CLONE_CHILD_SETTID (glibc caches it); memory is copied; exit statuses, deaths by signal and
// stops travel through wait4/waitid; SIGCHLD reaches the parent with the child's pid.

#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#include "family.h"

static volatile sig_atomic_t chldPid;
static volatile sig_atomic_t chldCount;

static void onChld(int, siginfo_t* info, void*) {
  chldPid = info->si_pid;
  chldCount = chldCount + 1;
}

int main() {
  pid_t self = getpid();
  struct sigaction sa = {};
  sa.sa_sigaction = onChld;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  CHECK(sigaction(SIGCHLD, &sa, nullptr) == 0);

  // Memory is copied, ids are the child's own, the exit status comes back.
  int value = 1;
  int sync[2];
  CHECK(pipe(sync) == 0);
  pid_t child = conf::forkOrSkip();
  if (child == 0) {
    value = 2;
    bool ok = getppid() == self && getpid() != self &&
              getpid() == static_cast<pid_t>(syscall(SYS_gettid));
    char report = ok ? 'y' : 'n';
    (void)!write(sync[1], &report, 1);
    _exit(42);
  }
  CHECK(child > 0 && child != self);
  char report = 0;
  CHECK(read(sync[0], &report, 1) == 1 && report == 'y');
  int status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 42);
  CHECK(value == 1);
  CHECK(chldCount >= 1 && chldPid == child);
  CHECK_FAILS(waitpid(child, &status, WNOHANG), ECHILD);

  // Death by a signal, with a core flag off (RLIMIT_CORE 0).
  struct rlimit noCore = {0, 0};
  CHECK(setrlimit(RLIMIT_CORE, &noCore) == 0);
  child = conf::forkOrSkip();
  if (child == 0) {
    pause();
    _exit(0);
  }
  CHECK(kill(child, SIGTERM) == 0);
  status = conf::waitFor(child);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM && !WCOREDUMP(status));

  // Stop and continue reported by waitid; rusage and status by wait4.
  child = conf::forkOrSkip();
  if (child == 0) {
    for (;;) {
      pause();
    }
  }
  CHECK(kill(child, SIGSTOP) == 0);
  siginfo_t info = {};
  CHECK(waitid(P_PID, child, &info, WSTOPPED) == 0);
  CHECK(info.si_pid == child && info.si_code == CLD_STOPPED && info.si_status == SIGSTOP);
  CHECK(kill(child, SIGCONT) == 0);
  info = {};
  CHECK(waitid(P_PID, child, &info, WCONTINUED) == 0);
  CHECK(info.si_pid == child && info.si_code == CLD_CONTINUED);
  CHECK(kill(child, SIGKILL) == 0);
  struct rusage usage;
  CHECK(wait4(child, &status, 0, &usage) == child);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

  // vfork: the parent resumes after the child's _exit, and sees what the child wrote.
  volatile int shared = 0;
  child = vfork();
  if (child < 0 && errno == ENOSYS) {
    printf("vfork: ENOSYS here; skipped\n");
    return 77;
  }
  if (child == 0) {
    shared = 7;
    _exit(3);
  }
  CHECK(shared == 7);
  status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 3);

  // A shared anonymous mapping is shared across fork.
  auto* word = static_cast<volatile int*>(
      mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  CHECK(word != MAP_FAILED);
  *word = 0;
  child = conf::forkOrSkip();
  if (child == 0) {
    *word = 99;
    _exit(0);
  }
  status = conf::waitFor(child);
  CHECK(WIFEXITED(status) && *word == 99);

  // No child left.
  CHECK_FAILS(wait(&status), ECHILD);
  return conf::finish();
}
