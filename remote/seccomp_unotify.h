#pragma once
// The kernel facilities the notification loop acts through, behind two narrow interfaces
// (sandbox2's SeccompUnotify shape): SeccompUnotify is one seccomp user-notification listener
// (seccomp_unotify(2)), GuestProcess is the guest process the listener's notifications come
// from (its memory, its signals, its /proc entry, its wait status). The supervisor touches the
// guest only through them, so its loop runs against the kernel in production (KernelUnotify,
// ChildGuest) and against fakes in tests/unit/notify_loop_test.cc.
//
// Errors follow STYLE.md: what the kernel reports as a routine race (the target died or left its
// wait, ENOENT) comes back as an errno value; anything else is a bug or a broken environment and
// throws kj::Exception.

#include <linux/seccomp.h>
#include <signal.h>
#include <sys/types.h>

#include <cstdint>
#include <string>

#include <kj/common.h>
#include <kj/function.h>
#include <kj/io.h>

#include "marshal.h"

namespace mos::remote {

// One seccomp user-notification listener: the descriptor that SECCOMP_FILTER_FLAG_NEW_LISTENER
// returned for the guest's filter (seccomp_unotify(2)). Every notification of the guest is
// received here and answered exactly once, or left unanswered when its target is gone.
class SeccompUnotify {
 public:
  virtual ~SeccompUnotify() noexcept(false) = default;

  // A descriptor that polls readable (POLLIN) while a notification waits to be received.
  virtual int fd() const = 0;

  // SECCOMP_IOCTL_NOTIF_RECV: fills `notif` (id, pid: the target's tid, data: its syscall
  // number, architecture and six arguments) with the next notification. Does not block when
  // fd() polled readable.
  // Returns 0, or a routine race: ENOENT (the target was killed, or a signal interrupted its
  // call, as the notification was being generated: nothing to answer), EINTR.
  // Throws kj::Exception for other failures.
  [[nodiscard]] virtual int receive(seccomp_notif& notif) = 0;

  // SECCOMP_IOCTL_NOTIF_SEND: answers notification `resp.id`. With
  // SECCOMP_USER_NOTIF_FLAG_CONTINUE in `resp.flags` the kernel executes the target's call itself
  // (`val` and `error` must be 0); otherwise the call returns `val`, or fails with errno
  // `-resp.error` when `error` is a negative errno.
  // Returns 0, or ENOENT: the notification no longer exists (the target terminated, or a signal
  // handler interrupted its call) and nobody sees the answer. Routine.
  // Throws kj::Exception for other failures (EINPROGRESS: answered twice; EINVAL).
  [[nodiscard]] virtual int send(const seccomp_notif_resp& resp) = 0;

  // SECCOMP_IOCTL_NOTIF_ID_VALID: true while notification `id` still waits for its answer, that
  // is, while its target still exists and is blocked in that very call. Guest memory read or
  // written since the notification was received belongs to its target only if this holds
  // afterwards (a tid can be reused once its task is gone; seccomp_unotify(2), NOTES).
  [[nodiscard]] virtual bool idValid(uint64_t id) = 0;

  // SECCOMP_IOCTL_NOTIF_ADDFD: installs a duplicate of our descriptor `addfd.srcfd` in the
  // target's fd table, at `addfd.newfd` with SECCOMP_ADDFD_FLAG_SETFD (closing what was there),
  // else at the lowest free number; `newfd_flags` may hold O_CLOEXEC. The notification stays
  // unanswered unless SECCOMP_ADDFD_FLAG_SEND is in `addfd.flags`.
  // Returns the descriptor number in the target (>= 0), or -errno: ENOENT (the notification is
  // gone: target killed or interrupted), EBADF (the target's RLIMIT_NOFILE would be exceeded, or
  // a bad srcfd), EMFILE (newfd beyond fs.nr_open), EINPROGRESS (not received yet, or already
  // answered), EBUSY (FLAG_SEND while other ADDFDs are pending), EINVAL (bad flags).
  [[nodiscard]] virtual int addFd(const seccomp_notif_addfd& addfd) = 0;
};

// The real listener: ioctl(2) on the descriptor the kernel gave the guest's filter. Buffers are
// sized by SECCOMP_GET_NOTIF_SIZES (a newer kernel may have larger structures than our headers).
class KernelUnotify final : public SeccompUnotify {
 public:
  // Takes the listener descriptor. Throws kj::Exception if SECCOMP_GET_NOTIF_SIZES fails.
  explicit KernelUnotify(kj::AutoCloseFd listener);

