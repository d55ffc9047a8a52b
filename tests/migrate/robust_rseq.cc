// The kernel's per-thread registrations survive a checkpoint: the robust futex list (glibc's,
// get_robust_list), the clear-child-tid address (prctl PR_GET_TID_ADDRESS) and the rseq area
// (registering it again fails with EBUSY: it is registered). A robust mutex locked before the
// checkpoint is still locked by us afterwards.
#include <linux/prctl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/syscall.h>

#include "zdtm.h"

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  void* head = nullptr;
  size_t len = 0;
  CHECK(syscall(SYS_get_robust_list, 0, &head, &len) == 0);
  CHECK(head != nullptr);
  int* tidAddress = nullptr;
  CHECK(prctl(PR_GET_TID_ADDRESS, &tidAddress) == 0);
  CHECK(tidAddress != nullptr);
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  static pthread_mutex_t mutex;
  pthread_mutex_init(&mutex, &attr);
  CHECK(pthread_mutex_lock(&mutex) == 0);
  bool haveRseq = __rseq_size > 0;
  auto* area = reinterpret_cast<struct rseq*>(static_cast<char*>(__builtin_thread_pointer()) +
                                              __rseq_offset);

  zdtm::ready();
  zdtm::waitGo();

  void* headNow = nullptr;
  size_t lenNow = 0;
  CHECK(syscall(SYS_get_robust_list, 0, &headNow, &lenNow) == 0);
  CHECK(headNow == head);
  CHECK_EQ(lenNow, len);
  int* tidNow = nullptr;
  CHECK(prctl(PR_GET_TID_ADDRESS, &tidNow) == 0);
  CHECK(tidNow == tidAddress);
  CHECK_EQ(pthread_mutex_trylock(&mutex), EBUSY);
  CHECK(pthread_mutex_unlock(&mutex) == 0);
  CHECK(pthread_mutex_lock(&mutex) == 0);
  CHECK(pthread_mutex_unlock(&mutex) == 0);
  if (haveRseq) {
    // glibc registers 32 bytes (or __rseq_size on newer versions) with RSEQ_SIG.
    long r = syscall(SYS_rseq, area, 32, 0, 0x53053053);
    int err = errno;
    if (r == -1 && err == EINVAL) {
      r = syscall(SYS_rseq, area, __rseq_size, 0, 0x53053053);
      err = errno;
    }
    CHECK(r == -1 && err == EBUSY);
    // The kernel keeps the area current: the cpu it reports is the one getcpu(2) reports (retried:
    // the scheduler may move us between the two reads).
    bool agrees = false;
    for (int i = 0; i < 100 && !agrees; ++i) {
      sched_yield();
      unsigned cpu = ~0u;
      syscall(SYS_getcpu, &cpu, nullptr, nullptr);
      agrees = area->cpu_id == cpu;
    }
    CHECK(agrees);
  } else {
    printf("glibc registers no rseq area: rseq part skipped\n");
  }
  return zdtm::finish();
}
