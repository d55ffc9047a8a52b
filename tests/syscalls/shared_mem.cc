// Memory shared between the processes of one job: MAP_SHARED|MAP_ANONYMOUS inherited across
// fork, POSIX shared memory (shm_open + ftruncate + mmap, opened again by name in the child,
// visible as a file in /dev/shm), SysV shm (shmget/shmat), with futex wait/wake on the shared
// pages (a ping-pong between parent and child); memfd_create mapped shared across fork; named
// semaphores (sem_open), process-shared unnamed ones (sem_init) and SysV ones (semget/semop); a
// process-shared mutex, and a robust one whose owner dies. Under mosrun all of it lives on the
// node where the job runs (docs/design.md, "Memory shared between job processes").

#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <semaphore.h>
#include <sys/mman.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include <atomic>
#include <new>
#include <string>

#include "tree.h"

// Blocks (shared futex, bounded) until *word == want.
static bool awaitValue(std::atomic<int>* word, int want) {
  long end = conf::nowMs() + 30000;
  while (true) {
    int v = word->load();
    if (v == want) {
      return true;
    }
    if (conf::nowMs() > end) {
      printf("futex word stays %d, want %d\n", v, want);
      return false;
    }
    struct timespec oneSecond = {1, 0};
    syscall(SYS_futex, word, FUTEX_WAIT, v, &oneSecond, nullptr, 0);
  }
}

