#pragma once
// The deputy (DESIGN.md decision 1): the job's home process P after the migration agent injected
// execve(mos-deputy) into it. Same pid, fd table, cwd, credentials, session and terminal; it
// executes the calls its guest forwards over the job channel, relays the signals that reach P,
// performs the guest's execve at home (decision 2), serves file fetches for the remote content
// cache (decision 6), and finally ends exactly as its guest ended.
//
// Exit statuses of its own (docs/mos-deputy.8.md): 125 the job could not start or continue
// remotely (unreachable node, unreadable image, `failed` from the supervisor); 112 the remote
// node died (the channel closed without a GuestExit).

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <kj/memory.h>

#include "channel.h"
#include "control.h"
#include "executor.h"
#include "fds.h"
#include "job.capnp.h"
#include "job_registry.h"
#include "migrate.h"

namespace mos::deputy {

class ImageFile;  // startup.h

inline constexpr int EXIT_CANNOT_RUN = 125;  // mosrun's "could not run the job" status
inline constexpr int EXIT_NODE_DIED = 112;   // the remote node died, the job is lost

struct DeputyOptions {
  uint32_t node = 0;    // the remote node running the guest
  std::string address;  // its address, for messages
  uint16_t port = 0;
  uint32_t homeNode = 0;
  std::string keyPath;                // the cluster key (absolute), to reach another node
  std::string runDir;                 // job records (jobs/<pid>) and images (images/<pid>.img)
  std::string jobExe;                 // the job's executable path (the image's exe.path)
  std::string command;                // for the job record
  std::string selfExe;                // our own executable, for the next migration agent
  std::vector<std::string> selfArgv;  // our argv without "--image PATH", for the next agent
  bool leader = true;   // false: the deputy thread of one guest thread (Deputy::threadMain)
  bool locked = false;  // mosrun -L: the job stays where it runs; every move is refused
};

// The stay reason of a job started with `mosrun -L` (mps, and `migrate`'s refusal).
inline constexpr const char* LOCKED_REASON = "locked by mosrun -L";

// Thrown inside a deputy thread (not the leader) when its channel closed: its guest thread ended
// (or the job is ending), so the thread returns.
struct DeputyThreadEnded {};

class Deputy {
 public:
  // Takes over `channel` (already connected, HELLO and JobStart sent) and `fds` (the reserved
  // set, which must already hold the channel's descriptor). Creates the job record when
  // options.runDir is not empty.
  Deputy(DeputyOptions options, ReservedFds& fds, kj::Own<Channel> channel);
  KJ_DISALLOW_COPY(Deputy);
  ~Deputy();

  // The loop: wait (signals open only inside ppoll), receive, dispatch, until the job ends.
  // Never returns: the process exits or dies as the guest did.
  // Preconditions: installSignalHandlers() and blockAllSignals() were called.
  [[noreturn]] void run();

  // Handles one message from the supervisor (run()'s body; also for tests). Exits the process
  // for `exit`, `failed` and successful execs.
  void handle(proto::ToDeputy::Reader message);

  // The guest runs on the node as `remotePid` (ToDeputy.started, or `migrate PID NODE`, which
  // saw it before the exec of this deputy): the job record says remote there, one more arrival
  // in its trail, and the start image (if any) is removed.
  void guestStarted(pid_t remotePid);
  // The migration stream file whose bytes from `offset` on go to the supervisor when it sends
  // sendImage (JobStart.imageStreamed). `fd` is one of the reserved descriptors (fds.h); it is
  // closed and released once sent.
  void setImageToSend(kj::AutoCloseFd fd, uint64_t offset);
  // The image file's path, kept until the guest runs: if the node fails the start, the job runs
  // on at home from it (runOnAtHome). Unlinked at `started`.
  void setStartImagePath(std::string path) { startImagePath_ = kj::mv(path); }

  // Sends one ToRemote.signal per recorded signal (signals.h).
  void flushSignals();
  // ToDeputy.stopped: stops the job's home process unless a SIGCONT sent after the supervisor
  // saw the guest stop (afterContinues: its count then) continues the guest.
  void stopWithGuest(uint32_t afterContinues);

  Channel& channel() { return *channel_; }
  Executor& executor() { return executor_; }
  JobRecord* record() { return record_.get(); }

