#pragma once
// libmigrate: capture and restore of a process's user part (design decision 9). The contract the
// rest of umosix uses; the implementation lives beside this header.
//
// Sources: CRIU's compel (infect.c: seize, syscall injection), CRIU restorer stages, rr's
// AutoRemoteSyscalls; ptrace(2), proc(5) (maps, pagemap, auxv, stat), prctl(2) PR_SET_MM_MAP,
// arch_prctl(2) ARCH_MAP_VDSO_64. See ../shared/notes/migration.md §4.

#include <linux/filter.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <kj/io.h>

#include "image.capnp.h"

namespace mos::migrate {

class ImageReader;  // image_stream.h

// Resolves a file of the image to a local path whose content equals the source file's (the
// remote content cache). Called once per distinct file, before the stub is touched.
using FileResolver = std::function<std::string(proto::FileRef::Reader ref)>;

struct RestoreOptions {
  // Credentials the guest runs with on this node (the sandbox never runs a guest as root).
  uid_t uid = 65534;
  gid_t gid = 65534;
  bool dropPrivileges = true;
  // The seccomp program to install (seccomp_filter.h); empty: none (tests of restore alone).
  // It must let the stub's own close(2) and munmap(2) through (allow, or notify: restoreGuest()
  // answers notifications for its injected calls with SECCOMP_USER_NOTIF_FLAG_CONTINUE).
  std::span<const sock_filter> seccompFilter;
  // Flags OR'd into SECCOMP_FILTER_FLAG_NEW_LISTENER (e.g. SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV).
  unsigned seccompExtraFlags = 0;
  // The stub inherits the caller's whole fd table (local restores: checkpoint files, tests).
  // Default: it starts with an empty fd table, apart from fdMap.
  bool keepAllFds = false;
  // (caller fd, stub fd) pairs dup2'd into the stub before exec, e.g. {{pipeWriteEnd, 1}}.
  // At most 64 pairs.
  std::vector<std::pair<int, int>> fdMap;
  // > 0: the guest's pid in the pid namespace of the caller's children (clone3 with set_tid;
  // the namespace's pid 1 must exist, and the caller needs CAP_SYS_ADMIN over it). 0: any pid
  // (plain fork).
  pid_t pid = 0;
};

struct RestoredGuest {
  pid_t pid = -1;            // a child of the caller, running the image, not traced
  kj::AutoCloseFd listener;  // the seccomp user-notification fd; absent without a filter
  // The process's other threads (the image's threads[1..], tids as the caller sees them), made
  // at their image tids in options.pid's namespace, with the guest's credentials and filter;
  // still traced by the calling thread and stopped in a ptrace stop with their image registers:
  // the caller lets each go (PTRACE_DETACH) once it is ready to serve it.
  std::vector<pid_t> threads;
  // Pages written and where the time went (checkpoint.h RestoreStats); stubTime: the fork and
  // exec of the restore stub, before the rebuild.
  uint64_t pages = 0;
  std::chrono::microseconds stubTime{0};
  std::chrono::microseconds mappingsTime{0};
  std::chrono::microseconds pagesTime{0};
  std::chrono::microseconds totalTime{0};
};

// Restores the guest of a job on a node from a migration stream (checkpoint.h,
// protocol/migration.md; the one image format, design decision 9). Reads the header from
// `source`, resolves every mapped file with `files` (nothing is forked before all files
// resolve), forks a stub (a child of the caller, killed if the caller dies: PR_SET_PDEATHSIG; at
// options.pid in the caller's children's pid namespace; fds of options.fdMap only, unless
// options.keepAllFds), then rebuilds it by ptrace syscall injection as restoreImage() does, while
// the frames arrive: mappings (files at their resolved local paths), pages, vDSO at the image's
// address, mm layout and auxv, name, personality, dispositions, sigaltstack, itimers, robust
// list, tid address, rseq, pending signals (re-queued with their siginfo); then drops
// privileges, installs the seccomp filter and takes its listener, unmaps the stub's pages, sets
// xsave, registers and mask, detaches and lets it run. Not taken from the image: cwd, umask,
// descriptors, /proc/PID/exe (a guest's files are its deputy's). The stream's digest is checked
// when its end frame is read, before the guest runs.
// Every thread of the image is restored (clone3 with set_tid at its image tid, before the
// credentials drop; the filter reaches them all through SECCOMP_FILTER_FLAG_TSYNC); they are
// returned stopped (RestoredGuest.threads).
// Throws kj::Exception (FAILED) when the image cannot run here (CPU, vDSO) or the
// stream is damaged or truncated; the stub is then killed and reaped. Exceptions thrown by
// `files` propagate unchanged.
//
// What the caller must know:
// - restoreGuest() is synchronous (a few ms plus the transfer) and waitpid()s the stub by pid
//   with __WALL while it works: no other code of the caller may reap with waitpid(-1) meanwhile.
// - The guest is the caller's child: reap it. Its PR_SET_PDEATHSIG(SIGKILL) fires when the
//   *thread* that called restoreGuest() exits, so call it from a thread that lives as long as
//   the guest should (the main thread).
// - With a filter, the injected close(2) of the stub's listener copy and the final munmap(2)
//   pass through the filter; their notifications are answered by restoreGuest() itself with
//   SECCOMP_USER_NOTIF_FLAG_CONTINUE. The first notification the caller receives is the guest's.
RestoredGuest restoreGuest(ImageReader& source, const FileResolver& files,
                           const RestoreOptions& options);

// A migration agent: a helper process (double-forked, so never a child the job could wait for)
// that seizes the calling process, waits for its next successful execve, captures it at that
// execve's syscall-exit stop (captureImage, before the program's first instruction), writes the
// migration stream to `imagePath` (mode 0600), and turns the process into
// its deputy by injecting execve(deputyPath, deputyArgv) (decision 1). If capture fails it
// detaches and lets the new program run at home, and says so on stderr. If the execve of the
// deputy fails, it says so on stderr, removes the image and makes the process exit_group(125).
// The deputy runs with an empty environment. Call start() while the caller is single-threaded:
// the agent is a fork of it that runs C++ code.
//
// Resume mode (`resumeImagePath` set, the other fields unused): at the exec event, which must be
// the caller's execRestoreStub() (checkpoint.h), the agent restores the checkpoint file into the
// caller with restoreImage() and lets it run; on failure it says why on stderr and kills it.
struct AgentConfig {
  std::string deputyPath;               // absolute path of mos-deputy
  std::vector<std::string> deputyArgv;  // argv[0..] of the deputy; "--image PATH" is appended
  std::string imagePath;
  std::string resumeImagePath;  // a checkpoint file (migration stream)
  // Resume mode into a deputy (`migrate PID home`; checkpoint.h ResumeOptions.intoDeputy): the
  // process keeps its fd table, cwd and umask; `resumeExePath` becomes /proc/PID/exe and the
  // descriptors of `resumeCloseOnExec` get FD_CLOEXEC back. The image file is removed after use.
  bool resumeIntoDeputy = false;
  std::string resumeExePath;
  std::vector<int> resumeCloseOnExec;
  // Resume mode: a program the agent execs once the resume is done and the process runs (its
  // argv; empty: none), with the agent's environment and standard error (the job's): `mosrun -R
  // FILE -r NODE` runs `migrate PID NODE` there. Not run when the resume failed.
  std::vector<std::string> afterResume;
  // >= 0: a descriptor of the caller that the agent keeps (all others are closed in it) and
  // writes one line to when the resume is done: "ok PAGES INJECTED\n" or "failed: WHY\n".
  int reportFd = -1;
};

class Agent {
 public:
  // Starts the agent and returns once it has seized the caller. Throws kj::Exception (FAILED)
  // if it cannot (ptrace refused).
  static Agent start(const AgentConfig& config);
  Agent() = default;
  Agent(Agent&&) noexcept;
  Agent& operator=(Agent&&) noexcept;
  ~Agent();

  // The caller's execve failed: the agent exits without touching the caller (ptrace detaches
  // on the tracer's exit). Returns once the agent has exited (pidfd_open(2) polls readable; at
  // most 5 s), so the caller is no longer traced: an exec retried at once (execvp's PATH search)
  // can seize it again instead of failing with EPERM (ptrace(2): the tracee is already traced).
  void cancel();

  // The agent's pid (not a child of the caller: it is reparented to init or a subreaper).
  pid_t pid() const { return pid_; }
  // The intermediate process of the double fork: a child of the caller, reaped by start(), whose
  // SIGCHLD the caller may receive (a deputy drops it: it is not the job's).
  pid_t helperPid() const { return helper_; }

 private:
  pid_t pid_ = -1;  // the agent
  pid_t helper_ = -1;
  kj::AutoCloseFd control_;  // CLOEXEC write end; a byte means cancel
};

}  // namespace mos::migrate
