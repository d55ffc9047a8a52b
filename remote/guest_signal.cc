#include "guest_signal.h"

#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <string>

#include <spdlog/spdlog.h>

#include "supervisor.h"  // readStatus, statusMask
#include "syscall_table.h"

namespace mos::remote {

namespace {

// include/linux/errno.h: the kernel's restart codes (never seen by a process).
constexpr int64_t ERESTARTNOINTR = 513;
constexpr int64_t ERESTARTNOHAND = 514;
constexpr int64_t ERESTARTSYS = 512;

constexpr int KERNEL_SIGSET_BYTES = 8;
constexpr uint64_t RED_ZONE = 128;  // x86-64 System V ABI: below rsp, owned by the function

// The guest's scratch memory, below its red zone: what the injected calls read and write.
struct Scratch {
  uint64_t all;      // every signal
  uint64_t old;      // rt_sigprocmask's previous mask
  uint64_t mask;     // the call's temporary mask, for ppoll
  uint64_t zero[2];  // struct timespec {0, 0}
  siginfo_t info;    // one siginfo at a time
};

// True when syscall `nr` goes to the supervisor (a seccomp user notification) rather than to the
// guest's kernel: every row but the plain LOCAL ones (a LOCAL row with a handler is notified
// under its handler's condition), and every number without a row.
bool isNotified(int64_t nr) {
  const SyscallEntry* e = nr >= 0 ? findSyscall(static_cast<int>(nr)) : nullptr;
  return e == nullptr || e->route != Route::LOCAL || e->handler != HandlerId::NONE;
}

bool isGroupStopSignal(int sig) {
  return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

class Session {
 public:
  Session(const InjectRequest& request, const InjectHost& host)
      : request_(request), host_(host), pid_(request.pid) {}

  InjectOutcome run();

 private:
  // Waits for the next stop; false when the guest ended. Delivery stops of signals are taken
  // out (suppressed, queued again later) and waited past, resuming with `resume`.
  bool waitStop(int& status, int resume);
  // Runs one syscall in the guest at its syscall instruction; false when the guest ended. The
  // result is in `ret`.
  bool inject(long nr, std::initializer_list<uint64_t> args, int64_t& ret);
  bool writeScratch(const void* data, size_t offset, size_t bytes);
  bool queue(const siginfo_t& info);
  void putBack();

  const InjectRequest& request_;
  const InjectHost& host_;
  pid_t pid_;
  user_regs_struct saved_ = {};
  uint64_t insn_ = 0;     // address of the `syscall` instruction we run
  bool patched_ = false;  // insn_ is two bytes we patched (restore textWord_)
  long textWord_ = 0;
  uint64_t scratch_ = 0;          // guest address of a Scratch
  std::string scratchSaved_;      // the guest's bytes there before
  std::vector<siginfo_t> taken_;  // delivery stops we suppressed: queued again first
  bool queued_ = false;           // taken_ was queued again: later delivery stops are lost
  bool sawSyscallStop_ = false;
};

bool Session::waitStop(int& status, int resume) {
  for (;;) {
    if (queued_ && !taken_.empty()) {
      // Only those taken before the queueing are queued again (run()): never expected after.
      spdlog::warn("guest {}: signal {} taken out during its signal session is lost", pid_,
                   taken_.back().si_signo);
      taken_.clear();
    }
    status = host_.wait(pid_);
    if (status < 0 || WIFEXITED(status) || WIFSIGNALED(status)) {
      return false;
    }
    if (!WIFSTOPPED(status)) {
      continue;
    }
    int sig = WSTOPSIG(status);
    int event = status >> 16;
    if (event == 0 && sig != (SIGTRAP | 0x80)) {
      // A signal-delivery stop: the kernel was about to deliver it; keep it for later.
      siginfo_t info = {};
      if (ptrace(PTRACE_GETSIGINFO, pid_, 0, &info) == 0) {
        taken_.push_back(info);
      }
      ptrace(static_cast<__ptrace_request>(resume), pid_, 0, 0);
      continue;
    }
    return true;
  }
}

bool Session::writeScratch(const void* data, size_t offset, size_t bytes) {
  struct iovec local = {const_cast<void*>(data), bytes};
  struct iovec remote = {reinterpret_cast<void*>(scratch_ + offset), bytes};
  return process_vm_writev(pid_, &local, 1, &remote, 1, 0) == static_cast<ssize_t>(bytes);
}

bool Session::inject(long nr, std::initializer_list<uint64_t> args, int64_t& ret) {
  user_regs_struct regs = saved_;
  regs.rip = insn_;
  regs.rax = nr;
  regs.orig_rax = static_cast<uint64_t>(-1);
  unsigned long long* slots[6] = {&regs.rdi, &regs.rsi, &regs.rdx, &regs.r10, &regs.r8, &regs.r9};
  int i = 0;
  for (uint64_t a : args) {
    *slots[i++] = a;
  }
  if (ptrace(PTRACE_SETREGS, pid_, 0, &regs) != 0) {
    return false;
  }
  int status;
  // Entry stop, then exit stop.
  for (int stop = 0; stop < 2; stop++) {
    if (ptrace(PTRACE_SYSCALL, pid_, 0, 0) != 0 || !waitStop(status, PTRACE_SYSCALL)) {
      return false;
    }
    if (WSTOPSIG(status) != (SIGTRAP | 0x80)) {
      spdlog::warn("guest {}: unexpected stop {:#x} in an injected call", pid_, status);
      return false;
    }
  }
  sawSyscallStop_ = true;
  user_regs_struct after;
  if (ptrace(PTRACE_GETREGS, pid_, 0, &after) != 0) {
    return false;
  }
  ret = static_cast<int64_t>(after.rax);
  return true;
}

bool Session::queue(const siginfo_t& info) {
  if (!writeScratch(&info, offsetof(Scratch, info), sizeof(info))) {
    return false;
  }
  int64_t ret;
  if (!inject(__NR_rt_tgsigqueueinfo,
              {static_cast<uint64_t>(request_.homePid), static_cast<uint64_t>(request_.homePid),
               static_cast<uint64_t>(info.si_signo), scratch_ + offsetof(Scratch, info)},
              ret)) {
    return false;
  }
  if (ret != 0) {
    spdlog::warn("guest {}: queueing signal {} failed: {}", pid_, info.si_signo,
                 strerror(static_cast<int>(-ret)));
  }
  return true;
}

void Session::putBack() {
  if (!scratchSaved_.empty()) {
    writeScratch(scratchSaved_.data(), 0, scratchSaved_.size());
  }
  if (patched_) {
    ptrace(PTRACE_POKETEXT, pid_, insn_, textWord_);
  }
}

InjectOutcome Session::run() {
  // Not PTRACE_O_SUSPEND_SECCOMP yet: a guest entering a syscall before it stops would run it
  // past its filter (a read on a content-cache shadow descriptor, say).
  if (ptrace(PTRACE_SEIZE, pid_, 0, PTRACE_O_TRACESYSGOOD) != 0) {
    spdlog::warn("cannot trace guest {} to queue its signals: {}", pid_, strerror(errno));
    KJ_IF_MAYBE (answer, request_.answer) {
      host_.send(answer->id, answer->value);
    }
    return InjectOutcome::FAILED;
  }
  ptrace(PTRACE_INTERRUPT, pid_, 0, 0);
  KJ_IF_MAYBE (answer, request_.answer) {
    // The guest leaves its call now and stops on its way out. An interrupted call restarts
    // unless the session decides otherwise below.
    host_.send(answer->id, answer->interrupted ? -ERESTARTNOINTR : answer->value);
  }
  int status;
  if (!waitStop(status, PTRACE_CONT)) {
    return InjectOutcome::GONE;
  }
  if ((status >> 16) == PTRACE_EVENT_STOP && isGroupStopSignal(WSTOPSIG(status))) {
    // Stopped by job control: leave it stopped (detaching keeps the group stop).
    ptrace(PTRACE_DETACH, pid_, 0, 0);
    return InjectOutcome::STOPPED;
  }
  // Stopped: only our injected calls run from here until the filter is back (below).
  if (ptrace(PTRACE_GETREGS, pid_, 0, &saved_) != 0 ||
      ptrace(PTRACE_SETOPTIONS, pid_, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_SUSPEND_SECCOMP) != 0) {
    ptrace(PTRACE_DETACH, pid_, 0, 0);
    return InjectOutcome::FAILED;
  }
  bool inSyscall = static_cast<int64_t>(saved_.orig_rax) >= 0;
  errno = 0;
  long word = ptrace(PTRACE_PEEKTEXT, pid_, inSyscall ? saved_.rip - 2 : saved_.rip, 0);
  if (inSyscall && errno == 0 && (word & 0xffff) == 0x050f) {
    insn_ = saved_.rip - 2;
  } else {
    // Not after a syscall instruction: borrow two bytes at rip.
    insn_ = saved_.rip;
    errno = 0;
    textWord_ = ptrace(PTRACE_PEEKTEXT, pid_, insn_, 0);
    if (errno != 0 || ptrace(PTRACE_POKETEXT, pid_, insn_, (textWord_ & ~0xffffL) | 0x050fL) != 0) {
      ptrace(PTRACE_DETACH, pid_, 0, 0);
      return InjectOutcome::FAILED;
    }
    patched_ = true;
  }
  scratch_ = (saved_.rsp - RED_ZONE - sizeof(Scratch)) & ~uint64_t{63};
  scratchSaved_.resize(sizeof(Scratch));
  {
    struct iovec local = {scratchSaved_.data(), scratchSaved_.size()};
    struct iovec remote = {reinterpret_cast<void*>(scratch_), scratchSaved_.size()};
    if (process_vm_readv(pid_, &local, 1, &remote, 1, 0) !=
        static_cast<ssize_t>(scratchSaved_.size())) {
      scratchSaved_.clear();
    }
  }
  Scratch init = {};
  init.all = ~uint64_t{0};
  KJ_IF_MAYBE (answer, request_.answer) {
    KJ_IF_MAYBE (mask, answer->callMask) {
      init.mask = *mask;
    }
  }
  bool ok = writeScratch(&init, 0, offsetof(Scratch, info));
  int64_t ret = 0;
  // Every signal blocked while we queue: nothing is delivered between the injected calls.
  ok = ok &&
       inject(__NR_rt_sigprocmask,
              {SIG_SETMASK, scratch_ + offsetof(Scratch, all), scratch_ + offsetof(Scratch, old),
               KERNEL_SIGSET_BYTES},
              ret) &&
       ret == 0;
  // What the kernel was about to deliver goes first, as it would have.
  for (size_t i = 0; ok && i < taken_.size(); i++) {
    ok = queue(taken_[i]);
  }
  for (size_t i = 0; ok && i < request_.signals.size(); i++) {
    ok = queue(request_.signals[i]);
  }
  taken_.clear();
  queued_ = true;
  ok = ok && inject(__NR_rt_sigprocmask,
                    {SIG_SETMASK, scratch_ + offsetof(Scratch, old), 0, KERNEL_SIGSET_BYTES}, ret);
  int64_t rax = static_cast<int64_t>(saved_.rax);
  KJ_IF_MAYBE (answer, request_.answer) {
    rax = answer->value;
    if (ok && answer->interrupted) {
      // Does the guest now take a signal, under the call's own mask when it has one?
      std::string st = readStatus(pid_);
      uint64_t pending = statusMask(st, "SigPnd:") | statusMask(st, "ShdPnd:");
      uint64_t blocked = statusMask(st, "SigBlk:");
      KJ_IF_MAYBE (mask, answer->callMask) {
        if (uint64_t takeNow = pending & ~blocked; takeNow != 0) {
          // Deliverable under the guest's own mask (SIGTSTP of a Ctrl-Z while make waits in
          // pselect6): resuming the guest into one more injected call would make its kernel
          // deliver them at once, a signal-delivery stop that could only suppress them. They
          // are taken after the detach instead; the call fails or restarts as natively (a
          // stop: restarted after SIGCONT). What only the call's mask opens stays pending, and
          // the restarted call is cut short for it (Supervisor::callHome).
          rax = (takeNow & ~*mask) != 0 ? answer->value : -ERESTARTNOINTR;
        } else if (pending & ~*mask) {
          // Taken under the call's mask: the guest's kernel runs ppoll with it (see header).
          ok = inject(__NR_ppoll,
                      {0, 0, scratch_ + offsetof(Scratch, zero), scratch_ + offsetof(Scratch, mask),
                       KERNEL_SIGSET_BYTES},
                      ret);
          rax = ok && ret == -ERESTARTNOHAND ? -ERESTARTNOHAND : -ERESTARTNOINTR;
        } else {
          rax = -ERESTARTNOINTR;  // nothing to take: the call runs again (at home)
        }
      } else {
        rax = (pending & ~blocked) ? answer->value : -ERESTARTNOINTR;
      }
    }
  } else if (inSyscall && rax == -ERESTARTSYS &&
             isNotified(static_cast<int64_t>(saved_.orig_rax))) {
    // The guest was waiting for a notification that nobody had received yet: our interrupt
    // took it out of that wait (the kernel dequeues an unreceived notification and answers
    // ERESTARTSYS), so the call has run nowhere. Natively the signal came just before the
    // call: the handler runs, then the call does. Left as ERESTARTSYS, a handler without
    // SA_RESTART (dash's SIGCHLD) made a close that never ran return EINTR, leaving a
    // pipeline's write end open at home, and a fork fail ("Cannot fork").
    rax = -ERESTARTNOINTR;
  } else if (inSyscall && rax == -EINTR &&
             eintrWhenWoken(static_cast<int>(static_cast<int64_t>(saved_.orig_rax)))) {
    // Our interrupt woke a local call that returns EINTR rather than a restart code
    // (rt_sigtimedwait): restart it unless a handler runs (it finds the signal we queued, if it
    // waits for it).
    rax = -ERESTARTNOHAND;
  }
  if (!ok) {
    spdlog::warn("guest {}: the signal session failed; {} signal(s) not queued", pid_,
                 request_.signals.size());
  }
  ptrace(PTRACE_SETOPTIONS, pid_, 0, PTRACE_O_TRACESYSGOOD);  // the filter applies again
  // Back inside get_signal, before the restart logic: a trap after the last injected call.
  if (sawSyscallStop_) {
    ptrace(PTRACE_INTERRUPT, pid_, 0, 0);
    if (ptrace(PTRACE_CONT, pid_, 0, 0) != 0 || !waitStop(status, PTRACE_CONT)) {
      return InjectOutcome::GONE;
    }
  }
  user_regs_struct back = saved_;
  back.rax = static_cast<uint64_t>(rax);
  putBack();
  ptrace(PTRACE_SETREGS, pid_, 0, &back);
  // Signals we took out and could not queue again are lost; deliver the first one at least.
  ptrace(PTRACE_DETACH, pid_, 0, 0);
  return ok ? InjectOutcome::DONE : InjectOutcome::FAILED;
}

}  // namespace

InjectOutcome injectSignals(const InjectRequest& request, const InjectHost& host) {
  Session session(request, host);
  InjectOutcome outcome = session.run();
  if (spdlog::should_log(spdlog::level::debug)) {
    std::string sigs;
    for (const siginfo_t& info : request.signals) {
      sigs += " " + std::to_string(info.si_signo);
    }
    spdlog::debug("guest {}: signal session [{} ] answer {} outcome {}", request.pid, sigs,
                  request.answer == nullptr ? "none" : "yes", static_cast<int>(outcome));
  }
  return outcome;
}

kj::Maybe<uint64_t> callSignalMask(int nr, const uint64_t (&args)[6],
                                   const std::function<bool(uint64_t, void*, size_t)>& readGuest) {
  const SyscallEntry* row = findSyscall(nr);
  if (row == nullptr) {
    return nullptr;
  }
  uint64_t at = 0;
  uint64_t size = 0;
  for (int i = 0; i < 6; i++) {
    const ArgSpec& spec = row->args[i];
    if (spec.kind == ArgKind::SIGMASK) {
      at = args[i];
      size = args[spec.lenArg];
    } else if (spec.kind == ArgKind::SIGMASK_PAIR && args[i] != 0) {
      uint64_t pair[2];
      if (!readGuest(args[i], pair, sizeof(pair))) {
        return nullptr;
      }
      at = pair[0];
      size = pair[1];
    }
  }
  uint64_t mask;
  if (at == 0 || size != KERNEL_SIGSET_BYTES || !readGuest(at, &mask, sizeof(mask))) {
    return nullptr;
  }
  // SIGKILL and SIGSTOP are never blocked (the kernel drops them from any mask).
  return mask & ~((uint64_t{1} << (SIGKILL - 1)) | (uint64_t{1} << (SIGSTOP - 1)));
}

}  // namespace mos::remote