  int fd() const override { return listener_.get(); }
  [[nodiscard]] int receive(seccomp_notif& notif) override;
  [[nodiscard]] int send(const seccomp_notif_resp& resp) override;
  [[nodiscard]] bool idValid(uint64_t id) override;
  [[nodiscard]] int addFd(const seccomp_notif_addfd& addfd) override;

 private:
  kj::AutoCloseFd listener_;
  size_t notifSize_;  // the kernel's struct seccomp_notif, bytes
  size_t respSize_;   // the kernel's struct seccomp_notif_resp, bytes
};

// The guest process, one thread for now, as the supervisor acts on it outside its notifications.
class GuestProcess {
 public:
  virtual ~GuestProcess() noexcept(false) = default;

  // Its pid on this node (for logs and the job record).
  virtual pid_t pid() const = 0;

  // Its address space. Every failure reads as EFAULT (GuestMemory); the caller checks
  // SeccompUnotify::idValid before trusting what it read or acting on what it wrote.
  virtual GuestMemory& memory() = 0;

  // Queues signal `sig` (1..64) on the guest's thread: tgkill(2), or rt_tgsigqueueinfo(2) with
  // `info` when it is not null (its si_code must be negative or SI_QUEUE: the kernel lets only a
  // process itself queue SI_USER or SI_TKILL). A guest blocked in a received notification waits
  // killably, so the signal acts when that call is answered. Failures (guest gone) are ignored.
  virtual void queueSignal(int sig, const siginfo_t* info) = 0;

  // Queues `sig` on this guest thread itself (tgkill(2)), for a signal the home kernel directed
  // at its deputy thread. A process's only thread: queueSignal.
  virtual void queueThreadSignal(int sig) { queueSignal(sig, nullptr); }

  // The content of the guest's /proc/PID/`name` ("status", "maps", ...), or "" when it is gone.
  virtual std::string procFile(const std::string& name) = 0;

  // A descriptor that polls readable (POLLIN) when the guest may have changed state (SIGCHLD).
  virtual int eventFd() const = 0;

  // The next change of state of the guest as a waitpid(2) status (exited, killed, stopped,
  // continued), or nullptr when there is none. Drains eventFd(); reaps the guest once it ended.
  virtual kj::Maybe<int> nextEvent() = 0;

  // SIGKILLs the guest and reaps it. For a job that ends while its guest still runs.
  virtual void kill() = 0;
};

// What both kinds of real guest do (ChildGuest, RoutedGuest): queue `sig` on process `pid` of
// this node (tgkill, or rt_tgsigqueueinfo(2) with `info`; failures, such as ESRCH for a guest
// that is gone, are ignored), and read /proc/PID/NAME of this node ("" when it is unreadable).
void queueSignalOnNode(pid_t pid, int sig, const siginfo_t* info);
std::string readNodeProcFile(pid_t pid, const std::string& name);

// The real guest: a child of this process (the restored stub), with SIGCHLD blocked and read
// through a signalfd. The supervisor owns waitpid(-1, __WALL) (design decision 8): nextEvent()
// reaps every child and reports only the guest's; the end of any other child (the reaper of the
// guest's pid namespace) goes to the handler given to onOtherChild.
class ChildGuest final : public GuestProcess {
 public:
  // `sigchld` is a signalfd for SIGCHLD (non-blocking), which the caller blocked before the
  // guest was started so that no exit is lost.
  ChildGuest(pid_t pid, kj::AutoCloseFd sigchld)
      : pid_(pid), memory_(pid), sigchld_(kj::mv(sigchld)) {}

  pid_t pid() const override { return pid_; }
  GuestMemory& memory() override { return memory_; }
  void queueSignal(int sig, const siginfo_t* info) override;
  std::string procFile(const std::string& name) override;
  int eventFd() const override { return sigchld_.get(); }
  kj::Maybe<int> nextEvent() override;
  void kill() override;

  // Called with the pid and waitpid(2) status of every other child that nextEvent() reaps.
  void onOtherChild(kj::Function<void(pid_t, int)> handler) { otherChild_ = kj::mv(handler); }

 private:
  pid_t pid_;
  ProcessMemory memory_;
  kj::AutoCloseFd sigchld_;
  kj::Maybe<kj::Function<void(pid_t, int)>> otherChild_;
};

}  // namespace mos::remote
