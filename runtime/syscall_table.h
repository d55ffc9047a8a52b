#pragma once
// The syscall table: the single source of truth (design decision 5) for the seccomp filter
// (seccomp_filter.h), the supervisor's dispatch (remote/), the generic marshalling (marshal.h),
// docs/syscalls.md (tools/gen_syscall_docs) and the conformance test list.
//
// One constexpr row per x86-64 syscall number, sorted by number. A row with route FORWARD and
// handler NONE is *regular* (rr's term): its argument kinds say everything, and the generic
// marshaller forwards it. Irregular calls name a HandlerId that the supervisor implements.
// A syscall without a row is denied with ENOSYS and reported once per job by name.

#include <cstddef>
#include <cstdint>
#include <span>

namespace mos {

enum class Route : uint8_t {
  LOCAL,    // run by the remote kernel; the seccomp filter returns ALLOW (design decision 4)
  FORWARD,  // executed by the deputy at home; the result is written back into the guest
  EMULATE,  // answered by the supervisor without a round trip (ids from the cache)
  DENY,     // fails with `err`; the supervisor logs the name once per job
};

// What one syscall argument is, for marshalling. Buffer sizes are bytes.
enum class ArgKind : uint8_t {
  NONE,            // unused argument slot
  VAL,             // a plain value: flags, sizes, offsets, pids, modes
  FD,              // a descriptor of the job's home fd table; it must be open
  NEW_FD,          // a descriptor number the call (re)assigns (dup2's and dup3's target): it need
                   // not be open, and the deputy moves its own descriptor out of the way
  PATH,            // NUL-terminated path, in; at most PATH_MAX bytes
  PATH_OR_NULL,    // like PATH, NULL allowed (utimensat)
  STRING,          // a NUL-terminated string that is not looked up as a path now (xattr names,
                   // symlink targets, memfd names): travels like PATH
  IN_BUF,          // bytes in; length is argument `lenArg`
  OUT_BUF,         // bytes out; capacity is argument `lenArg`; the reply is trimmed to ret bytes
  IN_STRUCT,       // `size` bytes in; NULL passes NULL
  OUT_STRUCT,      // `size` bytes out, written back in full when ret >= 0; NULL passes NULL
  INOUT_STRUCT,    // `size` bytes in and out; NULL passes NULL
  INOUT_ARRAY,     // argument `lenArg` elements of `size` bytes, in and out (poll's fds)
  INOUT_BITS,      // an fd_set: ((argument `lenArg` + 63) / 64) * 8 bytes, in and out; NULL ok
  OUT_BUF_LENPTR,  // bytes out whose capacity is the socklen_t that argument `lenArg` points to
                   // (accept, getsockname, recvfrom); trimmed to the capacity
  SIGMASK,         // the call's temporary signal mask: a kernel sigset_t pointer whose size in
                   // bytes is argument `lenArg` (ppoll, epoll_pwait). The supervisor applies it
                   // in the guest (remote/guest_signal.h); the deputy never needs it: NULL
  SIGMASK_PAIR,    // a pointer to {const sigset_t* mask; size_t bytes} (pselect6's sixth
                   // argument): a SIGMASK one step removed; NULL at home too
  OUT_ARRAY,       // argument `lenArg` elements of `size` bytes out (epoll_wait's events,
                   // getgroups); the reply is trimmed to ret elements
};

// True for the kinds that carry a call's temporary signal mask, which the guest applies.
constexpr bool isSignalMaskKind(ArgKind kind) {
  return kind == ArgKind::SIGMASK || kind == ArgKind::SIGMASK_PAIR;
}

// True when syscall `nr` has a row with an argument of a signal-mask kind (pselect6, ppoll,
// epoll_pwait, epoll_pwait2): a table lookup, no guest memory read.
bool takesSignalMask(int nr);

// True for the kinds whose argument is a guest address.
constexpr bool isPointerKind(ArgKind kind) {
  return kind != ArgKind::NONE && kind != ArgKind::VAL && kind != ArgKind::FD &&
         kind != ArgKind::NEW_FD;
}

struct ArgSpec {
  ArgKind kind = ArgKind::NONE;
  uint8_t lenArg = 0;  // index of the argument that holds the length or count
  uint16_t size = 0;   // bytes, for *_STRUCT and INOUT_ARRAY
};

// strace-like classes, for docs and tracing filters (bit set).
enum SyscallClass : uint32_t {
  DESC = 1 << 0,  // takes or returns a descriptor
  FILE = 1 << 1,  // takes a path
  PROC = 1 << 2,  // process management and ids
  SIGNAL = 1 << 3,
  MEMORY = 1 << 4,
  NETWORK = 1 << 5,
  TIME = 1 << 6,
  IPC = 1 << 7,
  OTHER = 1 << 8,
};

// Irregular handlers, implemented by the supervisor (remote/). The table names them by id so
// runtime/ does not depend on remote/.
enum class HandlerId : uint8_t {
  NONE,  // regular: generic marshalling
  IDS,   // getpid, gettid, getuid, ...: answered from the job's Ids cache
  MMAP,  // file-backed mmap: mapped from the remote content cache. The mmap row is LOCAL
         // with this handler: the filter ALLOWs MAP_ANONYMOUS, the rest is notified
  EXEC,  // execve, execveat: performed at home (design decision 2)
  IOV,   // readv, writev, preadv, pwritev (2): flattened into one buffer
  KILL,  // kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo: self-signals stay local
  SET_TID_ADDRESS,  // answers the home tid
  IOCTL,            // argument layout depends on the request
  FCNTL,            // argument layout depends on the command
  PSELECT,          // pselect6's sigmask argument is a pointer to a pointer
  SOCKMSG,          // sendmsg, recvmsg: msghdr with iovecs
  OPEN,             // open, openat, openat2: the job's own /proc files that describe its user part
                    // (maps, status, ...) are served by the supervisor; every other path is regular
  FORK,             // fork, vfork, clone of a process: mirrored, the deputy forks at home
                    // (docs/design.md, "Fork mirroring"); clone with CLONE_THREAD: ENOSYS
  SIGACTION,        // rt_sigaction: LOCAL, but a new SIGCHLD disposition is notified first and
                    // mirrored to the deputy (SIG_IGN and SA_NOCLDWAIT reap children at home)
  SAME_IDS,         // setuid, setresuid, setfsuid, ... (and the gid calls): succeed when they
                    // change nothing (every id named is the job's cached one or -1), else EPERM
  MEMFD,            // memfd_create: the memfd is made on the node (a node-local descriptor, see
                    // OnNode), its number held at home by a memfd of the same name
};

// How a call treats the job's node-local objects (docs/design.md, "Memory shared between job
// processes"): the files of the job's /dev/shm, which live in a directory of the job on the remote
// node, and memfds. Their descriptors are *node-local*: the guest's own fd table holds the file,
// and the same number in the home fd table holds a placeholder (a memfd named after the object),
// so descriptor numbers stay the home kernel's. The supervisor keeps the set of node-local numbers
// of each guest; a call that names none of them is routed as its row says.
enum class OnNode : uint8_t {
  NONE,              // no descriptor argument, or none that can be node-local
  KERNEL,            // on a node-local descriptor the guest's kernel runs it (answered CONTINUE:
                     // the decision is the descriptor's number, a value); a call that mixes a
                     // node-local descriptor with a home one fails with EXDEV
  RELATIVE_REFUSED,  // a path relative to a node-local descriptor: ENOTDIR (ENOENT when empty);
                     // an absolute path ignores the descriptor and is routed as usual
  CLOSE,             // close, close_range: closed at home (the placeholder), then on the node
  DUP,               // dup, dup2, dup3, fcntl F_DUPFD*: the placeholder is duplicated at home, and
                     // the node's file installed at the new number
  SHM_PATH,          // a path under /dev/shm/ names the job's directory on the node, where the
                     // supervisor runs the call; an empty path with AT_EMPTY_PATH on a node-local
                     // descriptor too. A path at home and one in /dev/shm together: EXDEV
  SHM_OPEN,          // open, openat, openat2 of /dev/shm/NAME: opened on the node, a node-local
                     // descriptor
};

// What the deputy does around a call it executes because the job's fd table and /proc/self are
// shared with the deputy (deputy/executor.h). Independently of it, an FD argument naming one of
// the deputy's reserved descriptors is EBADF and a NEW_FD argument moves it out of the way.
enum class HomeView : uint8_t {
  NONE,
  CLOSE_RANGE,  // the range minus the deputy's descriptors
  POLL,         // pollfd entries naming a deputy descriptor report POLLNVAL
  SELECT,       // fd_sets naming a deputy descriptor: EBADF
  SCM_RIGHTS,   // SCM_RIGHTS control data naming a deputy descriptor: EBADF
  FD_LISTING,   // listings of the job's /proc/<pid>/fd and fdinfo without the deputy's entries
  EXE_LINK,     // readlink of /proc/self/exe answers the job's executable; the buffer is the
                // OUT_BUF right after the PATH
};

// What the deputy executes of a syscall when a request for it arrives at home. Derived from the
// route and the handler by the row constructors (HELPER is the one explicit choice); the deputy
// refuses every request whose row says NEVER, and checks the others' buffers against the kinds
// (deputy/executor.h).
enum class AtHome : uint8_t {
  NEVER,   // refused with the row's `err`, ENOSYS when it has none: LOCAL, EMULATE and DENY rows,
           // and the handlers whose requests take another form (IOV sends read/write, EXEC its
           // own message)
  ARGS,    // executed with the row's argument kinds (for IOCTL, FCNTL and PSELECT, the kinds
           // dynamicArgSpecs derives from the values); a buffer only where a kind is a pointer
  MSGHDR,  // SOCKMSG: argument 1 is a home msghdr, auxiliary buffers and pointer fixups allowed
  HELPER,  // a DENY row that the supervisor itself sends home as a step of a handler (the
           // /proc/self snapshots are memfds); executed with the row's argument kinds
};

// The kernel's restart codes (include/linux/errno.h; not exported to user space). A notification
// answered with one while a signal is pending makes the guest's kernel apply the native restart
// rules (signal(7)).
// "Restart unless a handler without SA_RESTART runs": every blocking call but the ones below.
inline constexpr int ERESTARTSYS = 512;
// "Always restart": what a call cut short for the supervisor's own reasons answers (a signal
// session found nothing to take, a move home).
inline constexpr int ERESTARTNOINTR = 513;
// "Restart only if no handler ran": poll, select and epoll_wait (signal(7) lists them among the
// calls that fail with EINTR after a handler regardless of SA_RESTART, yet resume after a stop).
inline constexpr int ERESTARTNOHAND = 514;
// "Never cut short": a native call of this kind does not look at pending signals (it never
// blocks), so a signal never makes it fail with EINTR and it always runs. close, close_range,
// dup, dup2, dup3, pipe, pipe2: a close that a SIGCHLD turned into EINTR would leave the
// descriptor open at home (Linux never restarts close; shells ignore its errors), and a
// pipeline's last stage would inherit its own pipe's write end and wait for EOF forever.
inline constexpr int NEVER_INTERRUPTED = 0;

struct SyscallEntry {
  int nr;            // x86-64 __NR_*
  const char* name;  // as in the man page, e.g. "openat"
  Route route;
  uint32_t classes;  // SyscallClass bits
  ArgSpec args[6];
  HandlerId handler;  // NONE for regular rows; a LOCAL row with a handler is local only under
                      // the handler's condition (MMAP: MAP_ANONYMOUS) and irregular otherwise
  int err;            // DENY: the errno the guest sees
  const char* why;    // DENY: one line for docs and logs
  AtHome atHome;      // what the deputy executes of it
  int restart;        // FORWARD: what a native call returns when a signal cuts it short,
                      // ERESTARTSYS or ERESTARTNOHAND (the guest sees it when a signal
                      // interrupts the call at home); NEVER_INTERRUPTED for calls that never
                      // block: the deputy runs them with signals blocked and they are never
                      // cut short before they start
  HomeView view = HomeView::NONE;  // ARGS/MSGHDR: what the deputy does around the call
  OnNode onNode = OnNode::NONE;    // what it does with the job's node-local objects
  bool eintrWhenWoken = false;     // LOCAL: the kernel returns EINTR, not a restart code, when
                                   // anything wakes the call, a ptrace interrupt included
                                   // (rt_sigtimedwait: kernel/signal.c do_sigtimedwait); the
                                   // signal session and a migration's capture issue it again
  const char* test = nullptr;      // the conformance program that checks it, natively and on a
                                   // remote node (tests/syscalls/<test>.cc); nullptr: none yet
};

// The conformance programs the table names (the `test` column), sorted, without duplicates:
// tests/syscalls/meson.build must build exactly these (a unit test compares the lists).
std::span<const char* const> conformancePrograms();

// Every row, sorted by nr, no duplicates.
std::span<const SyscallEntry> syscallTable();

// The row for `nr`, or nullptr when the syscall has no row (denied with ENOSYS).
const SyscallEntry* findSyscall(int nr);

// Names for logs and docs: "LOCAL", "OUT_BUF", "IOCTL", ...
const char* routeName(Route route);
const char* argKindName(ArgKind kind);
const char* handlerName(HandlerId handler);
const char* atHomeName(AtHome atHome);
const char* homeViewName(HomeView view);
const char* onNodeName(OnNode onNode);

// The restart code of syscall `nr` (its row's `restart`; ERESTARTSYS without a row).
int restartCode(int nr);

// True when syscall `nr` runs in the guest's kernel and fails with EINTR, instead of a restart
// code, when a ptrace interrupt (ours: a signal session, a capture) wakes it; its row's
// eintrWhenWoken. Whoever interrupted it must issue it again when no signal is there to take.
bool eintrWhenWoken(int nr);

// True when syscall `nr` is one a signal never cuts short (its row's restart is
// NEVER_INTERRUPTED): it runs at home whatever signals are pending, and its result stands.
bool neverInterrupted(int nr);

// The largest buffer a single forwarded call moves, bytes (8 MiB). Larger reads and writes are
// cut to this (a short read or write, which callers must handle anyway).
inline constexpr size_t MAX_FORWARD_BYTES = 8u << 20;

}  // namespace mos