static void store(std::atomic<int>* word, int v) {
  word->store(v);
  syscall(SYS_futex, word, FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

// ROUNDS round trips on *word: the parent stores odd values, the child even ones.
constexpr int ROUNDS = 500;

static bool pingParent(std::atomic<int>* word) {
  for (int i = 0; i < ROUNDS; i++) {
    store(word, 2 * i + 1);
    if (!awaitValue(word, 2 * i + 2)) {
      return false;
    }
  }
  return true;
}

static int pongChild(std::atomic<int>* word) {
  for (int i = 0; i < ROUNDS; i++) {
    if (!awaitValue(word, 2 * i + 1)) {
      return 1;
    }
    store(word, 2 * i + 2);
  }
  return 0;
}

// An absolute CLOCK_REALTIME deadline 30 s from now, for sem_timedwait.
static struct timespec in30s() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += 30;
  return ts;
}

int main() {
  conf::deadline();
  std::string tag = std::to_string(getpid());

  // Anonymous shared memory: stores of the child are seen by the parent, futexes work on it.
  auto* anon = static_cast<char*>(
      mmap(nullptr, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  CHECK(anon != MAP_FAILED);
  auto* word = new (anon) std::atomic<int>(0);
  pid_t child = conf::spawn([&] {
    memset(anon + 4096, 0x5a, 4096);
    return pongChild(word);
  });
  CHECK(pingParent(word));
  conf::expectClean(child, "anon ping-pong");
  CHECK(anon[4096] == 0x5a && anon[8191] == 0x5a);
  // MAP_PRIVATE is not shared: the child's store stays in its copy.
  auto* priv = static_cast<volatile char*>(
      mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  CHECK(priv != MAP_FAILED);
  child = conf::spawn([&] {
    priv[0] = 1;
    return 0;
  });
  conf::expectClean(child, "private store");
  CHECK(priv[0] == 0);

  // POSIX shm: created here, opened again by name in the child, a file in /dev/shm.
  std::string shmName = "/umosix-sc-shm-" + tag;
  int fd = shm_open(shmName.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  CHECK(fd >= 0);
  CHECK(ftruncate(fd, 1 << 20) == 0);
  struct stat st;
  CHECK(stat(("/dev/shm" + shmName).c_str(), &st) == 0 && st.st_size == (1 << 20));
  CHECK(st.st_uid == geteuid() && (st.st_mode & 07777) == 0600);
  CHECK(fstat(fd, &st) == 0 && st.st_size == (1 << 20) && S_ISREG(st.st_mode));
  CHECK_FAILS(shm_open(shmName.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600), EEXIST);
  // A duplicate (as Python's mmap module makes one) maps the same pages; closing it keeps them.
  int dupFd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  CHECK(dupFd > fd && (fcntl(dupFd, F_GETFD) & FD_CLOEXEC) != 0);
  auto* viaDup =
      static_cast<char*>(mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, dupFd, 0));
  CHECK(viaDup != MAP_FAILED);
  CHECK(close(dupFd) == 0);
  CHECK_FAILS(fcntl(dupFd, F_GETFD), EBADF);
  auto* shm = static_cast<char*>(mmap(nullptr, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  CHECK(shm != MAP_FAILED);
  auto* shmWord = new (shm) std::atomic<int>(0);
  child = conf::spawn([&] {
    int own = shm_open(shmName.c_str(), O_RDWR, 0);
    CHECK(own >= 0);
    auto* mine =
        static_cast<char*>(mmap(nullptr, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, own, 0));
    CHECK(mine != MAP_FAILED);
    if (mine == MAP_FAILED) {
      return 1;
    }
    memcpy(mine + 65536, "written by the child", 21);
    // The futex is keyed by the file page: the child's own mapping meets the parent's.
    return pongChild(reinterpret_cast<std::atomic<int>*>(mine));
  });
  CHECK(pingParent(shmWord));
  conf::expectClean(child, "shm ping-pong");
  if (viaDup != MAP_FAILED) {
    CHECK(viaDup[0] == shm[0] && viaDup[0] != 0);  // the futex word, seen through the duplicate
    munmap(viaDup, 4096);
  }
  CHECK(memcmp(shm + 65536, "written by the child", 21) == 0);
  char viaRead[21] = {};
  CHECK(pread(fd, viaRead, sizeof viaRead, 65536) == sizeof viaRead);
  CHECK(memcmp(viaRead, "written by the child", 21) == 0);
  CHECK(shm_unlink(shmName.c_str()) == 0);
  CHECK_FAILS(shm_open(shmName.c_str(), O_RDWR, 0), ENOENT);
  CHECK_FAILS(stat(("/dev/shm" + shmName).c_str(), &st), ENOENT);
  CHECK(fstat(fd, &st) == 0 && st.st_nlink == 0);  // still open: unlinked, not gone
  munmap(shm, 1 << 20);
  close(fd);

  // SysV shm, attached before fork.
  int id = shmget(IPC_PRIVATE, 65536, IPC_CREAT | 0600);
  CHECK(id >= 0);
  struct shmid_ds ds;
  CHECK(shmctl(id, IPC_STAT, &ds) == 0 && ds.shm_segsz == 65536);
  auto* sysv = static_cast<char*>(shmat(id, nullptr, 0));
  CHECK(sysv != reinterpret_cast<char*>(-1));
  CHECK(shmctl(id, IPC_RMID, nullptr) == 0);  // freed at the last detach
  auto* sysvWord = new (sysv) std::atomic<int>(0);
  child = conf::spawn([&] {
    strcpy(sysv + 100, "sysv");
    return pongChild(sysvWord);
  });
  CHECK(pingParent(sysvWord));
  conf::expectClean(child, "sysv ping-pong");
  CHECK(strcmp(sysv + 100, "sysv") == 0);
  CHECK(shmdt(sysv) == 0);
  // A segment the child attaches by id after the fork, and writes.
  int later = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
  CHECK(later >= 0);
  child = conf::spawn([&] {
    auto* mine = static_cast<char*>(shmat(later, nullptr, 0));
    if (mine == reinterpret_cast<char*>(-1)) {
      return 1;
    }
    strcpy(mine, "attached in the child");
    return shmdt(mine);
  });
  conf::expectClean(child, "SysV shmat by id");
  auto* laterMem = static_cast<char*>(shmat(later, nullptr, SHM_RDONLY));
  CHECK(laterMem != reinterpret_cast<char*>(-1));
  if (laterMem != reinterpret_cast<char*>(-1)) {
    CHECK(strcmp(laterMem, "attached in the child") == 0);
    CHECK(shmdt(laterMem) == 0);
  }
  CHECK(shmctl(later, IPC_RMID, nullptr) == 0);

  // Named semaphores: a ping-pong of two, the child opening them again by name.
  std::string semA = "/umosix-sc-sema-" + tag;
  std::string semB = "/umosix-sc-semb-" + tag;
  sem_t* a = sem_open(semA.c_str(), O_CREAT | O_EXCL, 0600, 0);
  sem_t* b = sem_open(semB.c_str(), O_CREAT | O_EXCL, 0600, 0);
  CHECK(a != SEM_FAILED && b != SEM_FAILED);
  child = conf::spawn([&] {
    sem_t* ownA = sem_open(semA.c_str(), 0);
    CHECK(ownA != SEM_FAILED);
    for (int i = 0; i < 100; i++) {
      struct timespec until = in30s();
      if (sem_timedwait(i % 2 == 0 ? ownA : a, &until) != 0) {
        printf("child sem_timedwait: %s\n", conf::errnoName(errno));
        return 1;
      }
      CHECK(sem_post(b) == 0);
    }
    return 0;
  });
  bool pingPong = true;
  for (int i = 0; i < 100 && pingPong; i++) {
    CHECK(sem_post(a) == 0);
    struct timespec until = in30s();
    pingPong = sem_timedwait(b, &until) == 0;
  }
  CHECK(pingPong);
  conf::expectClean(child, "sem_open ping-pong");
  int value = -1;
  CHECK(sem_getvalue(a, &value) == 0 && value == 0);
  CHECK(sem_close(a) == 0 && sem_close(b) == 0);
  CHECK(sem_unlink(semA.c_str()) == 0 && sem_unlink(semB.c_str()) == 0);
  CHECK(sem_open(semA.c_str(), 0) == SEM_FAILED && errno == ENOENT);

  // A process-shared unnamed semaphore and mutex in anonymous shared memory: two children
  // increment a counter 20000 times each under the mutex, then post.
  struct Shared {
    sem_t done;
    pthread_mutex_t mutex;
    pthread_mutex_t robust;
    long counter;
  };
  auto* sh = new (anon + 16384) Shared();
  CHECK(sem_init(&sh->done, 1, 0) == 0);
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  CHECK(pthread_mutex_init(&sh->mutex, &attr) == 0);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  CHECK(pthread_mutex_init(&sh->robust, &attr) == 0);
  pid_t adders[2];
  for (pid_t& adder : adders) {
    adder = conf::spawn([&] {
      for (int i = 0; i < 20000; i++) {
        pthread_mutex_lock(&sh->mutex);
        sh->counter = sh->counter + 1;
        pthread_mutex_unlock(&sh->mutex);
      }
      return sem_post(&sh->done);
    });
  }
  for (int i = 0; i < 2; i++) {
    struct timespec until = in30s();
    CHECK(sem_timedwait(&sh->done, &until) == 0);
  }
  CHECK(sh->counter == 40000);
  conf::expectClean(adders[0], "adder 1");
  conf::expectClean(adders[1], "adder 2");

  // A robust mutex whose owner dies holding it: the next locker gets EOWNERDEAD.
  child = conf::spawn([&] {
    CHECK(pthread_mutex_lock(&sh->robust) == 0);
    _exit(0);  // dies holding it
    return 0;
  });
  conf::expectClean(child, "robust owner");
  CHECK(pthread_mutex_lock(&sh->robust) == EOWNERDEAD);
  CHECK(pthread_mutex_consistent(&sh->robust) == 0);
  CHECK(pthread_mutex_unlock(&sh->robust) == 0);
  CHECK(pthread_mutex_lock(&sh->robust) == 0);
  CHECK(pthread_mutex_unlock(&sh->robust) == 0);

  // memfd: the child maps the inherited descriptor and writes; the parent's mapping sees it.
  int mfd = memfd_create("umosix-sc", MFD_CLOEXEC);
  CHECK(mfd >= 0);
  char link[64] = {};
  CHECK(readlink(("/proc/self/fd/" + std::to_string(mfd)).c_str(), link, sizeof link - 1) > 0);
  CHECK(strcmp(link, "/memfd:umosix-sc (deleted)") == 0);
  CHECK((fcntl(mfd, F_GETFD) & FD_CLOEXEC) != 0);
  CHECK(ftruncate(mfd, 65536) == 0);
  auto* mem = static_cast<char*>(mmap(nullptr, 65536, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0));
  CHECK(mem != MAP_FAILED);
  auto* memWord = new (mem) std::atomic<int>(0);
  child = conf::spawn([&] {
    auto* own =
        static_cast<char*>(mmap(nullptr, 65536, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0));
    CHECK(own != MAP_FAILED);
    if (own == MAP_FAILED) {
      return 1;
    }
    strcpy(own + 4096, "memfd");
    return pongChild(reinterpret_cast<std::atomic<int>*>(own));
  });
  CHECK(pingParent(memWord));
  conf::expectClean(child, "memfd ping-pong");
  CHECK(strcmp(mem + 4096, "memfd") == 0);
  munmap(mem, 65536);
  close(mfd);

  // SysV semaphores: the child waits for 1 and posts 2; IPC_RMID at the end.
  int sem = semget(IPC_PRIVATE, 2, IPC_CREAT | 0600);
  CHECK(sem >= 0);
  child = conf::spawn([&] {
    struct sembuf take = {0, -1, 0};
    struct timespec thirty = {30, 0};
    CHECK(semtimedop(sem, &take, 1, &thirty) == 0);
    struct sembuf give = {1, 2, 0};
    CHECK(semop(sem, &give, 1) == 0);
    return 0;
  });
  struct sembuf give = {0, 1, 0};
  CHECK(semop(sem, &give, 1) == 0);
  struct sembuf take = {1, -2, 0};
  struct timespec thirty = {30, 0};
  CHECK(semtimedop(sem, &take, 1, &thirty) == 0);
  conf::expectClean(child, "SysV semaphore");
  CHECK(semctl(sem, 0, GETVAL) == 0 && semctl(sem, 1, GETVAL) == 0);
  // A wait that times out, and SETVAL seen by a child.
  struct timespec short_ = {0, 50 * 1000 * 1000};
  CHECK_FAILS(semtimedop(sem, &take, 1, &short_), EAGAIN);
  CHECK(semctl(sem, 1, SETVAL, 5) == 0);
  child = conf::spawn([&] { return semctl(sem, 1, GETVAL) == 5 ? 0 : 1; });
  conf::expectClean(child, "SysV semaphore value");
  CHECK(semctl(sem, 0, IPC_RMID) == 0);
  CHECK_FAILS(semctl(sem, 0, GETVAL), EINVAL);

  munmap(anon, 1 << 20);
  return conf::finish();
}