 private:
  void handleSyscall(proto::SyscallRequest::Reader request);
  void handleExec(proto::ExecRequest::Reader request);
  // Performs `request` in this thread: does not return when the exec succeeded; otherwise
  // returns -errno with the deputy's state restored.
  int64_t execAtHome(proto::ExecRequest::Reader request);
  // The leader runs an exec that a deputy thread handed over (requestExecHandoff, signals.h).
  void serveExecHandoff();
  // fork/vfork/clone of the guest (docs/design.md, "Fork mirroring"): forks this process; the
  // parent replies the child's pid, the child opens its own job channel (becomeForkChild).
  void handleFork(proto::ForkRequest::Reader request);
  // In the child of handleFork: replaces the channel by a new connection to the job's
  // supervisor at `port` proved by `token`, and a job record of its own. Exits 112 when the
  // supervisor cannot be reached.
  void becomeForkChild(uint16_t port, kj::ArrayPtr<const kj::byte> token);
  // clone(CLONE_THREAD) of the guest (docs/design.md, "Threads"): starts a deputy thread that
  // connects to `port` with `token` and serves the guest thread; returns its home tid or -errno.
  // `wantedTid` > 0: the thread must get that tid (a guest thread that moved to the node with
  // its process): startThread waits up to 10 s for it to be free here, then makes the thread
  // with the home pid namespace's ns_last_pid set to wantedTid - 1 (root, or CAP_SYS_ADMIN /
  // CAP_CHECKPOINT_RESTORE there), retrying when another process took the tid first; -EBUSY
  // when it could not.
  pid_t startThread(uint16_t port, kj::ArrayPtr<const kj::byte> token, pid_t wantedTid = 0);
  // The body of a deputy thread (startThread). `reportTid` receives its tid or -errno once
  // (-EBUSY, without connecting: not `wantedTid`).
  static void threadMain(DeputyOptions options, ReservedFds* fds, uint16_t port,
                         std::vector<kj::byte> token, pid_t wantedTid,
                         const std::function<void(pid_t)>& reportTid);
  void handleFetchFile(proto::FetchFile::Reader request);
  // mps -d: hooks the new record's counters to the channel and publishes our descriptors.
  void startInspection();
  // Republishes the reserved descriptors into the record (they changed).
  void publishReserved();
  [[noreturn]] void handleExit(proto::GuestExit::Reader exit);
  [[noreturn]] void nodeDied();
  // Before its guest ran, the node failed the start (`why`): the job runs on at home from the
  // start image (runOnAtHome). Precondition: startImagePath_ is set.
  [[noreturn]] void startFailed(const std::string& why);
  [[noreturn]] void fail(const std::string& text, int status);
  // Blocks until the channel is readable, forwarding signals that arrive meanwhile.
  void waitForMessage();

