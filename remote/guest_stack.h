#pragma once
// The guest's user-space call stack at a trapped system call (mostrace -k, issue 7), unwound on
// the remote node while the thread waits in its seccomp notification.
//
// Where the registers come from. Unwinding needs the thread's user ip, sp and the frame pointer
// (the callers' canonical frame addresses are usually rbp-based), but a thread that waits in a
// received seccomp notification cannot be ptrace-stopped: the guest's filter has
// SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, so its wait is TASK_KILLABLE and PTRACE_INTERRUPT only
// takes effect after the answer (tests/unit/guest_stack_test.cc checks this), and
// /proc/PID/syscall shows only sp and ip. So each sampled thread has a perf software event on its
// context switches (PERF_COUNT_SW_CONTEXT_SWITCHES, period 1) that records PERF_SAMPLE_REGS_USER:
// when the trapped thread goes to sleep in its notification wait, the kernel copies the user
// registers it entered the syscall with (ip, sp, bp, the argument registers; rbx and r12..r15
// read as unknown, perf's rule for syscall entry). GuestStackSampler::trappedRegs finds the
// sample of the notified trap (same ip, same argument registers) in the event's ring buffer.
//
// How the stack is unwound. libunwind's remote API with our accessors: memory through
// process_vm_readv of the guest (its stack and its mapped .eh_frame_hdr/.eh_frame), registers
// from the sample, and the unwind tables and symbols through libunwind-ptrace's helpers
// (_UPT_find_proc_info, _UPT_get_proc_name), which read /proc/PID/maps and the ELF files mapped
// there: on a remote node those are the content cache's copies of the job's own binaries and
// libraries. No ptrace is used (the _UPT_* helpers named here do not call it).
//
// Cost: nothing until a sampler exists. A sampler costs one perf sample of about 200 bytes per
// context switch of its thread; an unwind reads a few hundred bytes of guest memory per frame
// and parses ELF files (libunwind caches what it can).

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <linux/seccomp.h>

#include <functional>

#include <kj/common.h>
#include <kj/io.h>

#include "trace_channel.h"

namespace mos::remote {

// One frame of a guest stack, innermost first.
struct StackFrame {
  uint64_t ip = 0;      // frame 0: the address after the syscall instruction; others: the
                        // return address into that frame
  std::string module;   // the file mapped at ip, as /proc/PID/maps names it ("" if anonymous)
  std::string symbol;   // the ELF symbol (.symtab or .dynsym) containing ip ("" if none)
  uint64_t offset = 0;  // ip - the symbol's address (0 when there is no symbol)
};

// The user registers a thread entered its syscall with. `partial`: only ip and sp are known
// (from /proc/PID/syscall); the unwind stops where it would need another register.
struct TrappedRegs {
  uint64_t ax = 0, bx = 0, cx = 0, dx = 0, si = 0, di = 0, bp = 0, sp = 0, ip = 0;
  uint64_t r8 = 0, r9 = 0, r10 = 0, r11 = 0, r12 = 0, r13 = 0, r14 = 0, r15 = 0;
  bool partial = false;
};

// A perf event on one thread's context switches that keeps the user registers of each switch.
class GuestStackSampler {
 public:
  // Starts sampling node thread `tid`. Throws kj::Exception (FAILED) with perf_event_open's
  // errno: EACCES or EPERM without CAP_PERFMON (kernel.perf_event_paranoid), ENOENT or ENOSYS
  // without perf events, ESRCH when the thread is gone.
  explicit GuestStackSampler(pid_t tid);
  ~GuestStackSampler();
  KJ_DISALLOW_COPY(GuestStackSampler);

  pid_t tid() const { return tid_; }

  // The registers of the trap now notified: the newest sample whose ip is `ip` and whose
  // argument registers are `args` (seccomp_data's instruction_pointer and args). Waits up to
  // `timeoutMs` milliseconds for it: the thread switches out only after it notified the
  // supervisor. nullptr when no such sample came (the sampler was made after the thread went to
  // sleep, or samples were lost).
  kj::Maybe<TrappedRegs> trappedRegs(uint64_t ip, const uint64_t (&args)[6], int timeoutMs);

 private:
  // Consumes every record in the ring; keeps the newest matching sample in *found.
  void drain(uint64_t ip, const uint64_t (&args)[6], kj::Maybe<TrappedRegs>* found);

  pid_t tid_;
  kj::AutoCloseFd fd_;
  void* ring_ = nullptr;
  size_t ringBytes_ = 0;  // the whole mapping: one metadata page and the data pages
};

// ip and sp of node thread `tid` blocked in a syscall (/proc/TID/syscall), as partial registers.
// nullptr when the thread is not in a syscall or is gone.
kj::Maybe<TrappedRegs> syscallRegs(pid_t tid);

// Unwinds node thread `tid`, whose registers are `regs`, at most `maxFrames` frames deep.
// Preconditions: the thread stays stopped (in a notification wait) during the call. Never
// throws for an unreadable or odd stack: the frames found so far are returned.
std::vector<StackFrame> unwindGuest(pid_t tid, const TrappedRegs& regs, size_t maxFrames = 64);

// The stacks of one guest's threads for the trace hook: a sampler per thread, made the first
// time a stack of that thread is asked for. That first call finds no sample (the thread went to
// sleep before its sampler existed) and falls back to /proc/TID/syscall: frame 0 and the frames
// that unwind without rbp. Not thread safe: one per supervisor task.
class GuestStacks {
 public:
  GuestStacks();
  ~GuestStacks();
  KJ_DISALLOW_COPY(GuestStacks);

  // The stack of node thread `tid`, trapped now at `ip` with `args` (a received notification's
  // pid, data.instruction_pointer and data.args). Waits at most 20 ms for the sample.
  std::vector<StackFrame> capture(pid_t tid, uint64_t ip, const uint64_t (&args)[6]);

  // Closes every sampler (nobody asks for stacks any more): the threads' context switches cost
  // nothing again.
  void stop() { samplers_.clear(); }
  bool sampling() const { return !samplers_.empty(); }

 private:
  std::map<pid_t, std::unique_ptr<GuestStackSampler>> samplers_;
  bool warned_ = false;  // perf unavailable: logged once
};

// The trace hook's step for stacks (mostrace -k; docs/design.md "Tracing"), called by the
// supervisor between the TraceCall's construction and the answer to `notif`, while the guest
// thread still waits: when a subscriber asked for stacks, unwinds the thread that trapped
// (notif.pid) into the event, modules named by `homePath` (content-cache path -> the job's home
// path; identity when empty). When nobody asks any more, closes the samplers. Costs nothing
// when the event is not traced (one branch in TraceCall::wantsStack).
void traceGuestStack(TraceCall& trace, GuestStacks& stacks, const seccomp_notif& notif,
                     const std::function<std::string(const std::string&)>& homePath);

}  // namespace mos::remote
