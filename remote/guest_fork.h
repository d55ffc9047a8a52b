#pragma once
// The register rewrite at the heart of fork mirroring (issue 6; docs/design.md, "Home ids in the
// guest's kernel"): a guest's fork, vfork or clone of a process is run by the guest's own kernel
// (so memory is copied on write, MAP_SHARED stays shared, futexes work), but as
// clone(flags | CLONE_PARENT), so the child is born a child of the supervisor, not of the
// parent guest: the supervisor's waitpid sees every guest's exit, stop and continue, and the
// parent guest's kernel never holds a zombie or sends a SIGCHLD of its own (the job's wait and
// SIGCHLD are the home kernel's, through the mirrored deputies).
//
// The sequence, validated by tests/unit/guest_fork_test.cc:
//   1. notification of fork/vfork/clone; the supervisor PTRACE_SEIZEs the guest
//      (PTRACE_O_TRACEFORK | TRACEVFORK | TRACECLONE), PTRACE_INTERRUPTs it, and answers
//      -ERESTARTNOINTR: on its way out the guest stops (PTRACE_EVENT_STOP) with the restart
//      pending (rax = -ERESTARTNOINTR, orig_rax = the call);
//   2. rewriteAsSiblingClone() on its registers; PTRACE_CONT: the kernel restarts the call,
//      now clone(CLONE_PARENT...), which is notified again;
//   3. the deputy forks at home (its reply is the child's home pid; asked only now, since a
//      signal pending at step 1 runs its handler before the call restarts, as natively),
//      JobPidNamespace::setNextPid(child's home pid) and CONTINUE: the kernel forks, the parent
//      stops at PTRACE_EVENT_FORK/VFORK/CLONE (the message is the child's node pid), the child
//      at its first stop;
//   4. restoreArgumentRegisters() in both (inline syscall wrappers keep values in the argument
//      registers: glibc's vfork keeps its return address in rdi), then PTRACE_DETACH both.

#include <sys/types.h>
#include <sys/user.h>

namespace mos::remote {

// What the rewrite made of the call in `regs` (orig_rax: fork, vfork or clone).
enum class ForkKind {
  PROCESS,      // rewritten into clone(... | CLONE_PARENT): a new process of the job
  THREAD,       // clone with CLONE_THREAD: not a process fork, left as it was
  UNSUPPORTED,  // new namespaces, CLONE_PIDFD with CLONE_PARENT_SETTID, not a fork call
};

// Rewrites the registers of a guest stopped with its fork/vfork/clone about to restart into the
// equivalent clone with CLONE_PARENT added (fork: SIGCHLD; vfork: CLONE_VM | CLONE_VFORK |
// SIGCHLD). Leaves `regs` as they were unless it returns PROCESS.
ForkKind rewriteAsSiblingClone(user_regs_struct& regs);

// Puts back the argument registers (rdi, rsi, rdx, r10, r8, r9) of `saved` into `regs`, keeping
// everything else (rax: the call's result).
void restoreArgumentRegisters(user_regs_struct& regs, const user_regs_struct& saved);

}  // namespace mos::remote
