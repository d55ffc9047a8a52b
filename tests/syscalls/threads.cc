// Threads: pthread_create/join/detach/exit/cancel, gettid distinct per thread and listed in
// /proc/self/task, getpid shared; a thread blocked in read(2) of a pipe never blocks its
// siblings (one computes and exits meanwhile); tgkill(2) reaches exactly the thread it names; a
// signal without SA_RESTART interrupts only the read of the thread it was sent to; pthread_cancel
// of a thread blocked in read runs its cleanup; a robust mutex held by a thread that exits;
// futex-based mutex and condition variable.

#include <dirent.h>
#include <pthread.h>
#include <sys/syscall.h>

#include <atomic>
#include <set>

#include "tree.h"

static pid_t rawGettid() { return static_cast<pid_t>(syscall(SYS_gettid)); }

struct Reader {
  int pipe[2] = {-1, -1};
  pthread_t thread{};
  std::atomic<pid_t> tid{0};
  std::atomic<pid_t> pid{0};
  std::atomic<bool> done{false};
  ssize_t got = -2;
  int err = 0;
  char buf[64] = {};
};

static void* readerMain(void* arg) {
  auto* r = static_cast<Reader*>(arg);
  r->pid = getpid();
  r->tid = rawGettid();
  ssize_t n = read(r->pipe[0], r->buf, sizeof r->buf);
  r->err = errno;
  r->got = n;
  r->done = true;
  return nullptr;
}

// Sums the primes below `limit` by trial division: a thread that computes for a while.
static void* computeMain(void* arg) {
  long limit = reinterpret_cast<long>(arg);
  long sum = 0;
  for (long n = 2; n < limit; n++) {
    bool prime = true;
    for (long d = 2; d * d <= n; d++) {
      if (n % d == 0) {
        prime = false;
        break;
      }
    }
    if (prime) {
      sum += n;
    }
  }
  return reinterpret_cast<void*>(sum);
}

static std::atomic<pid_t> signalledTid{0};
static std::atomic<int> signalCount{0};

static void onSignal(int) {
  signalledTid = rawGettid();
  signalCount++;
}

static void install(int sig, int flags) {
  struct sigaction sa = {};
  sa.sa_handler = onSignal;
  sa.sa_flags = flags;
  sigemptyset(&sa.sa_mask);
  CHECK(sigaction(sig, &sa, nullptr) == 0);
}

static std::set<pid_t> taskList() {
  std::set<pid_t> tids;
  DIR* d = opendir("/proc/self/task");
  if (d == nullptr) {
    return tids;
  }
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') {
      tids.insert(atoi(e->d_name));
    }
  }
  closedir(d);
  return tids;
}

static std::atomic<bool> cleanedUp{false};

static void cleanup(void*) { cleanedUp = true; }

static void* cancellableReader(void* arg) {
  auto* r = static_cast<Reader*>(arg);
  pthread_cleanup_push(cleanup, nullptr);
  r->tid = rawGettid();
  char c;
  (void)!read(r->pipe[0], &c, 1);  // a cancellation point; nothing is ever written
  pthread_cleanup_pop(0);
  return nullptr;
}

struct Queue {
  pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
  long items = 0;
  long taken = 0;
  bool closed = false;
};

static void* consumerMain(void* arg) {
  auto* q = static_cast<Queue*>(arg);
  long mine = 0;
  pthread_mutex_lock(&q->mutex);
  while (true) {
    while (q->items == 0 && !q->closed) {
      pthread_cond_wait(&q->cond, &q->mutex);
    }
    if (q->items == 0) {
      break;
    }
    q->items--;
    q->taken++;
    mine++;
  }
  pthread_mutex_unlock(&q->mutex);
  return reinterpret_cast<void*>(mine);
}

