#pragma once
// The guests of one job on this node and the threads that serve them (issue 6; docs/design.md,
// "Fork mirroring"). One supervisor process serves every process of the job that runs here:
//
//   main thread  owns the shared seccomp listener (every guest of the job inherits its parent's
//                filter, so all their notifications arrive on one descriptor), routes each
//                notification by notif.pid to its task, owns waitpid(-1, __WALL) (every guest is
//                a child of the supervisor: CLONE_PARENT) and routes each wait status to its
//                task, owns ptrace and runs the forks one at a time (ns_last_pid is never raced),
//                and accepts the child deputies' job channels.
//   one worker thread per task (a guest process, or one more thread of one: each with its own
//                deputy process or deputy thread and channel): a Supervisor loop over its own
//                channel, its routed notifications and its routed wait statuses (a thread's
//                end: a PIDFD_THREAD pidfd), doing the blocking round trips.
//
// A task's worker reaches the kernel through RoutedUnotify (the shared listener's SEND,
// ID_VALID, ADDFD; RECV is the main thread's) and RoutedGuest (the guest's memory, signals,
// /proc; its wait statuses come from the main thread), so Supervisor's loop is unchanged.

#include <sys/types.h>
#include <sys/user.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <kj/io.h>

#include "pid_namespace.h"
#include "seccomp_unotify.h"
#include "supervisor.h"

namespace mos::remote {

// A queue of `T` that a poll(2) loop can wait on: fd() polls readable while it is not empty.
template <typename T>
class PollQueue {
 public:
  PollQueue();
  int fd() const { return event_.get(); }
  void push(T value);
  // The oldest value, or nullptr when empty.
  kj::Maybe<T> pop();
  bool empty();

 private:
  std::mutex mutex_;
  std::deque<T> values_;
  kj::AutoCloseFd event_;  // eventfd (EFD_SEMAPHORE): one count per queued value
};

// The shared listener as one task sees it: notifications come from the main thread's routing.
class RoutedUnotify final : public SeccompUnotify {
 public:
  explicit RoutedUnotify(SeccompUnotify& shared) : shared_(shared) {}
  int fd() const override { return queue_.fd(); }
  [[nodiscard]] int receive(seccomp_notif& notif) override;
  [[nodiscard]] int send(const seccomp_notif_resp& resp) override { return shared_.send(resp); }
  [[nodiscard]] bool idValid(uint64_t id) override { return shared_.idValid(id); }
  [[nodiscard]] int addFd(const seccomp_notif_addfd& addfd) override {
    return shared_.addFd(addfd);
  }
  void push(const seccomp_notif& notif) { queue_.push(notif); }
  // True while a routed notification waits for its task (received, not answered).
  bool hasQueued() { return !queue_.empty(); }

 private:
  SeccompUnotify& shared_;
  PollQueue<seccomp_notif> queue_;
};

// A guest process, or one thread of it, as one task sees it: a process's wait statuses come
// from the main thread, which reaps; a thread's end from a pidfd of that thread (PIDFD_THREAD).
class RoutedGuest final : public GuestProcess {
 public:
  // The process `pid` (its leader).
  explicit RoutedGuest(pid_t pid) : pid_(pid), tgid_(pid), memory_(pid) {}
  // Thread `tid` of process `tgid` (not its leader); `pidfd` polls readable once it ended.
  RoutedGuest(pid_t tid, pid_t tgid, kj::AutoCloseFd pidfd)
      : pid_(tid), tgid_(tgid), memory_(tid), threadEnd_(kj::mv(pidfd)) {}
  pid_t pid() const override { return pid_; }
  GuestMemory& memory() override { return memory_; }
  // Process-directed (to the thread group): the guest's kernel picks a thread that does not
  // block it, as the home kernel does for a signal to P.
  void queueSignal(int sig, const siginfo_t* info) override;
  void queueThreadSignal(int sig) override;
  std::string procFile(const std::string& name) override;
  int eventFd() const override { return threadEnd_.get() >= 0 ? threadEnd_.get() : events_.fd(); }
  // A thread: its end, once, as an exit status 0.
  kj::Maybe<int> nextEvent() override;
  // SIGKILL of the whole process: the main thread reaps it and reports the death to no one.
  void kill() override;
  void push(int status) { events_.push(status); }

