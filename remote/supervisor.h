#pragma once
// The supervisor: one process per job on the remote node (started by mosd with the job
// channel as a descriptor); one Supervisor object, in a thread of its own, per guest process and
// per guest thread of the job (GuestFamily, guest_family.h: forks and threads are mirrored). It
// restores the migration image into a fresh stub (libmigrate), then serves the guest's seccomp user
// notifications: local answers from the Ids cache, forwarded calls over the job channel to the
// deputy, file-backed mmap from the content cache, execve sent home (design decision 2). It is the
// guest's parent and reports its exit, stop and continue to the deputy; it forwards the deputy's
// signals to the guest.
//
// The notification loop, and only it, does receive → look up → route → handler → respond
// (STYLE.md). Routine races — the guest died (ENOENT from NOTIF_SEND), a notification was
// cancelled by a signal (NOTIF_ID_VALID fails) — are logged at debug level and skipped.
// Every kernel call on the guest goes through SeccompUnotify and GuestProcess
// (seccomp_unotify.h), so the loop runs over fakes in tests/unit/notify_loop_test.cc.
//
// State machine of one forwarded call (essay in docs/design.md, "signals"):
//   RECV ─► marshal (reads guest memory) ─► ID_VALID ─► send request ─► wait for the reply
//      ▲                                                     │  signal messages from the deputy
//      │                                                     │  are delivered to the guest while
//      └─ restart (reply interrupted, signal did not         │  waiting; a signal that interrupts
//         interrupt the guest)  ◄────────────────────────────┘  the guest makes the kernel drop
//                                                              the notification (no SEND)

#include <linux/seccomp.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <capnp/message.h>
#include <kj/function.h>
#include <kj/io.h>

#include "channel.h"
#include "file_cache.h"
#include "guest_move.h"
#include "guest_signal.h"
#include "guest_stack.h"
#include "job.capnp.h"
#include "job_registry.h"
#include "marshal.h"
#include "seccomp_unotify.h"
#include "pid_namespace.h"
#include "syscall_table.h"
#include "trace_channel.h"