int main() {
  conf::deadline();
  pid_t self = getpid();
  CHECK(rawGettid() == self);

  // Four readers block in read; one thread computes and is joined while they wait; each reader
  // then gets exactly its own data, in the reverse order of their start.
  constexpr int N = 4;
  Reader readers[N];
  for (Reader& r : readers) {
    CHECK(pipe(r.pipe) == 0);
    int err = pthread_create(&r.thread, nullptr, readerMain, &r);
    if (err != 0) {
      printf("pthread_create: %s\n", conf::errnoName(err));
      return 1;  // nothing below can run without threads
    }
  }
  CHECK(conf::waitUntil([&] {
    for (Reader& r : readers) {
      if (r.tid == 0) {
        return false;
      }
    }
    return true;
  }));
  pthread_t computer;
  CHECK(pthread_create(&computer, nullptr, computeMain, reinterpret_cast<void*>(200000L)) == 0);
  void* sum = nullptr;
  CHECK(pthread_join(computer, &sum) == 0);
  CHECK(reinterpret_cast<long>(sum) == 1709600813L);  // the sum of the primes below 200000
  for (Reader& r : readers) {
    CHECK(!r.done);
  }

  // Ids: distinct tids, one pid, all in /proc/self/task.
  std::set<pid_t> tids = {self};
  for (Reader& r : readers) {
    CHECK(r.pid == self);
    CHECK(r.tid != self);
    tids.insert(r.tid);
  }
  CHECK(tids.size() == N + 1);
  std::set<pid_t> listed = taskList();
  for (pid_t t : tids) {
    CHECK(listed.count(t) == 1);
  }

  // tgkill reaches the thread it names (SA_RESTART: its read goes on afterwards).
  install(SIGUSR1, SA_RESTART);
  for (Reader& r : readers) {
    signalledTid = 0;
    CHECK(syscall(SYS_tgkill, self, r.tid.load(), SIGUSR1) == 0);
    CHECK(conf::waitUntil([] { return signalledTid != 0; }));
    CHECK(signalledTid == r.tid);
  }
  CHECK_FAILS(syscall(SYS_tgkill, self + 100000000, readers[0].tid.load(), 0), ESRCH);

  // Without SA_RESTART, only the signalled thread's read ends with EINTR. The signal may land
  // before the thread entered read, so send it until the read ends (nothing is ever written).
  install(SIGUSR2, 0);
  Reader& victim = readers[1];
  CHECK(conf::waitUntil([&] {
    if (!victim.done) {
      syscall(SYS_tgkill, self, victim.tid.load(), SIGUSR2);
    }
    return victim.done.load();
  }));
  CHECK(victim.got == -1 && victim.err == EINTR);

  for (int i = N - 1; i >= 0; i--) {
    if (&readers[i] == &victim) {
      continue;
    }
    char msg[16];
    int len = snprintf(msg, sizeof msg, "reader %d", i);
    CHECK(conf::writeFull(readers[i].pipe[1], msg, size_t(len)));
    CHECK(pthread_join(readers[i].thread, nullptr) == 0);
    CHECK(readers[i].got == len && memcmp(readers[i].buf, msg, size_t(len)) == 0);
  }
  CHECK(pthread_join(victim.thread, nullptr) == 0);
  for (Reader& r : readers) {
    close(r.pipe[0]);
    close(r.pipe[1]);
  }

  // pthread_cancel of a thread blocked in read: its cleanup runs, join returns PTHREAD_CANCELED.
  Reader blocked;
  CHECK(pipe(blocked.pipe) == 0);
  CHECK(pthread_create(&blocked.thread, nullptr, cancellableReader, &blocked) == 0);
  CHECK(conf::waitUntil([&] { return blocked.tid != 0; }));
  CHECK(pthread_cancel(blocked.thread) == 0);
  void* result = nullptr;
  CHECK(pthread_join(blocked.thread, &result) == 0);
  CHECK(result == PTHREAD_CANCELED);
  CHECK(cleanedUp);
  close(blocked.pipe[0]);
  close(blocked.pipe[1]);

  // A detached thread and pthread_exit with a value.
  pthread_t exiter;
  CHECK(pthread_create(
            &exiter, nullptr, [](void*) -> void* { pthread_exit(reinterpret_cast<void*>(77L)); },
            nullptr) == 0);
  CHECK(pthread_join(exiter, &result) == 0 && result == reinterpret_cast<void*>(77L));
  std::atomic<bool> detachedRan{false};
  pthread_t detached;
  CHECK(pthread_create(
            &detached, nullptr,
            [](void* a) -> void* {
              static_cast<std::atomic<bool>*>(a)->store(true);
              return nullptr;
            },
            &detachedRan) == 0);
  CHECK(pthread_detach(detached) == 0);
  CHECK(conf::waitUntil([&] { return detachedRan.load(); }));

  // A robust mutex whose owner thread exits holding it: the owner's tid in the futex word is its
  // gettid, and the kernel's walk of its robust list at exit gives the next locker EOWNERDEAD.
  static pthread_mutex_t robust;
  pthread_mutexattr_t robustAttr;
  CHECK(pthread_mutexattr_init(&robustAttr) == 0);
  CHECK(pthread_mutexattr_setrobust(&robustAttr, PTHREAD_MUTEX_ROBUST) == 0);
  CHECK(pthread_mutex_init(&robust, &robustAttr) == 0);
  static std::atomic<bool> ownerWordIsTid{false};
  pthread_t owner;
  CHECK(pthread_create(
            &owner, nullptr,
            [](void*) -> void* {
              pthread_mutex_lock(&robust);
              auto word = reinterpret_cast<std::atomic<uint32_t>*>(&robust.__data.__lock);
              ownerWordIsTid = (word->load() & 0x3fffffff) == static_cast<uint32_t>(rawGettid());
              return nullptr;  // exits holding it
            },
            nullptr) == 0);
  CHECK(pthread_join(owner, nullptr) == 0);
  CHECK(ownerWordIsTid);
  CHECK(pthread_mutex_lock(&robust) == EOWNERDEAD);
  CHECK(pthread_mutex_consistent(&robust) == 0);
  CHECK(pthread_mutex_unlock(&robust) == 0);

  // Mutex and condition variable (futexes on private memory) between 3 consumers.
  Queue q;
  pthread_t consumers[3];
  for (pthread_t& c : consumers) {
    CHECK(pthread_create(&c, nullptr, consumerMain, &q) == 0);
  }
  constexpr long ITEMS = 20000;
  for (long i = 0; i < ITEMS; i++) {
    pthread_mutex_lock(&q.mutex);
    q.items++;
    pthread_cond_signal(&q.cond);
    pthread_mutex_unlock(&q.mutex);
  }
  pthread_mutex_lock(&q.mutex);
  q.closed = true;
  pthread_cond_broadcast(&q.cond);
  pthread_mutex_unlock(&q.mutex);
  long total = 0;
  for (pthread_t& c : consumers) {
    void* mine = nullptr;
    CHECK(pthread_join(c, &mine) == 0);
    total += reinterpret_cast<long>(mine);
  }
  CHECK(total == ITEMS && q.taken == ITEMS);

  // Every thread has ended: none of their tids is left in /proc/self/task.
  CHECK(conf::waitUntil([&] {
    std::set<pid_t> now = taskList();
    for (Reader& r : readers) {
      if (now.count(r.tid) != 0) {
        return false;
      }
    }
    return now.count(self) == 1;
  }));
  return conf::finish();
}
