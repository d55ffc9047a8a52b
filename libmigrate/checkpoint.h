#pragma once
// Capture and restore of a running process, all its threads, as a migration stream
// (protocol/migration.capnp): the foundation of live migration and of checkpoints (issue 8).
//
// Both directions work on a process that the caller already ptraces and holds in a stop, and
// reach inside it only by syscall injection (ptrace_task.h): no code of ours runs in the
// process, no parasite blob is loaded (docs/design.md "Migration of a running process").
//
// Sources: CRIU (cr-dump.c dump_task_*, pie/restorer.c, compel infect.c), rr AutoRemoteSyscalls;
// ptrace(2) (PTRACE_PEEKSIGINFO, PTRACE_GET_RSEQ_CONFIGURATION, PTRACE_GETSIGMASK), proc(5)
// (maps, pagemap, fdinfo, status, personality), prctl(2) PR_SET_MM_MAP, PR_GET_TID_ADDRESS,
// arch_prctl(2) ARCH_MAP_VDSO_64, rt_sigqueueinfo(2).

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include <kj/io.h>

#include "image_stream.h"

namespace mos::migrate {

// Seizes every task of `pid` (PTRACE_SEIZE with PTRACE_O_TRACESYSGOOD, then PTRACE_INTERRUPT,
// the thread list read again until no new task appears) and waits until each is in a ptrace
// stop; signals that arrive on the way are delivered, not lost. The process is never killed if
// the caller dies (no PTRACE_O_EXITKILL): ptrace detaches on the tracer's exit.
// Throws kj::Exception (FAILED) when it cannot be traced (EPERM: another tracer, permissions;
// ESRCH) or ends meanwhile; the tasks seized so far are let go.
// The tasks (threads) of process `pid`: the entries of /proc/PID/task. Throws kj::Exception
// (FAILED) if it cannot be listed (the process is gone).
int countThreads(pid_t pid);

class SeizedProcess {
 public:
  explicit SeizedProcess(pid_t pid);
  ~SeizedProcess();
  KJ_DISALLOW_COPY(SeizedProcess);
  pid_t pid() const { return pid_; }
  // Lets every task run on (PTRACE_DETACH, the leader last). The destructor does it too.
  void detach();