namespace mos::remote {

struct SupervisorOptions {
  int fd = 3;             // the job channel (a connected TCP socket), owned from now on
  uint32_t node = 0;      // this node's id
  uint32_t peerNode = 0;  // the job's home node
  std::string runDir;     // for the guest's job record
  std::string cacheDir;   // the content cache
  // The job's trace stream (docs/design.md "Tracing"), one per job, shared by every task of it;
  // nullptr: calls are not traced (run() makes one for the job it starts).
  TracePublisher* trace = nullptr;
  std::string shmDir;  // the job's /dev/shm on this node (sys_shm.cc); made at first use,
                       // removed when the job leaves the node. Empty: /dev/shm stays at home
};

// What the notification loop answers a notification with.
struct Answer {
  enum Kind { VALUE, CONTINUE, DROP };
  Kind kind = VALUE;
  int64_t value = 0;  // VALUE: >= 0 is the result, < 0 is -errno
  static Answer of(int64_t v) { return Answer{VALUE, v}; }
  static Answer cont() { return Answer{CONTINUE, 0}; }
  static Answer drop() { return Answer{DROP, 0}; }
  // The answer for a call of syscall `nr` cut short at home by a signal the guest will now take:
  // the kernel's restart code that a native call of `nr` returns (its row's `restart`).
  static Answer interrupted(int nr);
};

// For a path the job opens: the file name after a /proc prefix that names the job itself
// (/proc/self/, /proc/thread-self/, /proc/<homePid>/, /proc/<homePid>/task/<homePid>/) when that
// file describes the user part (maps, status, cmdline, ...); "" otherwise.
std::string jobProcFile(const std::string& path, int32_t homePid);

// What an open (a row with handler OPEN: open, openat, openat2) marshalled into `request`
// opens, from the row's argument kinds `specs` and the guest's `args`: the first PATH argument
// (without its NUL), the FD before it (AT_FDCWD for open) and the open(2) flags after it, a value
// or, for openat2, the open_how in-buffer. nullptr when the path did not travel (NULL), or when
// the open_how asks for more than flags (a mode, RESOLVE_* other than RESOLVE_NO_MAGICLINKS,
// flags beyond 32 bits, a size below OPEN_HOW_SIZE_VER0): such a call is forwarded as it is.
struct OpenCall {
  std::string path;
  int dirfd = 0;
  int flags = 0;
};
kj::Maybe<OpenCall> describeOpen(const ArgSpec (&specs)[6], const uint64_t (&args)[6],
                                 proto::SyscallRequest::Reader request);

// The name in the job's /dev/shm that `path` names ("/dev/shm/NAME": "NAME"), or "" when it names
// none: not under /dev/shm/, or a name with a '/', "." or "..".
std::string jobShmName(std::string_view path);

// Reads `count` iovecs at guest address `at` into `iov` and their total length, capped at
// MAX_FORWARD_BYTES, into `total`. Returns 0, EFAULT (unreadable) or EINVAL (the lengths
// overflow ssize_t), as readv(2) would.
int readGuestIovecs(GuestMemory& memory, uint64_t at, size_t count, std::vector<struct iovec>& iov,
                    size_t& total);

// Reads the guest buffers `iov` in order into `bytes` (what writev(2) sends), up to its size.
// Returns 0 or EFAULT.
int gatherFromGuest(GuestMemory& memory, const std::vector<struct iovec>& iov,
                    kj::ArrayPtr<kj::byte> bytes);

// Writes `bytes` over the guest buffers `iov` in order (what readv(2) does with the bytes it
// read). Returns 0 or the errno of the first write that failed (EFAULT).
int scatterToGuest(GuestMemory& memory, const std::vector<struct iovec>& iov,
                   kj::ArrayPtr<const kj::byte> bytes);

// /proc/PID/status of `pid` ("" when it is gone), and one of its hex signal-set lines
// ("SigBlk:") as a mask, bit (n-1) for signal n (0 when the line is missing).
std::string readStatus(pid_t pid);
uint64_t statusMask(const std::string& status, const char* key);

// While a forwarded call blocks at home, how often the supervisor checks whether the guest has a
// signal of this node to take (milliseconds).
inline constexpr int CANCEL_CHECK_MS = 50;

// How often the supervisor tries again to have the guest queue home signals while it cannot
// stop (a vfork parent waiting for its child), milliseconds.
inline constexpr int DEFERRED_RETRY_MS = 10;

class Supervisor;

// Runs a guest's fork/vfork/clone of a process (GuestFamily): the notification loop of a task
// hands it every notification of a FORK row.
class ForkHost {
 public:
  virtual ~ForkHost() noexcept(false) = default;
  // Answers (or has answered: DROP) notification `notif` of `task`'s guest.
  virtual Answer forkGuest(Supervisor& task, const seccomp_notif& notif) = 0;
  // Queues SIGCHLD-like `sig` on the guest at `homePid` with si_pid `fromPid` from inside the
  // job's pid namespace (JobPidNamespace::queueSignal); false when it could not.
  virtual bool queueFromInside(pid_t homePid, int sig, pid_t fromPid, uid_t uid, int value) = 0;
  // True when `homeTid` is a thread of the guest process `homePid` that runs here.
  virtual bool isThreadOf(pid_t homePid, pid_t homeTid) = 0;
  // Makes guest `pid` (a pid of this node) queue `signals` on itself, with their siginfo as the
  // home kernel wrote it, answering the notification of `answer` on the way when it waits in
  // one (guest_signal.h). BUSY (no `answer`): the guest waits in a notification not answered yet.
  virtual InjectOutcome queueAsGuest(pid_t pid, const std::vector<siginfo_t>& signals,
                                     kj::Maybe<PendingAnswer> answer) = 0;
  // A live move of guest `pid` (guest_move.h): captures it into `sink` on the thread that traces
  // the guests, answering notification `answerId` (-ERESTARTNOINTR) on the way when it waits in
  // one. BUSY (no `answerId`): a notification of the guest waits in its task; serve it first.
  // DONE leaves the guest stopped until moveFinish().
  virtual MoveResult moveCapture(pid_t pid, kj::Maybe<uint64_t> answerId, kj::OutputStream& sink,
                                 std::function<void(proto::ImageHeader::Builder)> editHeader) = 0;
  // Ends a DONE capture: `commit` kills and reaps the guest (every thread), else it runs on here.
  // Either way the parked thread tasks of its process go on (parkForMove returns).
  virtual void moveFinish(pid_t pid, bool commit) = 0;
  // A thread task (its guest thread `tid`, a node tid) whose process is being moved stops here
  // until the move is decided: captured and committed (its thread is then dead), refused or
  // aborted. `heldId`: the notification the thread waits in, unanswered. Returns true when the
  // capture answered it (-ERESTARTNOINTR); false: the caller answers it.
  virtual bool parkForMove(pid_t tid, kj::Maybe<uint64_t> heldId) = 0;
  // Why guest `pid` cannot move off this node now (other threads of its process, memory it
  // shares with other guests of the job), one sentence; "" when it can.
  virtual std::string moveRefusal(pid_t pid) = 0;
};

class Supervisor {
 public:
  // Blocks SIGCHLD (read through a signalfd from then on) and ignores SIGPIPE.
  explicit Supervisor(SupervisorOptions options);

