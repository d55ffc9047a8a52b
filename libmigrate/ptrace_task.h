#pragma once
// A ptrace-stopped task seen from its tracer: registers, xsave state, signal mask, memory, and
// syscall injection (CRIU compel's compel_execute_syscall, rr's AutoRemoteSyscalls).
// Internal to libmigrate.
//
// Sources: ptrace(2) (PTRACE_GETREGSET/SETREGSET with NT_PRSTATUS and NT_X86_XSTATE,
// PTRACE_GETSIGMASK, PTRACE_SYSCALL, PTRACE_GET_SYSCALL_INFO), proc(5) /proc/PID/mem,
// process_vm_readv(2), seccomp_unotify(2) for injected calls that the task's own filter traps.

#include <signal.h>
#include <sys/types.h>
#include <sys/user.h>
#include <sys/wait.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

#include <kj/io.h>

#include "remote_ptr.h"

namespace mos::migrate {

// waitpid(pid, &status, __WALL | flags) with EINTR retried. Returns the status; with WNOHANG,
// returns -1 when nothing changed. Throws kj::Exception (FAILED) on any other error (ECHILD).
int waitTask(pid_t pid, int flags = 0);

// A readable description of a waitpid status ("exited 3", "killed by SIGKILL", "stopped by
// SIGTRAP|0x80", "event EXEC").
std::string describeStatus(int status);

// True for the stop that PTRACE_SYSCALL produces when PTRACE_O_TRACESYSGOOD is set.
inline bool isSyscallStop(int status) {
  return WIFSTOPPED(status) && WSTOPSIG(status) == (SIGTRAP | 0x80);
}
// The PTRACE_EVENT_* number of an event stop, 0 for any other status.
inline int ptraceEvent(int status) { return WIFSTOPPED(status) ? (status >> 16) & 0xff : 0; }

class PtraceTask {
 public:
  // Preconditions: the caller is `pid`'s tracer. Attaches nothing; the task must be in a
  // ptrace stop whenever a method is called.
  explicit PtraceTask(pid_t pid);

  pid_t pid() const { return pid_; }

  // NT_PRSTATUS: the general registers including fs_base/gs_base.
  user_regs_struct getRegs() const;
  void setRegs(const user_regs_struct& regs);
  // NT_X86_XSTATE: the XSAVE area in the kernel's UABI layout; its size is this CPU's.
  std::vector<uint8_t> getXstate() const;
  void setXstate(std::span<const uint8_t> xstate);
  // Blocked signals, bit (n-1) for signal n (PTRACE_GETSIGMASK/SETSIGMASK).
  uint64_t getSigmask() const;
  void setSigmask(uint64_t mask);

  // Memory through /proc/PID/mem (FOLL_FORCE: reads PROT_NONE pages and writes read-only private
  // pages). Throws kj::Exception (FAILED) on a short transfer (unmapped address).
  void readMem(RemotePtr<uint8_t> addr, std::span<uint8_t> out);
  void writeMem(RemotePtr<uint8_t> addr, std::span<const uint8_t> in);
  // process_vm_readv(2): fast bulk copy of readable memory. Returns the bytes copied.
  size_t readMemFast(RemotePtr<uint8_t> addr, std::span<uint8_t> out);
  // process_vm_writev(2): fast bulk copy into writable memory (no FOLL_FORCE: read-only and
  // PROT_NONE pages stop it). Returns the bytes copied, 0 on any error.
  size_t writeMemFast(RemotePtr<uint8_t> addr, std::span<const uint8_t> in);
  template <typename T>
  void writeValue(RemotePtr<T> addr, const T& value) {
    writeMem(addr.template cast<uint8_t>(),
             std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&value), sizeof(T)));
  }
  // Writes `s` and a NUL; returns the address just past the NUL.
  RemotePtr<char> writeString(RemotePtr<char> addr, const std::string& s);

  // The address of the first `syscall` instruction (0f 05) in [start, end), or null. Used with
  // the vDSO's range (rr's find_syscall_instruction_in_vdso): every process has one there.
  RemotePtr<uint8_t> findSyscallInstruction(uint64_t start, uint64_t end);

  // Where injected syscalls execute: the address of a `syscall` instruction (0f 05) in the task.
  void setSyscallInstruction(RemotePtr<uint8_t> insn) { syscallInsn_ = insn; }
  // While an injected syscall runs, called repeatedly (every few milliseconds) until the
  // syscall-exit stop arrives; used to answer seccomp notifications that the task's own filter
  // raises for the injected call. Without it, injection blocks in waitpid.
  void setWhileInSyscall(std::function<void()> poll) { whileInSyscall_ = std::move(poll); }

  // Executes syscall `nr` with `args` in the task: sets rip to the syscall instruction and the
  // argument registers, runs it with PTRACE_SYSCALL to its entry stop and to its exit stop, and
  // returns rax (a -errno on failure). The task is left at the exit stop with rip after the
  // instruction; other registers are not restored (callers set the final registers last).
  // Preconditions: the task is in a ptrace stop and PTRACE_O_TRACESYSGOOD is set.
  // Throws kj::Exception (FAILED) if the task leaves the expected stops (killed, signal).
  long syscall(long nr, std::initializer_list<uint64_t> args);
  // Like syscall() but throws kj::Exception (FAILED) naming `what` when the result is -errno.
  uint64_t syscallOrThrow(const char* what, long nr, std::initializer_list<uint64_t> args);
  // How many syscalls this object has injected.
  uint64_t injected() const { return injected_; }
  // The id of the task the last injected clone/clone3/fork made, as the tracer sees it (the
  // PTRACE_EVENT_CLONE message: in another pid namespace than the task's, its result differs);
  // 0 before any.
  pid_t lastChild() const { return lastChild_; }

 private:
  int waitSyscallStop(bool entry);
  int memFd();

  pid_t pid_;
  kj::AutoCloseFd mem_;
  RemotePtr<uint8_t> syscallInsn_;
  std::function<void()> whileInSyscall_;
  uint64_t injected_ = 0;
  pid_t lastChild_ = 0;
};

}  // namespace mos::migrate