  // --- a live move home (move.cc; docs/design.md, "Migration of a running process")
  // Accepts the requests pending on the control socket (after its SIGURG): starts a move home
  // (ToRemote.move) or refuses. Sent before the reply of a call the request interrupted.
  void serveControl();
  // Why the job cannot move now (a move under way, mosrun -L unless `checkpoint`, not the main
  // deputy; several threads without the capability to give each its tid back at home, for a
  // move home or to another node `target`: migrate::threadIdsRefusal), "" when it can.
  std::string moveRefusal(bool checkpoint, uint32_t target);
  // ToDeputy.comeHome: the guest needs what only home gives (`reason`): starts a move home
  // (ToRemote.move) or answers ToRemote.moveAbort with why it cannot.
  void comeHome(const std::string& reason);
  // moveRefused, moveImage, moveImageEnd, moved.
  void handleMoveMessage(proto::ToDeputy::Reader message);
  // The next bytes of the stream, into the image file; for a move to another node, once the
  // header is whole, relayMove().
  void writeMoveImage(capnp::Data::Reader data);
  // The next bytes of the stream, into the image file (move_->bytes counts them).
  void appendMoveImage(capnp::Data::Reader data);
  // The stream is complete: checks it, starts the migration agent, commits (or aborts).
  void finishMoveImage(uint64_t bytes);
  // Ends a move that did not happen: answers `reply` to `migrate`, forwards the signals kept
  // meanwhile, and serves the guest again.
  void endMove(const std::string& reply);
  void abortMove(const std::string& why);
  // The guest is gone: exec the restore stub; the agent rebuilds the job in this process.
  [[noreturn]] void completeMoveHome();
  // A move to another remote node (remote -> remote), called once the stream's header is here
  // (`image`, the image file as far as it came):
  // the stream goes to the target node's mosd as a new job start (JobStart.imageStreamed, as at
  // exec) while the rest of it still arrives from the old node (both served here: the old
  // node's moveImage messages, the new supervisor's fetches, sendImage and started; each byte
  // is relayed as soon as it is in the image file, so the two transfers overlap), then the old
  // supervisor is told to commit, and once it answers `moved` the deputy's channel is the new
  // one: the job's home process, fd table and pid never change, and the old node keeps
  // nothing. Throws kj::Exception before the commit (the caller aborts: the guest runs on where
  // it was); after the commit a lost old node only costs its `moved`.
  void relayMove(ImageFile& image);
  // A checkpoint of the remote job: the stream that arrived whole is written to
  // move_->checkpointPath in the checkpoint format (ImageWriter), with the job's descriptors
  // and cwd, which are this process's (the guest's are the content cache's), and its home
  // executable; then the supervisor is told to abort, so the guest runs on. The file appears
  // whole or not at all (FILE.tmp.PID renamed). Throws kj::Exception (the caller aborts too).
  void writeRemoteCheckpoint();
  // True while a move is in progress: signals stay pending in the kernel (they go with the job).
  bool moving() const { return move_.get() != nullptr; }

  DeputyOptions options_;
  // The deputy of the guest process (its thread group leader's task: GuestExit, stops, node
  // death end the process); false for the deputy thread of one guest thread.
  bool leader_;
  uint32_t continuesSent_ = 0;  // SIGCONTs flushSignals() sent on channel_ (stopWithGuest)
  ReservedFds& fds_;
  kj::Own<Channel> channel_;
  Executor executor_;
  OwnedJobRecord record_;
  uint64_t publishedFds_ = ~uint64_t{0};  // ReservedFds::generation() last published
  kj::AutoCloseFd imageFd_;               // setImageToSend
  uint64_t imageOffset_ = 0;
  std::string startImagePath_;      // setStartImagePath: until `started`
  kj::Own<ControlSocket> control_;  // the leader's; nullptr: none (logged)
  struct MoveState {
    kj::AutoCloseFd connection;  // to `migrate` (reserved); the agent reports on it
    kj::AutoCloseFd file;        // the stream as it arrives (reserved)
    std::string path;            // RUN_DIR/images/<pid>.home.img
    uint64_t bytes = 0;
    bool committed = false;
    std::vector<int> closeOnExec;  // the job's descriptors with FD_CLOEXEC
    migrate::Agent agent;
    // A move to another remote node (0: home): where the deputy reconnects (relayMove).
    uint32_t target = 0;
    std::string address;
    uint16_t port = 0;
    // A checkpoint of the remote job (`migrate PID checkpoint FILE`): the file to write
    // (writeRemoteCheckpoint); empty for a move.
    std::string checkpointPath;
  };
  kj::Own<MoveState> move_;  // a move in progress (move.cc)
};

// True while this process's leader deputy runs a move: every deputy thread keeps the job's
// signals recorded instead of forwarding them (they go with the job, or to the guest if the move
// does not happen). Set and cleared by the leader.
bool processMoving();

// Writes "mosrun: <text>\n" to the job's stderr (fd 2), ignoring errors.
void printMosrunMessage(const std::string& text);

// The job could not start on its node (unreachable, refused, failed before its guest ran), and
// this process, its deputy, still has the migration image at `imagePath`: the image is restored
// into this process (a migration agent in resume mode, ResumeOptions.intoDeputy, as after a move
// home), which runs the job on at home, natively, with its fd table. `why` is said on the job's
// stderr. Does not return: execs the restore stub; exits 125 when the image cannot be resumed
// here either (a mapped file changed at home meanwhile, say). `fds` are the deputy's reserved
// descriptors (left out of the job's close-on-exec list; they close at the exec).
[[noreturn]] void runOnAtHome(ReservedFds& fds, const std::string& imagePath,
                              const std::string& jobExe, const std::string& why);

}  // namespace mos::deputy