  // The loop alone, over a guest that already runs: `jobStart` is the job's JobStart (its ids;
  // the image is not used), `unotify` the guest's listener, `guest` the guest. `options.fd` is
  // the job channel; the content cache is `options.cacheDir`. Where the job ends, the supervisor
  // calls `exit` with its status instead of _exit(2) (it must not return). For tests, with fakes
  // of the kernel; changes no signal disposition.
  Supervisor(SupervisorOptions options, kj::Own<capnp::MessageReader> jobStart,
             kj::Own<SeccompUnotify> unotify, kj::Own<GuestProcess> guest,
             kj::Function<void(int)> exit);
  KJ_DISALLOW_COPY(Supervisor);

  // Runs the whole job on this node: receive JobStart, restore, serve until the guest exits, the
  // deputy goes away or the guest execs at home. Returns the supervisor's exit status (0 when
  // the job ended in a defined way, 1 when the start failed; the deputy was told why).
  int run();

  // One pass of the notification loop: waits up to `timeoutMs` (-1: without limit) for a
  // notification, a message of the deputy or a change of the guest's state, and handles what is
  // ready. Returns false when nothing was ready. Ends the job (see the constructors) when the
  // guest ended or the deputy went away.
  bool turn(int timeoutMs);

  // --- one task of a GuestFamily (guest_family.h)
  // Where forks go; nullptr (the default): fork/vfork/clone fail with ENOSYS.
  void setForkHost(ForkHost* host) { forkHost_ = host; }
  // Hands the restored guest over to a GuestFamily: from now on the loop reaches it through
  // `unotify` and `guest`, and the end of the job calls `exit` (which must not return).
  void becomeTask(kj::Own<SeccompUnotify> unotify, kj::Own<GuestProcess> guest,
                  kj::Function<void(int)> exit, ForkHost* host);
  // The loop of a task, until its guest ends or its deputy goes (then `exit` is called).
  void serveTask();
  // Asks the deputy to fork, or with `thread` to start a deputy thread (ForkRequest); returns
  // the child's home pid (the thread's home tid) or -errno. Ends the task when the deputy is gone.
  // `tid` > 0 (a thread): the home tid the deputy thread must have (ForkRequest.tid).
  int64_t askDeputyToFork(uint64_t seq, uint16_t port, kj::ArrayPtr<const kj::byte> token,
                          bool thread = false, pid_t tid = 0);
  // This task serves one thread of a guest process, not its leader (docs/design.md, "Threads"):
  // its end is not the job's, and a closed channel does not kill the process.
  // A thread task gets the eventfd that requestPark() writes.
  void setThreadTask(bool thread);
  // A move of this task's guest process (a thread task: not its leader) is about to capture
  // every thread (docs/design.md, "Migration of a running process", "Threads"): the loop cuts
  // the forwarded call it serves, if any (cancelled at home, its answer held), stops taking new
  // ones and parks in ForkHost::parkForMove until the move is decided. Called by another thread
  // (the leader's worker); wakes this task's poll.
  void requestPark();
  // handleUnsupported for a ForkHost: logs once, answers -err.
  Answer unsupported(const seccomp_notif& notif, int err, const char* why) {
    return handleUnsupported(notif, err, why);
  }
  int channelFd() const { return channel_.fd(); }
  // A job record for a forked guest (RUN_DIR/guests/<its node pid>), so mps lists every process
  // of the job here; unlinkRecord() removes it when the task ends.
  void recordChildGuest();
  void unlinkRecord() { record_.unlink(); }
  // The guest's node-local descriptors (sys_shm.cc): a forked child starts with its parent's.
  const std::set<int>& nodeFds() const { return nodeFds_; }
  void inheritNodeFds(std::set<int> fds) { nodeFds_ = kj::mv(fds); }
  // Cache file -> home path of the files the guest maps: a forked child starts with its
  // parent's (a move home names the home files).
  const std::map<std::string, std::string>& homePaths() const { return homePaths_; }
  void inheritHomePaths(std::map<std::string, std::string> paths) {
    homePaths_.insert(paths.begin(), paths.end());
  }
  proto::JobStart::Reader jobStart() const { return start_; }