 private:
  pid_t pid_;
  pid_t tgid_;
  ProcessMemory memory_;
  PollQueue<int> events_;
  kj::AutoCloseFd threadEnd_;
  bool threadEndReported_ = false;
};

// Thrown by a task's Supervisor where a job's supervisor would exit: the task ends, the job
// goes on while other tasks live.
struct TaskEnded {
  int status;
};

class GuestFamily final : public ForkHost {
 public:
  // `listener`: the job's seccomp listener; `sigchld`: a non-blocking signalfd for SIGCHLD
  // (blocked); `pidNamespace`: the job's namespace (its reaper is our child).
  GuestFamily(SupervisorOptions options, kj::Own<SeccompUnotify> listener, kj::AutoCloseFd sigchld,
              JobPidNamespace pidNamespace);
  KJ_DISALLOW_COPY(GuestFamily);
  ~GuestFamily() noexcept(false);

  // Serves the job: `first` (restored, its `started` sent) becomes the first task, whose guest is
  // `pid`. `threads`: the guest's other threads as restored ((node tid, home tid), stopped and
  // traced by the calling thread): each gets a deputy thread at its home tid (ForkRequest.tid on
  // `first`'s channel) and a task, and runs once its channel arrived. Returns when every task
  // ended (the caller exits; the namespace dies with us).
  void run(Supervisor& first, pid_t pid, std::vector<std::pair<pid_t, pid_t>> threads = {});

  // ForkHost (called by a task's worker thread).
  Answer forkGuest(Supervisor& task, const seccomp_notif& notif) override;
  bool queueFromInside(pid_t homePid, int sig, pid_t fromPid, uid_t uid, int value) override;
  bool isThreadOf(pid_t homePid, pid_t homeTid) override;
  InjectOutcome queueAsGuest(pid_t pid, const std::vector<siginfo_t>& signals,
                             kj::Maybe<PendingAnswer> answer) override;
  MoveResult moveCapture(pid_t pid, kj::Maybe<uint64_t> answerId, kj::OutputStream& sink,
                         std::function<void(proto::ImageHeader::Builder)> editHeader) override;
  void moveFinish(pid_t pid, bool commit) override;
  std::string moveRefusal(pid_t pid) override;
  bool parkForMove(pid_t tid, kj::Maybe<uint64_t> heldId) override;

 private:
  struct Task;
  struct Call;
  struct Expected {  // a child deputy's channel, announced by a fork
    std::string token;
    pid_t homePid = 0;
    kj::AutoCloseFd fd;    // when it arrived before its task
    Task* task = nullptr;  // when the task exists and waits for its channel
  };
  struct Task {
    pid_t pid = -1;                    // node pid (a thread: node tid) of the guest
    pid_t homePid = -1;                // its home pid (a thread: its process's)
    pid_t homeTid = -1;                // its home tid (a process: its leader's, homePid)
    pid_t tgid = -1;                   // node pid of its process (a process: pid)
    bool isThread = false;             // a guest thread that is not its process's leader
    RoutedUnotify* unotify = nullptr;  // owned by supervisor (or pendingUnotify)
    RoutedGuest* guest = nullptr;      // owned by supervisor
    Supervisor* supervisor = nullptr;
    kj::Own<Supervisor> ownedSupervisor;    // children's
    kj::Own<RoutedUnotify> pendingUnotify;  // a child's, until its channel arrives
    kj::Own<RoutedGuest> pendingGuest;
    std::thread thread;
    bool started = false;
    // A child task waiting for its deputy's channel since then (no worker yet).
    bool awaitingChannel = false;
    std::chrono::steady_clock::time_point bornAt;
    bool ended = false;  // the worker returned
    bool reaped = false;
    // fork in progress: the registers at the first notification, before the rewrite
    bool forkPending = false;
    pid_t vforkChild = 0;  // node pid of the child of its last vfork: while that child runs
                           // (until it exits or its old image dies at an exec), the guest
                           // is, or is about to be, in the vfork wait no interrupt ends
    user_regs_struct savedRegs = {};
    // A move of its process (a thread task): asked to park (requestPark), parked in
    // parkForMove, and the notification its thread waits in meanwhile (taken by the capture).
    // A restored thread held in its ptrace stop until its channel arrives (attachChannel).
    bool heldStopped = false;
    bool parkRequested = false;
    bool parked = false;
    kj::Maybe<uint64_t> heldId;
  };

