#pragma once
// The pid namespace of one job on this node (docs/design.md, "Home ids in the guest's kernel").
//
// Every guest of a job lives in a pid namespace of its own whose init (pid 1) is a reaper forked
// from the supervisor, and is created inside it with its home pid as its pid (clone3 set_tid,
// as CRIU restores pids). The guest's own kernel then agrees with the ids the job sees: si_pid of
// signals the kernel sends, the tid words of CLONE_*SETTID and FUTEX_LOCK_PI, /proc NSpid.
//
// The reaper also writes the namespace's ns_last_pid on request (setNextPid): the kernel takes
// that value from the writer's own pid namespace, so only a process inside it can set where the
// next pid of the namespace is allocated, which is how a fork that the guest's kernel runs itself
// gives the child its home pid.
//
// Lifetime: the reaper dies with the supervisor thread that created it (PR_SET_PDEATHSIG, and
// the end of its control socket), and when a namespace's init dies the kernel SIGKILLs every
// process in it, so neither a guest nor the namespace outlives the supervisor, whatever ends it
// (the job, mosd, a node kill).
//
// Sources: pid_namespaces(7) (init of a namespace, its death, signals to it, ns_last_pid),
// clone(2) (clone3 set_tid: "the first process in a new pid namespace must be pid 1"),
// prctl(2) PR_SET_PDEATHSIG.

#include <sys/types.h>

#include <kj/common.h>
#include <kj/io.h>

namespace mos::remote {

class JobPidNamespace {
 public:
  JobPidNamespace() = default;
  KJ_DISALLOW_COPY(JobPidNamespace);
  JobPidNamespace(JobPidNamespace&& other) noexcept;
  JobPidNamespace& operator=(JobPidNamespace&& other) noexcept;
  // Kills the reaper (and with it every process of the namespace) and reaps it, reaping every
  // other child of the caller on the way (the namespace's death waits for its guests, the
  // caller's children, to be reaped).
  ~JobPidNamespace();

  // Moves the calling process's future children into a new pid namespace
  // (unshare(CLONE_NEWPID)) and forks its init, the reaper. From then on every fork of the
  // caller is born in the namespace; restore() with RestoreOptions::pid places the guest at its
  // home pid there. The caller itself moves into a new IPC namespace at once (CLONE_NEWIPC):
  // the job's System V IPC, which its guests share.
  // Preconditions: the caller is single-threaded, has CAP_SYS_ADMIN, and has not created a pid
  // namespace for its children before (unshare allows it once per process).
  // Throws kj::Exception (FAILED) when the kernel refuses (EPERM without the capability, EINVAL,
  // ENOSPC at the nesting limit) or the fork fails.
  static JobPidNamespace create();

  // The reaper's pid on this node (its pid in the namespace is 1); -1 when none.
  pid_t reaper() const { return reaper_; }

  // True when `pid` (a pid of this node that waitpid returned) is the reaper.
  bool isReaper(pid_t pid) const { return pid == reaper_ && pid > 0; }

  // Forgets a reaper that waitpid already reaped (it died: the namespace died with it).
  void reaped() {
    reaper_ = -1;
    control_ = nullptr;
  }

  // Makes `pid` (a pid in the namespace, >= 2) the next pid the namespace allocates, if it is
  // free then: the reaper writes pid - 1 to ns_last_pid. Returns 0 or the errno of the write
  // (EINVAL outside 1..pid_max), or EPIPE when the reaper is gone. Synchronous, one round trip
  // to the reaper (tens of µs).
  // Preconditions: no other process of the namespace forks until the intended fork is done
  // (the caller serializes the forks of its job).
  int setNextPid(pid_t pid);

  // Queues signal `sig` on process `pid` of the namespace from inside it (the reaper's
  // rt_tgsigqueueinfo), so its si_pid survives: the kernel zeroes si_pid of a signal queued from
  // an ancestor namespace. si_code is SI_QUEUE (only a process itself may queue other codes),
  // si_pid `fromPid`, si_uid `uid`, si_value `value`. Returns 0, the errno of the call, or
  // EPIPE when the reaper is gone. Not thread safe (the caller serializes reaper requests).
  int queueSignal(pid_t pid, int sig, pid_t fromPid, uid_t uid, int value);

 private:
  void end();  // what the destructor does
  // Sends one request of `bytes` to the reaper and returns its answer (0 or an errno); EPIPE
  // when the reaper is gone.
  int ask(const void* request, size_t bytes);
  JobPidNamespace(pid_t reaper, kj::AutoCloseFd control)
      : reaper_(reaper), control_(kj::mv(control)) {}
  pid_t reaper_ = -1;
  kj::AutoCloseFd control_;  // SOCK_SEQPACKET to the reaper: int32 requests, int32 answers
};

// The reaper's body, in the forked child: closes every descriptor but 0..2 and `control`, dies
// with the supervisor, reaps every process that the namespace hands to it, and serves
// setNextPid requests on `control`, until it is killed or `control` closes.
// `parentPidfd`: a pidfd of the supervisor, opened before the fork (to notice that it died
// before PR_SET_PDEATHSIG was armed).
[[noreturn]] void runReaper(int parentPidfd, int control);

}  // namespace mos::remote