 private:
  // --- startup (supervisor.cc)
  void receiveJobStart();
  void startGuest();
  std::string resolveImageFile(proto::FileRef::Reader ref);
  // Notes that the cache file `cachePath` holds the home file `homePath` (for /proc/self/maps).
  void rememberHomePath(const std::string& cachePath, kj::ArrayPtr<const kj::byte> homePath);

  // --- the loop (supervisor.cc)
  // Serves the guest's notifications and the deputy's messages until the job ends (then exits
  // the process). Throws kj::Exception when the channel fails or a message does not parse.
  [[noreturn]] void serve();
  // Ends the job after `e` escaped the loop: DISCONNECTED ends it quietly (status 0), anything
  // else is logged and told to the deputy (status 1).
  [[noreturn]] void endJobAfter(const kj::Exception& e);
  void serveNotification();
  // serveNotification while someone traces the job: the same, and one TraceEvent.
  void serveTraced(const seccomp_notif& notif);
  void respond(uint64_t id, const Answer& answer);
  bool idValid(uint64_t id) { return unotify_->idValid(id); }
  Answer dispatch(const seccomp_notif& notif);
  void onIdleMessage();
  void onChildEvent();
  // Delivers `sig` to the guest; for SIGCHLD, `fromPid` and `status` are the home siginfo's
  // si_pid and si_status (0: unknown); `info`, when not null, is the whole home siginfo. In a
  // family (forkHost_) a signal with its siginfo is deferred: the guest queues it itself
  // (flushDeferred, or with the answer of the call in progress: respond); SIGKILL, SIGCONT and
  // signals without a siginfo are queued at once from here.
  // `toThread`: the home kernel directed it at this task's deputy thread (signalThread): queued
  // on this task's guest thread at once.
  void deliverSignal(int sig, int32_t fromPid = 0, int32_t status = 0,
                     const siginfo_t* info = nullptr, bool toThread = false);
  void deliverSignal(proto::ToRemote::Reader message);
  // Queues `info` from outside the guest (tgkill, or the reaper for SIGCHLD's si_pid): si_code
  // reads SI_TKILL or SI_QUEUE.
  void queueFromOutside(const siginfo_t& info);
  // Has the guest queue the deferred signals now, unless it waits in a notification (then they
  // go with its answer).
  void flushDeferred();
  // The temporary signal mask of the call in progress (pselect6, ppoll, epoll_pwait*), if any.
  kj::Maybe<uint64_t> currentCallMask();
  // True when the guest has a pending signal it does not block (it will act on it as soon as
  // its current syscall returns), under the temporary mask of the call in progress when it has
  // one. `underCallMaskOnly`: false when the call has no such mask (one /proc read, and one
  // guest memory read only when something is pending).
  bool guestHasSignalToTake(bool underCallMaskOnly = false);
  // True when the guest (this task's thread) is gone or a zombie: a sibling thread's exit_group
  // or exec killed it while its call blocks at home.
  bool guestGone();
  [[noreturn]] void endJob(int status);

