#pragma once
// Signals from home with the home kernel's siginfo, queued by the guest itself (issue 6;
// docs/design.md, "Signals with their siginfo").
//
// A signal that reaches a deputy at home carries the siginfo the home kernel wrote: si_code
// SI_USER/SI_TKILL (kill, tgkill from another job process), CLD_EXITED..CLD_CONTINUED (SIGCHLD
// from a home child), SI_KERNEL (the terminal), with si_pid and si_uid as the job sees them. The
// kernel lets a process queue such a siginfo only on itself (rt_tgsigqueueinfo(2): si_code >= 0
// or SI_TKILL is EPERM for another target), so the supervisor makes the guest queue it: a short
// ptrace session (the CRIU way) runs rt_tgsigqueueinfo(self, self, sig, &info) in the guest,
// with the guest's seccomp filter suspended (PTRACE_O_SUSPEND_SECCOMP) and every signal blocked
// meanwhile, and then puts the guest back exactly as it was. Since the guest is in the job's pid
// namespace and user namespace of the node's init, si_pid and si_uid arrive as written.
//
// The session is also how a call with a temporary signal mask (pselect6, ppoll, epoll_pwait,
// epoll_pwait2, forwarded: the mask never reaches the guest's kernel) takes a signal under that
// mask when home interrupted it: the guest's own kernel runs ppoll(NULL, 0, {0, 0}, &mask), which
// installs the mask, finds the signal pending, returns -ERESTARTNOHAND and leaves the caller's
// mask saved for after the handler, exactly what the native call does (signal(7), pselect(2)).
//
// The session (everything on the thread that traces the guest):
//   1. PTRACE_SEIZE (TRACESYSGOOD; SUSPEND_SECCOMP only once stopped, or a syscall the guest
//      enters meanwhile would skip its filter), PTRACE_INTERRUPT; when the guest waits in a
//      received notification, answer it now (the interrupt then stops it on its way out).
//   2. At the interrupt stop (inside the kernel's get_signal, before the syscall restart logic)
//      save the registers; a `syscall` instruction to reuse: the guest's own (rip - 2) when it
//      stopped in a syscall, else two bytes patched at rip and restored afterwards.
//   3. Injected calls, each stopped at its entry and exit: rt_sigprocmask(SETMASK, all, &old);
//      rt_tgsigqueueinfo for each signal; rt_sigprocmask(SETMASK, &old); for a temporary mask,
//      ppoll as above. Signals the kernel would have delivered on the way to the first call are
//      taken out at their delivery stops (GETSIGINFO, suppressed) and queued again first.
//   4. PTRACE_INTERRUPT and PTRACE_CONT: the guest stops again inside get_signal; the saved
//      registers go back (rax: the answer, or the restart code), PTRACE_DETACH. The kernel then
//      delivers what is pending under the guest's mask and restarts or returns as a native call
//      does.
//
// Sources: ptrace(2) (PTRACE_SEIZE, INTERRUPT, GETSIGINFO, syscall stops), rt_sigqueueinfo(2),
// kernel/signal.c (get_signal's order: job-control traps before dequeueing), signal(7).

#include <signal.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <vector>

#include <kj/common.h>

namespace mos::remote {

// What a session does with the notification the guest waits in, if any.
struct PendingAnswer {
  uint64_t id = 0;               // the notification
  int64_t value = 0;             // the result, or -errno
  bool interrupted = false;      // home cut the call short: `value` is the row's restart code, and
                                 // the guest restarts the call instead (it runs home again) unless
                                 // it now has a signal to take
  kj::Maybe<uint64_t> callMask;  // the call's temporary signal mask (bit n-1: signal n)
};

struct InjectRequest {
  pid_t pid = -1;      // the guest's thread, a pid of this node
  pid_t homePid = -1;  // the same thread in the job's pid namespace (its home tid and tgid)
  std::vector<siginfo_t> signals;   // to queue in this order, each as the guest itself would
  kj::Maybe<PendingAnswer> answer;  // when the guest waits in a received notification
};

enum class InjectOutcome {
  DONE,     // queued (and answered)
  STOPPED,  // the guest is in a group stop: nothing queued, nothing answered; it is untouched
  GONE,     // the guest ended (its status was routed by `wait`)
  FAILED,   // ptrace refused (logged): nothing queued; the answer, if any, was sent as it was
  BUSY,     // (idle sessions) the guest waits in a notification its task has not answered yet,
            // or in a wait only SIGKILL ends (a vfork parent): nothing done; queue the signals
            // when answering it, or try again a little later
};

// The kernel calls a session needs from its owner: answering a notification on the shared
// listener, and waiting for the guest (the owner routes an exit to the guest's task).
struct InjectHost {
  // SECCOMP_IOCTL_NOTIF_SEND with `value` (>= 0 result, < 0 -errno); ENOENT when it is gone.
  std::function<int(uint64_t id, int64_t value)> send;
  // waitpid(pid, __WALL) retrying EINTR: the status, or -1.
  std::function<int(pid_t pid)> wait;
};

// Runs one session on the guest `request.pid`. The caller is the guest's tracer for its
// duration (ptrace is per thread: always the same thread), and nothing else may wait for the
// guest meanwhile.
InjectOutcome injectSignals(const InjectRequest& request, const InjectHost& host);

// The temporary signal mask of call `nr` with arguments `args`, at the argument its row's kinds
// name SIGMASK or SIGMASK_PAIR (runtime/syscall_table.h), read through `readGuest` (address,
// bytes out, length: false when unreadable); nullptr when the call has none (or NULL).
kj::Maybe<uint64_t> callSignalMask(int nr, const uint64_t (&args)[6],
                                   const std::function<bool(uint64_t, void*, size_t)>& readGuest);

}  // namespace mos::remote
