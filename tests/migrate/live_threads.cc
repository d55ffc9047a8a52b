// A threaded job moved while it runs (tests/cluster/test_migrate_threads.py; issue 8): three
// threads, each in another state when the process is moved:
//   worker 0  blocked in read(2) of standard input (a pipe from the test: a forwarded read while
//             the job is remote), which gets the test's line after the move;
//   worker 1  waiting in pthread_cond_wait (a futex wait, local on a node);
//   worker 2  computing until main stops it.
// Usage: live_threads DIR. Prints "ready PID T0 T1 T2" (the workers' tids) once all three are in
// their states, then waits (a stat(2) of DIR/go every 10 ms: forwarded calls while remote). After
// go, each thread checks gettid() and its thread-local value against what it had, main wakes
// worker 1, stops worker 2 and joins all three (the clear-child-tid wake), and prints
//   seen T0 T1 T2        the tids as each thread sees itself after the moves
//   tls 1000 1001 1002   the thread-local values
//   read LINE            what worker 0 read
//   joined R0 11 22      the threads' results (R0: the number of bytes read)
// and exits 5.
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <string>

namespace {

constexpr int WORKERS = 3;
thread_local long tls = 0;
pid_t tids[WORKERS];
pid_t seen[WORKERS];
long tlsSeen[WORKERS];
std::atomic<int> started{0};
std::atomic<bool> stop{false};
pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
bool condGo = false;
char line[128];

pid_t tid() { return static_cast<pid_t>(syscall(SYS_gettid)); }

void* worker(void* arg) {
  long i = reinterpret_cast<long>(arg);
  tids[i] = tid();
  tls = 1000 + i;
  long result = 0;
  if (i == 0) {
    started++;
    ssize_t n = read(0, line, sizeof(line) - 1);  // blocked here during the moves
    result = n;
    if (n > 0) {
      line[n] = 0;
      if (line[n - 1] == '\n') {
        line[n - 1] = 0;
      }
    }
  } else if (i == 1) {
    pthread_mutex_lock(&lock);
    started++;
    while (!condGo) {
      pthread_cond_wait(&cond, &lock);
    }
    pthread_mutex_unlock(&lock);
    result = 11;
  } else {
    started++;
    double x = 1.0;
    while (!stop) {
      x = x * 1.0000001 + 0.5;
      if (x > 1e12) {
        x = 1.0;
      }
    }
    result = x >= 1.0 ? 22 : -1;
  }
  seen[i] = tid();
  tlsSeen[i] = tls;
  return reinterpret_cast<void*>(result);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  std::string go = std::string(argv[1]) + "/go";
  pthread_t threads[WORKERS];
  for (long i = 0; i < WORKERS; ++i) {
    if (pthread_create(&threads[i], nullptr, worker, reinterpret_cast<void*>(i)) != 0) {
      return 3;
    }
  }
  while (started < WORKERS) {
    sched_yield();
  }
  pthread_mutex_lock(&lock);  // worker 1 is inside pthread_cond_wait now
  pthread_mutex_unlock(&lock);
  tls = 7;
  printf("ready %d %d %d %d\n", getpid(), tids[0], tids[1], tids[2]);
  fflush(stdout);
  struct stat st;
  while (stat(go.c_str(), &st) != 0) {
    struct timespec ten = {0, 10 * 1000 * 1000};
    nanosleep(&ten, nullptr);
  }
  stop = true;
  pthread_mutex_lock(&lock);
  condGo = true;
  pthread_cond_signal(&cond);
  pthread_mutex_unlock(&lock);
  long results[WORKERS];
  for (int i = 0; i < WORKERS; ++i) {
    void* r = nullptr;
    if (pthread_join(threads[i], &r) != 0) {
      return 4;
    }
    results[i] = reinterpret_cast<long>(r);
  }
  printf("seen %d %d %d\n", seen[0], seen[1], seen[2]);
  printf("tls %ld %ld %ld main %ld %s\n", tlsSeen[0], tlsSeen[1], tlsSeen[2], tls,
         tid() == getpid() ? "leader" : "not-leader");
  printf("read %s\n", line);
  printf("joined %ld %ld %ld\n", results[0], results[1], results[2]);
  return 5;
}