  // --- a live move home (sys_move.cc; docs/design.md, "Migration of a running process")
  // ToRemote.move from the deputy: refused at once (moveRefused) or noted for the loop.
  void onMoveRequest(proto::MoveRequest::Reader request);
  // Runs the noted move: captures the guest into the channel (ToDeputy.moveImage), waits for the
  // deputy's verdict, then ends the task (commit) or lets the guest run on (abort, refusal).
  // `answerId`: the notification the guest waits in (answered to restart). False: BUSY, a
  // notification of the guest must be served first.
  bool runMove(kj::Maybe<uint64_t> answerId);
  // The header's files as the home node knows them: content-cache paths to home paths and
  // identities; throws (a refusal) for a mapped file that only this node has.
  void editMoveHeader(proto::ImageHeader::Builder header);
  void sendMoveRefused(const std::string& why);
  // True when the call being served may be cut short for a move: not a fork (its registers are
  // rewritten between its two notifications).
  bool moveMayCut();
  // A move (ours: moveRequested_; our process's, for a thread task: parkRequested_) is due and
  // the call being served may be cut for it.
  bool moveDue() { return (moveRequested_ || parkRequested_.load()) && moveMayCut(); }
  // A thread task parks for its process's move (requestPark): `heldId` is the notification its
  // thread waits in (answered -ERESTARTNOINTR by the capture, or here when the move did not
  // capture it).
  void parkForMove(kj::Maybe<uint64_t> heldId);

  // Waits for the next ToRemote message that `isMine` accepts, delivering signal messages that
  // arrive meanwhile. Returns nullptr when the deputy closed the channel. While it waits for the
  // reply to notification `seq` (0: not a syscall), a new notification of the guest means the
  // guest left that call (a signal raised on this node interrupted it): the deputy's call is
  // then cancelled with one byte of TCP urgent data (it raises SIGURG in the deputy).
  kj::Maybe<kj::Own<capnp::MessageReader>> awaitMessage(
      const std::function<bool(proto::ToRemote::Reader)>& isMine, uint64_t seq = 0);
  // Sends `request` (a ToDeputy with a syscall) and waits for its reply. When a signal
  // interrupted the deputy's call: if the guest has a signal to take, sets *interrupted (the
  // caller answers the row's restart code); otherwise (the guest blocks it) runs the call again
  // at home. nullptr: the deputy is gone.
  kj::Maybe<kj::Own<capnp::MessageReader>> roundTrip(capnp::MallocMessageBuilder& request,
                                                     uint64_t seq, bool* interrupted);
  // roundTrip for a handler: the reply message, or nullptr when the guest must see the
  // interruption instead (answer Answer::interrupted(nr)). Ends the job if the deputy is gone.
  kj::Maybe<kj::Own<capnp::MessageReader>> callHome(capnp::MallocMessageBuilder& request,
                                                    uint64_t seq);