  // Node-local descriptors of a forked child (by home pid), from its fork until its task starts.
  // Guarded by mutex_.
  std::map<pid_t, std::set<int>> inheritedNodeFds_;
  // Cache file -> home path of a forked child's parent (by home pid), until its task starts.
  std::map<pid_t, std::map<std::string, std::string>> inheritedHomePaths_;
  // The InjectHost of the main thread: answers on the shared listener, waitTraced.
  InjectHost mainHost();

  // Runs `work` on the main thread and waits for it (ptrace and waitpid are the main thread's).
  void onMain(const std::function<void()>& work);
  void serveListener();
  void reapChildren();
  // Ends child tasks whose channel did not arrive within CHILD_CHANNEL_MS; returns the poll
  // timeout until the next such deadline (-1: none).
  int expireChildren();
  void acceptChild();
  void startWorker(Task& task);
  // A child task's channel arrived: its Supervisor is made and its worker starts.
  void attachChannel(Task& task, kj::AutoCloseFd fd);
  // run(): a task and a deputy thread at its home tid for each restored thread of `first`'s
  // guest (see run()). A thread whose deputy thread cannot be made ends the job (its guest is
  // killed: a thread nobody serves would hang it).
  void adoptRestoredThreads(Supervisor& first, Task& leader,
                            const std::vector<std::pair<pid_t, pid_t>>& threads);
  void workerBody(Task* task);
  // The port of the per-job listening socket for child channels, created on first use.
  uint16_t childPort();
  Task* findTask(pid_t pid);
  // The main-thread halves of a fork (see forkGuest).
  Answer interruptForRewrite(Task& task, const seccomp_notif& notif);
  // `homeId`: the child's home pid, or for a thread (`thread`) the new thread's home tid.
  pid_t runFork(Task& task, const seccomp_notif& notif, pid_t homeId, const std::string& token,
                bool thread);
  // clone with CLONE_THREAD (docs/design.md, "Threads"): a deputy thread first, then the guest
  // thread at its home tid. Called by `task`'s worker.
  Answer cloneThread(Supervisor& supervisor, Task& task, const seccomp_notif& notif);
  // The deputy forks or starts a thread, then the guest's kernel runs the clone (worker side).
  Answer mirrorClone(Supervisor& supervisor, Task& task, const seccomp_notif& notif, bool thread);
  // A move of the process whose leader is `task` (its worker calls): every other thread's task
  // parks (docs/design.md, "Migration of a running process", "Threads"). False when one did not
  // within PARK_MS (the parks are released then). Takes mutex_.
  bool parkSiblings(Task& task);
  // Lets the parked thread tasks of process `tgid` (node pid) go on. Caller holds mutex_.
  void releaseParks(pid_t tgid);
  // waitpid(pid) on the main thread, routing an exit or a group stop met meanwhile to its task.
  int waitTraced(pid_t pid);
  void route(pid_t pid, int status);

  SupervisorOptions options_;
  kj::Own<SeccompUnotify> listener_;
  kj::AutoCloseFd sigchld_;
  JobPidNamespace pidNamespace_;
  kj::AutoCloseFd childListener_;
  uint16_t childPort_ = 0;
  std::mutex mutex_;  // tasks_, expected_ (read by workers in forkGuest)
  std::map<pid_t, std::unique_ptr<Task>> tasks_;
  std::vector<Expected> expected_;
  int firstChannelFd_ = -1;
  proto::JobStart::Reader firstStart_;
  PollQueue<Call*> work_;                // closures from workers, run by the main thread
  PollQueue<int> wake_;                  // a worker ended
  std::mutex forkMutex_;                 // one fork at a time
  std::mutex reaperMutex_;               // one request to the reaper at a time
  std::condition_variable parkChanged_;  // a thread task parked or a park was released (mutex_)
  // The non-leader threads (node tids) of a process captured for a move (by its leader's node
  // pid), until moveFinish.
  std::map<pid_t, std::vector<pid_t>> capturedThreads_;
};

}  // namespace mos::remote
