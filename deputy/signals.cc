#include "signals.h"

#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include <kj/debug.h>

extern "C" {
__attribute__((visibility("hidden"))) extern char deputy_syscall_check[];
__attribute__((visibility("hidden"))) extern char deputy_syscall_insn[];
__attribute__((visibility("hidden"))) extern char deputy_syscall_cancelled[];
}

namespace mos::deputy {

namespace {

constexpr int MAX_SIGNAL = 64;

// Arrivals per signal number, written only by the handler (which runs with every signal
// blocked) and read with every signal blocked.
std::atomic<uint32_t> arrivals[MAX_SIGNAL + 1];

// The sender and status of the last SIGCHLD (its siginfo: si_pid, si_status).
std::atomic<int32_t> lastChildPid{0};
std::atomic<int32_t> lastChildStatus{0};

// Set when the supervisor asked to cancel the call in progress (see requestCancelSignals). Per
// deputy thread: the urgent byte raises SIGURG in the thread that owns that channel.
__attribute__((tls_model("initial-exec"))) thread_local std::atomic<bool> cancelRequested{false};

// Arrivals of signals the home kernel directed at this deputy thread (SI_TKILL), per thread.
__attribute__((tls_model("initial-exec"))) thread_local std::atomic<uint32_t>
    threadArrivals[MAX_SIGNAL + 1];

// Set in the leader when a deputy thread handed it an exec.
std::atomic<bool> execHandoff{false};

// The control socket's number (setControlFd) and its pending request.
std::atomic<int> controlFd{-1};
std::atomic<bool> controlRequested{false};

// The siginfo of each recorded arrival: for a standard signal the first one since the last take,
// for a real-time signal up to RT_INFOS per signal (in arrival order). Written by the handler,
// read with every signal blocked, like `arrivals`.
constexpr uint32_t RT_INFOS = 16;
siginfo_t firstInfo[MAX_SIGNAL + 1];
siginfo_t rtInfos[MAX_SIGNAL + 1][RT_INFOS];

void keepInfo(int sig, const siginfo_t* info, uint32_t before) {
  siginfo_t* slot = nullptr;
  if (sig < 32) {
    slot = before == 0 ? &firstInfo[sig] : nullptr;
  } else if (before < RT_INFOS) {
    slot = &rtInfos[sig][before];
  }
  if (slot == nullptr) {
    return;
  }
  if (info != nullptr) {
    *slot = *info;
  } else {
    memset(slot, 0, sizeof(*slot));
    slot->si_code = SI_USER;
  }
  slot->si_signo = sig;
}

bool isFault(int sig) {
  return sig == SIGSEGV || sig == SIGBUS || sig == SIGILL || sig == SIGFPE || sig == SIGSYS;
}

void onSignal(int sig, siginfo_t* info, void* context) {
  if (isFault(sig) && info != nullptr && info->si_code > 0) {
    // The deputy's own fault, not a signal sent to the job: die of it (returning re-executes
    // the faulting instruction under SIG_DFL).
    struct sigaction dfl = {};
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, nullptr);
    return;
  }
  if (sig < 1 || sig > MAX_SIGNAL) {
    return;
  }
  if (sig == SIGURG && info != nullptr && info->si_code == SI_QUEUE &&
      info->si_value.sival_int == EXEC_HANDOFF_VALUE && info->si_pid == getpid()) {
    // A deputy thread hands its exec to us, the leader (requestExecHandoff).
    execHandoff.store(true, std::memory_order_relaxed);
  } else if (sig == SIGURG && info != nullptr && info->si_code == POLL_IN &&
             info->si_fd == controlFd.load(std::memory_order_relaxed) && info->si_fd >= 0) {
    // `migrate` connected to our control socket (control.h): not a signal of the job.
    controlRequested.store(true, std::memory_order_relaxed);
  } else if (sig == SIGURG && info != nullptr && info->si_code == SI_KERNEL) {
    // Urgent data on the job channel (the socket's owner is our thread): the supervisor cancels
    // the forwarded call in progress, because the guest left it. Not a signal of the job.
    cancelRequested.store(true, std::memory_order_relaxed);
  } else {
    if (sig == SIGCHLD && info != nullptr) {
      lastChildPid.store(info->si_pid, std::memory_order_relaxed);
      lastChildStatus.store(info->si_status, std::memory_order_relaxed);
    }
    if (info != nullptr && info->si_code == SI_TKILL && syscall(SYS_gettid) != getpid()) {
      // tgkill/tkill at home named this deputy thread (not the main one, whose guest thread is
      // the process's own, and whose arrivals keep their siginfo): it goes to this thread's
      // guest thread.
      threadArrivals[sig].fetch_add(1, std::memory_order_relaxed);
    } else {
      keepInfo(sig, info, arrivals[sig].fetch_add(1, std::memory_order_relaxed));
    }
  }
  __atomic_store_n(&deputy_signals_pending, 1, __ATOMIC_SEQ_CST);
  auto* uc = static_cast<ucontext_t*>(context);
  auto rip = static_cast<uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
  if (rip >= reinterpret_cast<uintptr_t>(deputy_syscall_check) &&
      rip <= reinterpret_cast<uintptr_t>(deputy_syscall_insn)) {
    // Checked "nothing pending" (or about to) but not yet in the kernel: the call must not
    // start, or it would block with this signal already consumed.
    uc->uc_mcontext.gregs[REG_RIP] =
        static_cast<greg_t>(reinterpret_cast<uintptr_t>(deputy_syscall_cancelled));
  }
}

sigset_t makeEmptySet() {
  sigset_t set;
  sigemptyset(&set);
  return set;
}

}  // namespace