  // --- handlers (sys_*.cc), one per irregular HandlerId; regular rows use forwardRegular
  Answer forwardRegular(const seccomp_notif& notif, const ArgSpec (&specs)[6]);
  Answer handleIds(const seccomp_notif& notif);
  // setuid(2), setgid(2), setreuid(2), setregid(2), setresuid(2), setresgid(2), setfsuid(2),
  // setfsgid(2) that change nothing (make, sudo-aware tools restore their own ids).
  Answer handleSameIds(const seccomp_notif& notif);
  Answer handleMmap(const seccomp_notif& notif);
  // The call in progress needs what only home can give (`reason`): asks the deputy to bring the
  // job home (ToDeputy.comeHome) and waits for its answer. A move request: the call's answer
  // is a restart, which respond() turns into the move home (the call is issued again at home,
  // natively). nullptr when the deputy or this supervisor cannot move the job: the caller
  // fails the call as before.
  kj::Maybe<Answer> bringHome(const seccomp_notif& notif, const std::string& reason);
  Answer handleExec(const seccomp_notif& notif);
  Answer handleIov(const seccomp_notif& notif);
  Answer handleKill(const seccomp_notif& notif);
  // rt_sigaction(2) of SIGCHLD with a new disposition (the filter sends only those): told to
  // the deputy, then run by the guest's kernel.
  Answer handleSigaction(const seccomp_notif& notif);
  Answer handleSockmsg(const seccomp_notif& notif);  // sys_socket.cc

  // --- node-local objects (sys_shm.cc): the job's /dev/shm and memfds
  Answer handleMemfd(const seccomp_notif& notif);
  // A call that names a node-local descriptor, routed by its row's `onNode`; nullptr: it names
  // none (or only as the dirfd of an absolute path), route it as usual.
  kj::Maybe<Answer> routeNodeFd(const seccomp_notif& notif, const SyscallEntry& entry);
  // A SHM_PATH or SHM_OPEN row whose marshalled `request` names the job's /dev/shm (or an empty
  // path on a node-local descriptor): run here, in the job's shm directory; nullptr: it does not.
  // A home path and a /dev/shm one together: EXDEV.
  kj::Maybe<Answer> runJobShmCall(const seccomp_notif& notif, const SyscallEntry& entry,
                                  const ArgSpec (&specs)[6], proto::SyscallRequest::Reader request);
  // Makes `local` (ours, taken) the guest's descriptor at the number of a new placeholder memfd
  // named `name` at home; answers that number.
  Answer installNodeFd(const seccomp_notif& notif, int local, const std::string& name,
                       bool cloexec);
  // memfd_create(name) at home: the placeholder's number, or -errno (-EINTR: interrupted).
  int64_t placeholderAtHome(uint64_t seq, const std::string& name, bool cloexec);
  // A copy of the guest's descriptor `fd` (pidfd_getfd), or -errno.
  int copyGuestFd(int fd);
  // The job's /dev/shm directory here, made on first use.
  const std::string& jobShmDir();
  // An open (handler OPEN: open, openat, openat2) of `path` relative to `dirfd` with open(2)
  // `flags`, when `path` is one of the job's own /proc files that describe its user part
  // (sys_proc.cc); nullptr: not such a file, forward as usual.
  kj::Maybe<Answer> serveJobProcFile(const seccomp_notif& notif, const std::string& path, int dirfd,
                                     int flags);
  // Runs a syscall with plain value arguments at home; returns its result (-EINTR if a signal
  // cut it short).
  int64_t forwardPlain(uint64_t seq, int nr, std::initializer_list<uint64_t> args);
  Answer handleUnsupported(const seccomp_notif& notif, int err, const char* why);

