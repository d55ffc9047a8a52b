#pragma once
// The deputy's generic executor: one forwarded syscall (protocol/job.capnp SyscallRequest) run in
// the job's home process, and its SyscallReply.
//
// Generic path (regular rows of runtime/syscall_table.h): in-buffers are used in place (small
// ones copied with a terminating NUL, so a path without its NUL is still a C string), out-buffers
// are allocated inside the reply message itself (zero filled; in/out arguments start from the
// in-data), the pointers are substituted into their arguments, and the raw call runs through
// interruptibleSyscall() (signals.h). Out-buffers are trimmed to what the supervisor writes back
// (runtime/marshal.h unmarshalReply): all of them to nothing when ret < 0, OUT_BUF and buffers
// marked trimToRet to ret bytes, OUT_ARRAY to ret elements; the others travel in full.
//
// Slots 6..15 are auxiliary buffers that replace no argument (a msghdr's name, iovec, data and
// control). After every buffer exists, each Pointer of the request writes the home address of
// its target buffer into its container (job.capnp, struct Pointer); containers and targets are
// always private copies. A pointer outside its buffer, or naming a missing buffer, is a malformed
// request.
//
// Deputy-side special cases, because the fd table and /proc/self are shared with the job (the
// row's argument kinds and its `view` column, runtime/syscall_table.h HomeView, select them):
//   - an FD argument naming a reserved descriptor (fds.h): EBADF, as if it were not open;
//   - dup2/dup3 onto a reserved descriptor: ours moves elsewhere first, then the call runs;
//   - close_range over reserved descriptors: split into the ranges around them;
//   - poll/ppoll entries naming one: POLLNVAL; select/pselect6 sets naming one: EBADF;
//   - sendmsg with SCM_RIGHTS naming one: EBADF; sendmsg/recvmsg without a home msghdr: EFAULT;
//   - getdents64 of /proc/<P>/fd, /proc/<P>/fdinfo, /proc/<P>/task/<T>/fd|fdinfo (also reached
//     through /proc/self, /proc/thread-self, /dev/fd): entries of reserved descriptors removed;
//   - a path that resolves to /proc/<P>/{fd,fdinfo}/<reserved>: ENOENT;
//   - readlink(at) of /proc/<P>/exe (self, thread-self, task/<T>): the job's executable path;
//     other calls on that path use the job's executable path instead of the deputy's;
//
// Admission (design decision 5: the syscall table decides): a request runs only when its row's
// `atHome` (runtime/syscall_table.h) is ARGS, MSGHDR or HELPER, and every buffer it carries
// stands behind an argument whose kind (the row's, or dynamicArgSpecs' for ioctl, fcntl and
// pselect6) reads or writes through a pointer, holds everything the call touches there, and has
// the direction of that kind; auxiliary buffers and pointer fixups only for MSGHDR rows, whose
// msghdr must point into the request's buffers alone. Anything else is refused before it reaches
// the kernel: the reply is -(the row's err), -ENOSYS when it has none or there is no row, and
// the syscall is logged once. So calls that would change the deputy itself (fork, exit, memory
// mappings, signal dispositions: LOCAL, EMULATE and DENY rows) never run here.

#include <sys/types.h>

#include <capnp/message.h>

#include <cstdint>
#include <set>
#include <string>

#include "fds.h"
#include "job.capnp.h"
#include "syscall_table.h"

namespace mos::deputy {

// readlink(2) of `path` into a std::string (at most PATH_MAX bytes); empty on failure.
std::string readLink(const std::string& path);

class Executor {
 public:
  // `fds`: the deputy's reserved descriptors (borrowed). `jobExe`: what /proc/self/exe shows the
  // job (the image's exe.path). `pid`: the job's pid (ours).
  Executor(ReservedFds& fds, std::string jobExe, pid_t pid);

  // The job's pid changed: we are the child of a mirrored fork (Deputy::handleFork).
  void setPid(pid_t pid) { pid_ = pid; }

  // Executes `request` and builds the reply into `replyMessage` as a ToRemote.reply. The
  // `interrupted` flag is left false: the caller knows whether a signal is pending.
  // Never throws for guest-visible failures (they are the reply's -errno); throws
  // kj::Exception (FAILED) only when the request is malformed.
  void execute(proto::SyscallRequest::Reader request, capnp::MessageBuilder& replyMessage);

  // What a path names, as far as the deputy cares.
  enum class ProcPath { OTHER, EXE, RESERVED_FD };
  // Classifies `path` (relative paths against `dirfd`, AT_FDCWD for the cwd) lexically.
  ProcPath classifyPath(int dirfd, const char* path);

  const std::string& jobExe() const { return jobExe_; }

 private:
  // Whether the table lets `request` (syscall `nr`, row `row` or nullptr, its `args`) run here,
  // and with which argument kinds (`specs`). Returns 0, or the errno it is refused with.
  int admit(int nr, const SyscallEntry* row, const uint64_t (&args)[6],
            proto::SyscallRequest::Reader request, ArgSpec (&specs)[6]);
  // The errno a refusal of `nr` answers (the row's err, ENOSYS without one); logs `why` once.
  int refuse(int nr, const SyscallEntry* row, const char* why);
  // Preconditions: admit() accepted the request; the buffers are built.
  int64_t run(int nr, uint64_t (&args)[6], const SyscallEntry* row, const ArgSpec (&specs)[6]);
  bool msghdrIsHome();
  int64_t closeRange(uint64_t (&args)[6]);
  // `timeoutIsValue`: poll's milliseconds (else ppoll's timespec).
  int64_t pollAroundReserved(int nr, uint64_t (&args)[6], bool timeoutIsValue);
  bool setsNameReserved(uint64_t (&args)[6]);
  bool rightsNameReserved();
  int64_t filterProcFdListing(int nr, int fd, uint64_t (&args)[6], int64_t ret);
  bool isOwnFdDirectory(int fd);

  ReservedFds& fds_;
  std::string jobExe_;
  pid_t pid_;
  std::set<int> refused_;  // syscalls already logged as refused
};

}  // namespace mos::deputy
