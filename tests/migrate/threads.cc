// Threads (what neither openMosix nor MOSIX could move): three threads, each in another state
// when the process is captured, come back with their thread ids, thread-local data, signal
// masks, sigaltstack, a thread-directed pending signal, and their blocked calls:
//   worker 0  blocked in read(2) of a pipe, with its own sigaltstack;
//   worker 1  waiting on a condition variable, SIGUSR1 blocked and pending on it alone;
//   worker 2  computing with floating point until a flag is set, SIGUSR2 handled.
// After go: each thread checks gettid() against the id it had, its thread-local value, its mask;
// worker 2 receives a pthread_kill'd SIGUSR2 in its own handler; worker 0 reads what main
// writes; pthread_join of all three returns their values (the clear-child-tid wake).
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>

#include <atomic>
#include <vector>

#include "zdtm.h"

namespace {

constexpr int WORKERS = 3;
thread_local long tls = 0;
pid_t tids[WORKERS];
std::atomic<int> started{0};
std::atomic<bool> go{false};
std::atomic<pid_t> usr2Tid{0};
int wake[2];
pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
bool condGo = false;
char altStack[64 * 1024];

pid_t tid() { return static_cast<pid_t>(syscall(SYS_gettid)); }

void onUsr2(int) { usr2Tid = tid(); }

void* worker(void* arg) {
  long i = reinterpret_cast<long>(arg);
  tids[i] = tid();
  tls = 1000 + i;
  long result = 0;
  if (i == 0) {
    stack_t ss{};
    ss.ss_sp = altStack;
    ss.ss_size = sizeof(altStack);
    CHECK(sigaltstack(&ss, nullptr) == 0);
    started++;
    char c = 0;
    CHECK(read(wake[0], &c, 1) == 1);  // blocked here when captured
    stack_t now{};
    CHECK(sigaltstack(nullptr, &now) == 0);
    CHECK(now.ss_sp == altStack && now.ss_size == sizeof(altStack));
    result = c;
  } else if (i == 1) {
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    CHECK(pthread_sigmask(SIG_BLOCK, &usr1, nullptr) == 0);
    pthread_mutex_lock(&lock);
    started++;
    while (!condGo) {
      pthread_cond_wait(&cond, &lock);
    }
    pthread_mutex_unlock(&lock);
    sigset_t pending;
    sigpending(&pending);
    CHECK(sigismember(&pending, SIGUSR1));
    int sig = 0;
    CHECK(sigwait(&usr1, &sig) == 0 && sig == SIGUSR1);
    result = 11;
  } else {
    started++;
    double x = 1.0;
    while (!go) {
      x = x * 1.0000001 + 0.5;
      if (x > 1e12) {
        x = 1.0;
      }
    }
    CHECK(x >= 1.0);
    while (usr2Tid == 0) {
      sched_yield();
    }
    CHECK_EQ(usr2Tid.load(), tids[2]);
    result = 22;
  }
  CHECK_EQ(tid(), tids[i]);
  CHECK_EQ(tls, 1000 + i);
  return reinterpret_cast<void*>(result);
}

}  // namespace

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  CHECK(pipe(wake) == 0);
  struct sigaction sa {};
  sa.sa_handler = onUsr2;
  CHECK(sigaction(SIGUSR2, &sa, nullptr) == 0);
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  CHECK(pthread_sigmask(SIG_BLOCK, &usr1, nullptr) == 0);  // main never takes it either
  pthread_t threads[WORKERS];
  for (long i = 0; i < WORKERS; ++i) {
    CHECK(pthread_create(&threads[i], nullptr, worker, reinterpret_cast<void*>(i)) == 0);
  }
  while (started < WORKERS) {
    sched_yield();
  }
  pthread_mutex_lock(&lock);  // worker 1 is inside pthread_cond_wait now
  pthread_mutex_unlock(&lock);
  CHECK(pthread_kill(threads[1], SIGUSR1) == 0);
  tls = 7;
  pid_t mainTid = tid();

  zdtm::ready();
  zdtm::waitGo();

  CHECK_EQ(tls, 7);
  CHECK(tid() == getpid());
  (void)mainTid;
  sigset_t pending;
  sigpending(&pending);
  CHECK(!sigismember(&pending, SIGUSR1));  // thread-directed: worker 1's alone
  go = true;
  CHECK(pthread_kill(threads[2], SIGUSR2) == 0);
  pthread_mutex_lock(&lock);
  condGo = true;
  pthread_cond_signal(&cond);
  pthread_mutex_unlock(&lock);
  CHECK(write(wake[1], "w", 1) == 1);
  long expected[WORKERS] = {'w', 11, 22};
  for (int i = 0; i < WORKERS; ++i) {
    void* result = nullptr;
    CHECK(pthread_join(threads[i], &result) == 0);
    CHECK_EQ(reinterpret_cast<long>(result), expected[i]);
  }
  return zdtm::finish();
}