  // mps -d: counts the call just dispatched by its route (the trace's: forwarded when it went
  // home, emulated, local answer, denied), with its time since `startNs`.
  void countRoute(const seccomp_notif& notif, uint64_t homeCallsBefore, uint64_t startNs);
  // Calls countRoute for `notif` when it goes out of scope (the top of dispatch()).
  struct RouteCount {
    RouteCount(Supervisor& s, const seccomp_notif& n)
        : supervisor(s), notif(n), homeCallsBefore(s.homeCalls_), startNs(realtimeNs()) {}
    ~RouteCount() { supervisor.countRoute(notif, homeCallsBefore, startNs); }
    KJ_DISALLOW_COPY(RouteCount);
    Supervisor& supervisor;
    const seccomp_notif& notif;
    uint64_t homeCallsBefore, startNs;
  };

  // Fetches a home file's identity (and bytes into the cache when missing). Returns the local
  // cache path, or -errno from the deputy in `err`.
  kj::Maybe<std::string> fetchIntoCache(int fd, kj::ArrayPtr<const kj::byte> path, int& err,
                                        proto::FileRef::Builder expected, bool checkExpected);

  SupervisorOptions options_;
  Channel channel_;
  kj::AutoCloseFd signalFd_;      // SIGCHLD, until the guest (ChildGuest) takes it over
  kj::Function<void(int)> exit_;  // ends the process with a status
  kj::Own<capnp::MessageReader> jobStart_;
  proto::JobStart::Reader start_;
  FileCache* cache_ = nullptr;
  kj::Own<FileCache> ownedCache_;
  pid_t guest_ = -1;                    // the guest's pid on this node; -1 once it ended
  kj::Own<GuestProcess> guestProcess_;  // the guest's memory, signals, /proc and wait status
  kj::Own<SeccompUnotify> unotify_;     // the guest's notification listener
  JobPidNamespace pidNamespace_;        // the guest's pid namespace; its reaper is our child
  OwnedJobRecord record_;
  uint64_t homeCalls_ = 0;  // round trips to the deputy that completed (countRoute, mps -d)
  std::map<std::string, std::string> homePaths_;  // cache file → home path, this job's maps
  GuestStacks stacks_;      // mostrace -k: samplers of this task's guest threads (serveTraced)
  std::set<int> reported_;  // syscalls already logged as unsupported for this job
  uint64_t nextFetchId_ = 1;
  ForkHost* forkHost_ = nullptr;
  bool threadTask_ = false;          // setThreadTask
  std::vector<siginfo_t> deferred_;  // home signals the guest has not queued yet
  uint32_t continuesReceived_ = 0;   // process SIGCONTs from the deputy (ToDeputy.stopped...)
  const seccomp_notif* current_ = nullptr;  // the notification being served
  kj::AutoCloseFd listener_;  // run(): the restored guest's listener, for its GuestFamily
  // run(): the restored guest's other threads, (node tid, home tid), stopped and traced by this
  // thread until their GuestFamily tasks have channels (RestoredGuest.threads).
  std::vector<std::pair<pid_t, pid_t>> restoredThreads_;
  // Tracing (trace_channel.h): the job's publisher (a disabled one when untraced) and the call
  // being traced, which handlers feed (payloads, time at home, route); an inert TraceCall
  // outside serveTraced.
  kj::Own<TracePublisher> ownedTrace_;
  TracePublisher* tracePublisher_;
  TraceCall* trace_;
  int64_t forkResult_ = 0;  // the home child's pid of the fork being traced (askDeputyToFork)
  std::set<int> nodeFds_;   // node-local descriptors of the guest (sys_shm.cc)
  bool shmDirMade_ = false;
  bool moveRequested_ = false;              // the deputy asked for a move (onMoveRequest)
  uint32_t moveTarget_ = 0;                 // where the move goes: a node id, 0 for home
  std::atomic<bool> parkRequested_{false};  // requestPark (another thread writes it)
  kj::AutoCloseFd parkWake_;                // eventfd: polled by turn() once requestPark ran
};

}  // namespace mos::remote
