#include "guest_fork.h"

#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>

namespace mos::remote {

namespace {

// Flags a guest may not pass: namespaces of its own (the sandbox), and CLONE_PIDFD, whose pidfd
// would be a descriptor of this node.
constexpr unsigned long REFUSED = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC |
                                  CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_PIDFD;

}  // namespace

ForkKind rewriteAsSiblingClone(user_regs_struct& regs) {
  unsigned long flags;
  switch (regs.orig_rax) {
    case __NR_fork:
      flags = SIGCHLD;
      break;
    case __NR_vfork:
      flags = CLONE_VM | CLONE_VFORK | SIGCHLD;
      break;
    case __NR_clone:
      flags = regs.rdi;
      if (flags & CLONE_THREAD) {
        return ForkKind::THREAD;
      }
      if (flags & REFUSED) {
        return ForkKind::UNSUPPORTED;
      }
      break;
    default:
      return ForkKind::UNSUPPORTED;
  }
  if (regs.orig_rax != __NR_clone) {
    regs.rsi = 0;  // no new stack: the child returns on the parent's (vfork: the same) stack
    regs.rdx = 0;
    regs.r10 = 0;
    regs.r8 = 0;
  }
  regs.orig_rax = __NR_clone;
  regs.rdi = flags | CLONE_PARENT;
  return ForkKind::PROCESS;
}

void restoreArgumentRegisters(user_regs_struct& regs, const user_regs_struct& saved) {
  regs.rdi = saved.rdi;
  regs.rsi = saved.rsi;
  regs.rdx = saved.rdx;
  regs.r10 = saved.r10;
  regs.r8 = saved.r8;
  regs.r9 = saved.r9;
}

}  // namespace mos::remote
