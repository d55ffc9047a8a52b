#pragma once
// Signals of the job's home process while it is a deputy (DESIGN.md, "the hard parts").
//
// Every signal that reaches P at home belongs to the job: it is recorded by one handler and sent
// to the guest as a ToRemote.signal message (protocol/job.capnp). The deputy keeps every signal
// blocked except in two windows: inside ppoll(2) while it waits for the next message, and around
// the raw system call of a forwarded call, so that a signal interrupts a blocked forwarded call
// (read on an empty pipe, wait4, nanosleep) exactly as it would interrupt the job natively.
//
// The race in the second window: signals are unblocked, the wrapper checks "nothing pending" and
// is about to execute `syscall` when a signal arrives. Its handler runs and returns, and the call
// then blocks with the signal already consumed. The wrapper (syscall_x86_64.S) has labels around
// the check and the instruction; the handler looks at the interrupted rip (ucontext REG_RIP) and,
// when it lies in [deputy_syscall_check, deputy_syscall_insn], moves it to a stub that returns
// -EINTR without entering the kernel (the classic fix; musl's pthread cancellation points).
// A signal that arrives once the kernel is entered interrupts the call itself (the handler has
// no SA_RESTART), which also returns -EINTR.
//
// Deputy threads (one per guest thread) share the recorded set and the pending flag, so a signal
// may be forwarded by another thread than the one it interrupted (docs/design.md, "Threads");
// the cancel flag is per thread.

#include <signal.h>

#include <cstdint>
#include <vector>

extern "C" {
// One raw system call; returns the kernel's result (>= 0, or -errno). Hidden symbols of
// syscall_x86_64.S.
__attribute__((visibility("hidden"))) long deputy_syscall(long nr, long a1, long a2, long a3,
                                                          long a4, long a5, long a6);
// Nonzero while a recorded signal has not been taken by takePendingSignals().
__attribute__((visibility("hidden"))) extern volatile uint64_t deputy_signals_pending;
}

namespace mos::deputy {

// Installs the recording handler (SA_SIGINFO, no SA_RESTART, every signal blocked while it runs)
// for every catchable signal except those whose disposition is SIG_IGN now (the job's choice,
// inherited across the deputy's execve: SIG_IGN of SIGCHLD keeps auto-reaping the job's
// children). A fault of the deputy's own code (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS with
// si_code > 0) is not recorded: the handler restores SIG_DFL and the fault kills the deputy.
// Idempotent. Throws kj::Exception (FAILED) if sigaction(2) fails on a standard signal.
void installSignalHandlers();

// SIGCHLD's disposition as the guest set it (ToDeputy.childDisposition): 0 our recording
// handler, 1 SIG_IGN, 2 our handler with SA_NOCLDWAIT. With 1 or 2 the home kernel reaps the
// job's children itself, and wait(2) blocks until they are all gone, then fails with ECHILD.
void mirrorChildDisposition(int mode);

// Blocks every signal (sigprocmask(2)); the deputy's state outside its two windows.
void blockAllSignals();

// The empty set, for ppoll(2)'s sigmask argument.
const sigset_t& openSignalMask();

// True when a signal was recorded and not yet taken.
inline bool signalsPending() {
  return __atomic_load_n(&deputy_signals_pending, __ATOMIC_SEQ_CST) != 0;
}

// Takes the recorded signals in delivery order (ascending numbers; a real-time signal as many
// times as it arrived, a standard one once). Call with signals blocked.
std::vector<int> takePendingSignals();

// Takes the signals that the home kernel directed at the calling deputy thread (tgkill/tkill of
// its tid: si_code SI_TKILL), in the same order; they belong to this thread's guest thread.
// Independent of signalsPending(). Call with signals blocked.
std::vector<int> takeThreadSignals();
// Takes the recorded signals as takePendingSignals() does, each with the siginfo the kernel
// gave the handler: for a standard signal the first arrival's since the last take (the kernel
// keeps the first siginfo of a pending standard signal), for a real-time one each arrival's (a
// signal recorded by recordSignal(), or an arrival beyond the RT_INFOS kept, has only si_signo
// and si_code SI_USER).
std::vector<siginfo_t> takePendingSignalInfos();

// si_pid and si_status of the last SIGCHLD that arrived (0, 0 before any).
struct ChildSignalInfo {
  int32_t pid;
  int32_t status;
};
ChildSignalInfo lastChildSignal();

// Records `sig` as if it had arrived (tests, and re-recording after a failed exec).
void recordSignal(int sig);

// True (once) when the supervisor cancelled the forwarded call in progress: it sends one byte of
// TCP urgent data on the job channel, whose owner (F_SETOWN_EX) is the deputy's thread, and the
// kernel's SIGURG (si_code SI_KERNEL) interrupts the call like a job signal would, without being
// forwarded as one. SIGURG therefore always has our handler, even when the job ignores it.
bool takeCancel();

// A deputy thread hands an exec to the leader deputy thread (tid `leader`, the process's pid):
// a SIGURG queued to it with a marker (si_code SI_QUEUE, our pid, EXEC_HANDOFF_VALUE), which
// interrupts its wait or forwarded call like a signal and is not a job signal. takeExecHandoff()
// is true (once) in the process after it arrived.
inline constexpr int EXEC_HANDOFF_VALUE = 0x6d6f7365;
void requestExecHandoff(pid_t leader);
bool takeExecHandoff();

// The deputy's control socket (deputy/control.h) raises SIGURG with si_code POLL_IN and si_fd its
// number when `migrate` connects (O_ASYNC, F_SETSIG); like a cancel, it interrupts the wait or
// the forwarded call in progress and is not a job signal. setControlFd() names the socket (-1:
// none); takeControlRequest() is true (once) after such a SIGURG.
void setControlFd(int fd);
bool takeControlRequest();

// Runs system call `nr` with `args` through deputy_syscall with every signal unblocked, then
// restores the caller's mask. Returns the kernel's result; -EINTR when a signal arrived before
// or during the call (a signal recorded before the call cancels it without entering the kernel).
long interruptibleSyscall(long nr, const uint64_t (&args)[6]);

}  // namespace mos::deputy