 private:
  pid_t pid_;
  std::vector<pid_t> tasks_;  // seized, the leader first
};

struct CaptureStats {
  uint64_t mappings = 0;
  uint64_t runs = 0;
  uint64_t pages = 0;
  uint64_t bytes = 0;  // of the stream
  uint64_t injectedSyscalls = 0;
  std::chrono::microseconds frozen{0};  // from the first to the last ptrace request
};

// Writes the migration stream of `pid` to `sink`: MAGIC, the header (registers, xsave state and
// the CPU's xsave feature mask, mappings with file identities, mm layout, auxv, brk, signal mask,
// pending signals with their siginfo, dispositions, sigaltstack, itimers, rseq, robust list,
// tid address, personality, umask, cwd, open descriptors as path+offset+flags), every touched
// private page once in address order (pagemap: untouched pages are never sent, file pages
// only where the process wrote them), and the end frame.
// The process is left stopped where it was, with its registers, mask and memory unchanged, and
// an interrupted system call set up to be re-issued when it resumes (as the kernel would have).
// Dispositions, sigaltstack, itimers and the tid address are read by injecting rt_sigaction,
// sigaltstack, getitimer and prctl(PR_GET_TID_ADDRESS) into the process, with every signal
// blocked meanwhile.
// Every thread is captured (threads[0] the leader): registers, xsave state, mask, own queue,
// rseq and robust list from outside, its sigaltstack and tid address by injection into it.
// Preconditions: the caller ptraces every task of `pid` (SeizedProcess, or one thread after
// PTRACE_EVENT_EXEC; PTRACE_O_TRACESYSGOOD set) and each is in a ptrace stop.
// Throws kj::Exception (FAILED) naming the reason when the process cannot be captured (a thread
// not stopped by the caller, a shared writable file mapping, no vDSO) or on I/O errors of
// `sink`.
CaptureStats captureImage(pid_t pid, kj::OutputStream& sink);

struct CaptureOptions {
  // Called with the finished header before any byte is written to the sink: a live move from a
  // remote node rewrites the content cache's file paths into the home node's (remote/guest_move).
  // It may throw kj::Exception to refuse the capture; nothing has been written then.
  std::function<void(proto::ImageHeader::Builder)> editHeader;
  // Called once the header has been written to the sink, before the first frame: a live move
  // that streams into the node's connection waits there until the node asks for the pages
  // (ToDeputy.sendImage, after its file fetches). It may throw kj::Exception to end the capture.
  std::function<void()> beforePages;
  // Called after editHeader: a descriptor of the process itself (its leader's fd table) that is
  // the same connection as `sink`, or -1 (also when unset). With one, the pages go from the
  // process's memory straight onto that connection by sendmsg(2) injected into the process, one
  // copy and no read-back here, and the stream is PageDigest::FRAMING (protocol/migration.md): a
  // live move home -> node, whose socket `migrate` made in the process (tools/migrate.cc). The
  // frames are still counted and hashed; only the pages' bytes are left out of the digest.
  std::function<int()> sendPagesFromFd;
};

// captureImage with options.
CaptureStats captureImage(pid_t pid, kj::OutputStream& sink, const CaptureOptions& options);

// Replaces header.files with the open descriptors of `pid` as captureImage describes them
// (path, offset, flags, close-on-exec, kind and identity; pipes without their queued bytes),
// leaving out those `skip` names and, when `pid` is the caller, the descriptor of the listing
// itself. The checkpoint of a remote job: its deputy's fd table is the job's (deputy/move.cc).
// Throws kj::Exception (FAILED) when /proc/PID/fd cannot be listed.
void describeOpenFiles(pid_t pid, proto::ImageHeader::Builder header,
                       const std::function<bool(int)>& skip);

// Why a stream cannot be resumed at home, one readable sentence per reason, empty if it can:
// a mapped file that changed or is gone (identity: device, inode, size, mtime), an open
// descriptor that cannot be reopened (a socket, a pipe to another process or one of its own that
// holds data, other than fds 0..2; an anonymous inode; a file that is gone or replaced), a CPU
// whose xsave state does not cover the image's, another architecture, a vDSO layout of another
// size. Descriptors 0, 1 and 2 that are pipes, sockets or terminals are not reasons: the resumed
// process keeps the ones of the process it is restored into (a shell job's terminal).
std::vector<std::string> checkResumable(proto::ImageHeader::Reader header);

// The part of checkResumable() that is about this machine and not the home node's files: the
// architecture, the CPU's xsave features, the vDSO's size and place in its area, the
// restore stub's range. What a node checks before it runs an image as a guest.
std::vector<std::string> checkRestorableHere(proto::ImageHeader::Reader header);

// How a stream is resumed. The default is a checkpoint's resume (mosrun -R): the process gets the
// image's cwd, umask, personality and descriptors. `intoDeputy` is a live move of a remote
// guest back into its deputy (docs/design.md, "Migration of a running process"): the process's
// fd table, cwd, umask, personality and credentials are already the job's (the deputy executed
// every call that changed them), so the image's are ignored; only the user part is rebuilt.
struct ResumeOptions {
  bool intoDeputy = false;
  // intoDeputy: the job's executable at home, for /proc/PID/exe (the guest's names its stub).
  std::string exePath;
  // intoDeputy: descriptors that get FD_CLOEXEC back (the deputy cleared it so that they
  // survived its exec of the restore stub).
  std::vector<int> closeOnExec;
};

// checkResumable for `options`: with intoDeputy, the cwd and the descriptors are not reasons.
std::vector<std::string> checkResumable(proto::ImageHeader::Reader header,
                                        const ResumeOptions& options);

struct RestoreStats {
  uint64_t pages = 0;
  uint64_t injectedSyscalls = 0;
  // Where a restore's time went (the profile of a move, docs/design.md "Speed"): from its start
  // to the mappings made, to the last page written (this includes waiting for the stream's
  // frames), and to the end (the process state after the pages, the stub gone).
  std::chrono::microseconds mappingsTime{0};
  std::chrono::microseconds pagesTime{0};
  std::chrono::microseconds totalTime{0};
};

// Rebuilds the process of `source` in `pid` and lets it run (PTRACE_DETACH): every mapping of
// the image at its address (files reopened by path, anonymous and written pages from the
// stream), the vDSO moved to the image's address (ARCH_MAP_VDSO_64), mm layout and auxv
// (PR_SET_MM_MAP), /proc/PID/exe (PR_SET_MM_EXE_FILE when allowed), name, personality, umask,
// cwd, descriptors by path and offset, self-pipes recreated, dispositions, sigaltstack, itimers,
// robust list, tid address, rseq, pending signals (re-queued), the other threads (clone3 with
// set_tid: each gets its old id, which must be free; the caller needs CAP_SYS_ADMIN over the pid
// namespace), then xsave state, registers and signal mask of every thread. Preconditions: `pid` is
// the caller's tracee (PTRACE_O_TRACESYSGOOD set), stopped at the syscall-exit stop of its execve
// of the restore stub (execRestoreStub); checkResumable() of the header is empty. Stub pages and
// all of the stub's descriptors but 0..2 are gone afterwards. Throws kj::Exception (FAILED) when a
// step fails; the process is then half rebuilt and the caller must kill it.
RestoreStats restoreImage(ImageReader& source, pid_t pid);
// restoreImage with options (see ResumeOptions).
RestoreStats restoreImage(ImageReader& source, pid_t pid, const ResumeOptions& options);

// What execDeputy() executes.
struct DeputyExec {
  std::string path;               // absolute path of mos-deputy
  std::vector<std::string> argv;  // its argv: the job's own, so that ps shows the job at home
  std::vector<std::string> env;   // its whole environment (UMOSIX_DEPUTY_ARGS: its options)
};

// Turns the seized, captured process `pid` into its own deputy (design decision 1, for a process
// that already runs: `migrate PID NODE`). By injection, with every signal blocked: disarms its
// interval timers (they survive execve, and the guest has them from the image), takes every
// pending signal off its queues (execve keeps them, the image holds them: they would be
// delivered twice), clears FD_CLOEXEC on the descriptors `header` lists with closeOnExec (the
// deputy sets them again from the image), then execve(exec.path, exec.argv, exec.env). The
// deputy starts with every signal blocked.
// Returns the signal numbers that were pending but are not in `header` (they arrived after the
// capture): send them to the process again (kill) once it is detached; its deputy forwards them.
// Preconditions: the caller ptraces `pid` (SeizedProcess) and it is stopped; `header` is the
// image captureImage() just wrote of it. On success the process is left at the exit stop of the
// execve (detach it). When the execve fails, the timers, flags, signals (re-queued with their
// siginfo), registers and mask are put back and kj::Exception (FAILED) names the errno: the
// process can be detached and runs on at home.
std::vector<int> execDeputy(pid_t pid, proto::ImageHeader::Reader header, const DeputyExec& exec);

// Ends every thread of the seized, captured process `pid` but its leader, before execDeputy():
// each is made to call exit(2) by injection, with every signal blocked and its robust list and
// clear-child-tid address cleared first (its exit then writes nothing into the job's memory),
// and is reaped by the caller (its tracer). Its tid is free afterwards: the deputy thread that
// will serve the guest thread is made at it (docs/design.md, "Migration of a running process",
// threads). The process cannot run on with its threads gone: if execDeputy() then fails, kill
// it. Preconditions: as execDeputy's. Throws kj::Exception (FAILED) when an injection fails.
void endOtherThreads(pid_t pid);

// Why the threads of process `pid` (`threads` of them) cannot be given their ids back at home,
// "" when they can: recreating a thread at a chosen tid in the home pid namespace (clone3 with
// set_tid when a job is restored at home; ns_last_pid when its deputy makes a deputy thread for
// a guest thread) needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE there, and the job's process
// (which runs both: the restore and the deputy are the job's own process) must have one of them
// in its effective set (/proc/PID/status CapEff). One readable sentence.
std::string threadIdsRefusal(pid_t pid, int threads);
// A socket made inside the seized, stopped process `pid` by an injected socket(domain, type, 0)
// (without SOCK_CLOEXEC, so it survives the exec of the deputy), and the caller's own descriptor
// of the same socket (pidfd_getfd(2)): `migrate PID NODE` connects and streams through
// `local`, and the deputy takes over `remoteFd` after its exec. Registers and signal mask are
// put back. Throws kj::Exception (FAILED) when the call fails in the process (its errno) or the
// descriptor cannot be taken (pidfd_getfd needs kernel 5.6 and ptrace access).
struct InjectedSocket {
  int remoteFd = -1;      // the descriptor's number in `pid`
  kj::AutoCloseFd local;  // the caller's
};
InjectedSocket injectSocket(pid_t pid, int domain, int type);

// Closes descriptor `fd` of the seized, stopped process `pid` by an injected close(2) (a socket
// of injectSocket() when the move does not happen). Registers and mask are put back; errors are
// ignored (the process may be gone).
void closeInjectedFd(pid_t pid, int fd);

// execveat(2) of the restore stub (embedded in libmigrate: a few static pages at
// 0x3f0000000000 that exit with status 127 unless a tracer takes over). Returns only on failure,
// with errno set.
void execRestoreStub();

// Writes the migration stream of `pid` (a running process that nobody traces)
// to `file`, atomically: a temporary file beside it (`FILE.tmp.PID`, mode 0600) is written,
// fsync'd and renamed over `file`, so `file` is either absent, its previous content, or a
// complete new checkpoint. The process is stopped only for the capture (SeizedProcess, then
// captureImage) and runs on. Throws kj::Exception (FAILED) naming the reason (the process
// cannot be traced or captured, a write fails); the temporary file is then removed and `file`
// is untouched.
CaptureStats writeCheckpoint(pid_t pid, const std::string& file);

// `mosrun -C FILE -A MINUTES` (MOSIX's automatic checkpoints): starts a checkpointer for the
// calling process, which is about to exec the job's program. The checkpointer is a grandchild
// of the caller in its own session (never a child the job could wait for, never sent the
// terminal's signals); it waits until the caller has exec'd (a close-on-exec pipe), then every
// `interval` writes writeCheckpoint(caller, file), replacing the previous checkpoint, until the
// job ends (it sleeps in poll(2) on the job's pidfd). While the job's user part runs on a remote
// node (the caller is its deputy), the checkpoint is asked of the deputy through its control
// socket in `runDir` (deputy_control.h), which writes it the same way. A checkpoint that fails is
// reported on the job's standard error and retried at the next interval; the job is never
// disturbed. `file` must be absolute. Throws kj::Exception (FAILED) if the checkpointer cannot
// be started (fork, pidfd_open).
void startCheckpointer(const std::string& file, std::chrono::milliseconds interval,
                       const std::string& runDir);

}  // namespace mos::migrate