void installSignalHandlers() {
  struct sigaction action = {};
  action.sa_sigaction = onSignal;
  action.sa_flags = SA_SIGINFO;  // no SA_RESTART: a signal must interrupt a forwarded call
  sigfillset(&action.sa_mask);
  for (int sig = 1; sig <= MAX_SIGNAL; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP) {
      continue;
    }
    struct sigaction old;
    if (sigaction(sig, nullptr, &old) < 0) {
      continue;  // glibc's reserved real-time signals (32, 33)
    }
    if (old.sa_handler == SIG_IGN && !(old.sa_flags & SA_SIGINFO) && sig != SIGURG) {
      continue;  // the job ignores it: the home kernel discards it, as it would natively
    }
    if (sigaction(sig, &action, nullptr) < 0 && sig < SIGRTMIN) {
      KJ_FAIL_SYSCALL("sigaction", errno, sig);
    }
  }
}

void mirrorChildDisposition(int mode) {
  struct sigaction action = {};
  if (mode == 1) {
    action.sa_handler = SIG_IGN;
  } else {
    action.sa_sigaction = onSignal;
    action.sa_flags = SA_SIGINFO | (mode == 2 ? SA_NOCLDWAIT : 0);
    sigfillset(&action.sa_mask);
  }
  sigaction(SIGCHLD, &action, nullptr);
}

void blockAllSignals() {
  sigset_t all;
  sigfillset(&all);
  KJ_SYSCALL(sigprocmask(SIG_SETMASK, &all, nullptr));
}

const sigset_t& openSignalMask() {
  static const sigset_t empty = makeEmptySet();
  return empty;
}

std::vector<siginfo_t> takePendingSignalInfos() {
  std::vector<siginfo_t> result;
  if (!signalsPending()) {
    return result;
  }
  __atomic_store_n(&deputy_signals_pending, 0, __ATOMIC_SEQ_CST);
  for (int sig = 1; sig <= MAX_SIGNAL; sig++) {
    uint32_t n = arrivals[sig].exchange(0, std::memory_order_relaxed);
    if (n == 0) {
      continue;
    }
    // Standard signals do not queue (signal(7)); real-time ones do.
    if (sig < 32) {
      result.push_back(firstInfo[sig]);
      continue;
    }
    for (uint32_t i = 0; i < n; i++) {
      if (i < RT_INFOS) {
        result.push_back(rtInfos[sig][i]);
      } else {
        siginfo_t info = {};
        info.si_signo = sig;
        info.si_code = SI_USER;
        result.push_back(info);
      }
    }
  }
  return result;
}

std::vector<int> takeThreadSignals() {
  std::vector<int> result;
  for (int sig = 1; sig <= MAX_SIGNAL; sig++) {
    uint32_t n = threadArrivals[sig].exchange(0, std::memory_order_relaxed);
    if (n > 0 && sig < 32) {
      n = 1;
    }
    for (uint32_t i = 0; i < n; i++) {
      result.push_back(sig);
    }
  }
  return result;
}

std::vector<int> takePendingSignals() {
  std::vector<int> result;
  for (const siginfo_t& info : takePendingSignalInfos()) {
    result.push_back(info.si_signo);
  }
  return result;
}

ChildSignalInfo lastChildSignal() {
  return {lastChildPid.load(std::memory_order_relaxed),
          lastChildStatus.load(std::memory_order_relaxed)};
}

bool takeCancel() { return cancelRequested.exchange(false, std::memory_order_relaxed); }

void recordSignal(int sig) {
  if (sig < 1 || sig > MAX_SIGNAL) {
    return;
  }
  keepInfo(sig, nullptr, arrivals[sig].fetch_add(1, std::memory_order_relaxed));
  __atomic_store_n(&deputy_signals_pending, 1, __ATOMIC_SEQ_CST);
}

void requestExecHandoff(pid_t leader) {
  siginfo_t info = {};
  info.si_signo = SIGURG;
  info.si_code = SI_QUEUE;
  info.si_pid = getpid();
  info.si_uid = getuid();
  info.si_value.sival_int = EXEC_HANDOFF_VALUE;
  syscall(SYS_rt_tgsigqueueinfo, getpid(), leader, SIGURG, &info);
}

bool takeExecHandoff() { return execHandoff.exchange(false, std::memory_order_relaxed); }

void setControlFd(int fd) { controlFd.store(fd, std::memory_order_relaxed); }

bool takeControlRequest() { return controlRequested.exchange(false, std::memory_order_relaxed); }

long interruptibleSyscall(long nr, const uint64_t (&args)[6]) {
  sigset_t saved;
  sigprocmask(SIG_SETMASK, &openSignalMask(), &saved);
  long ret = deputy_syscall(nr, static_cast<long>(args[0]), static_cast<long>(args[1]),
                            static_cast<long>(args[2]), static_cast<long>(args[3]),
                            static_cast<long>(args[4]), static_cast<long>(args[5]));
  sigprocmask(SIG_SETMASK, &saved, nullptr);
  return ret;
}

}  // namespace mos::deputy
