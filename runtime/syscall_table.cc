#include "syscall_table.h"

#include <asm/unistd.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysinfo.h>
#include <sys/time.h>
#include <sys/times.h>
#include <sys/utsname.h>
#include <time.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <string_view>
#include <vector>

namespace mos {
namespace {

// ---- Structure sizes, bytes: the x86-64 kernel ABI. Where glibc's type has the kernel's layout
// we take its sizeof and pin the number, so a header surprise fails the build, not a guest.

constexpr uint16_t STAT_BYTES = sizeof(struct stat);  // struct stat (kernel: struct stat)
static_assert(STAT_BYTES == 144);
constexpr uint16_t STATX_BYTES = sizeof(struct statx);  // include/uapi/linux/stat.h
static_assert(STATX_BYTES == 256);
constexpr uint16_t STATFS_BYTES = sizeof(struct statfs);  // kernel struct statfs (64-bit)
static_assert(STATFS_BYTES == 120);
constexpr uint16_t UTSNAME_BYTES = sizeof(struct utsname);  // struct new_utsname
static_assert(UTSNAME_BYTES == 390);
constexpr uint16_t SYSINFO_BYTES = sizeof(struct sysinfo);
static_assert(SYSINFO_BYTES == 112);
constexpr uint16_t RLIMIT_BYTES = sizeof(struct rlimit);  // struct rlimit64 for prlimit64
static_assert(RLIMIT_BYTES == 16);
constexpr uint16_t RUSAGE_BYTES = sizeof(struct rusage);
static_assert(RUSAGE_BYTES == 144);
constexpr uint16_t TIMESPEC_BYTES = sizeof(struct timespec);  // struct __kernel_timespec
static_assert(TIMESPEC_BYTES == 16);
constexpr uint16_t TIMEVAL_BYTES = sizeof(struct timeval);
static_assert(TIMEVAL_BYTES == 16);
constexpr uint16_t ITIMERSPEC_BYTES = sizeof(struct itimerspec);  // timerfd_settime
static_assert(ITIMERSPEC_BYTES == 32);
constexpr uint16_t SIGINFO_BYTES = sizeof(siginfo_t);
static_assert(SIGINFO_BYTES == 128);
constexpr uint16_t POLLFD_BYTES = sizeof(struct pollfd);
static_assert(POLLFD_BYTES == 8);
constexpr uint16_t EPOLL_EVENT_BYTES = sizeof(struct epoll_event);  // packed on x86-64
static_assert(EPOLL_EVENT_BYTES == 12);
constexpr uint16_t INT_BYTES = 4;       // int, socklen_t, uid_t, gid_t, pid_t
constexpr uint16_t LOFF_BYTES = 8;      // loff_t (sendfile, splice, copy_file_range offsets)
constexpr uint16_t FD_PAIR_BYTES = 8;   // int[2] (pipe, socketpair)
constexpr uint16_t UTIMBUF_BYTES = 16;  // struct utimbuf: two longs
constexpr uint16_t TIMEVAL_PAIR_BYTES = 2 * TIMEVAL_BYTES;    // utimes, futimesat
constexpr uint16_t TIMESPEC_PAIR_BYTES = 2 * TIMESPEC_BYTES;  // utimensat

// ---- Argument kinds, spelled short so a row fits on a line.

// A pointer slot of an irregular row that its handler decodes (an iovec array, a msghdr).
constexpr ArgSpec HANDLED{};
constexpr ArgSpec VAL{ArgKind::VAL};
constexpr ArgSpec FD{ArgKind::FD};
constexpr ArgSpec NEW_FD{ArgKind::NEW_FD};
constexpr ArgSpec PATH{ArgKind::PATH};
constexpr ArgSpec PATH_OR_NULL{ArgKind::PATH_OR_NULL};
// A call's temporary signal mask whose size is argument `lenArg`; pselect6's {mask, size} pair.
constexpr ArgSpec sigMask(uint8_t lenArg) { return {ArgKind::SIGMASK, lenArg}; }
constexpr ArgSpec SIGMASK_PAIR{ArgKind::SIGMASK_PAIR};
// Strings that are not paths (xattr names, symlink targets) travel like paths: NUL-terminated,
// at most PATH_MAX bytes (XATTR_NAME_MAX is 255); the deputy does not look them up.
constexpr ArgSpec STRING{ArgKind::STRING};

constexpr ArgSpec inBuf(uint8_t lenArg) { return {ArgKind::IN_BUF, lenArg, 0}; }
constexpr ArgSpec outBuf(uint8_t lenArg) { return {ArgKind::OUT_BUF, lenArg, 0}; }
constexpr ArgSpec inStruct(uint16_t size) { return {ArgKind::IN_STRUCT, 0, size}; }
constexpr ArgSpec outStruct(uint16_t size) { return {ArgKind::OUT_STRUCT, 0, size}; }
constexpr ArgSpec inoutStruct(uint16_t size) { return {ArgKind::INOUT_STRUCT, 0, size}; }
constexpr ArgSpec inoutArray(uint8_t countArg, uint16_t size) {
  return {ArgKind::INOUT_ARRAY, countArg, size};
}
constexpr ArgSpec outArray(uint8_t countArg, uint16_t size) {
  return {ArgKind::OUT_ARRAY, countArg, size};
}
constexpr ArgSpec inoutBits(uint8_t nfdsArg) { return {ArgKind::INOUT_BITS, nfdsArg, 0}; }
// The buffer at this argument has the capacity that the socklen_t at `lenArg` holds; `lenArg`
// itself is an INOUT_STRUCT of 4 bytes.
constexpr ArgSpec outBufLenptr(uint8_t lenArg) { return {ArgKind::OUT_BUF_LENPTR, lenArg, 0}; }
constexpr ArgSpec SOCKLEN_PTR = inoutStruct(INT_BYTES);

// ---- Row constructors: one per route, so each row reads as a sentence.

// What the deputy executes of a row, from its route and handler (AtHome).
constexpr AtHome atHomeOf(Route route, HandlerId handler) {
  if (route != Route::FORWARD) {
    return AtHome::NEVER;
  }
  switch (handler) {
    case HandlerId::IOV:   // sent home as read, write, pread64 or pwrite64
    case HandlerId::EXEC:  // sent home as an ExecRequest
    case HandlerId::FORK:  // sent home as a ForkRequest
      return AtHome::NEVER;
    case HandlerId::SOCKMSG: return AtHome::MSGHDR;
    default: return AtHome::ARGS;
  }
}

constexpr SyscallEntry row(int nr, const char* name, Route route, uint32_t classes,
                           std::initializer_list<ArgSpec> args, HandlerId handler, int err,
                           const char* why) {
  SyscallEntry e{nr,         name, route, classes, {}, handler, err, why, atHomeOf(route, handler),
                 ERESTARTSYS};
  size_t i = 0;
  bool fd = false, path = false;
  for (const ArgSpec& a : args) {
    e.args[i++] = a;
    fd = fd || a.kind == ArgKind::FD;
    path = path || a.kind == ArgKind::PATH || a.kind == ArgKind::PATH_OR_NULL;
  }
  // On a node-local descriptor the guest's own kernel runs a call that takes no path (the
  // decision reads no memory); a call with a path and a node-local dirfd is refused (ENOTDIR)
  // unless its row says better.
  if (fd && !path && handler != HandlerId::EXEC &&
      (route == Route::FORWARD || handler == HandlerId::MMAP)) {
    e.onNode = OnNode::KERNEL;
  } else if (fd && path && route == Route::FORWARD) {
    e.onNode = OnNode::RELATIVE_REFUSED;
  }
  return e;
}

// Run by the remote kernel: the filter ALLOWs it.
constexpr SyscallEntry local(int nr, const char* name, uint32_t classes) {
  return row(nr, name, Route::LOCAL, classes, {}, HandlerId::NONE, 0, nullptr);
}

// Run by the remote kernel for anonymous memory; file-backed calls go to `handler`.
constexpr SyscallEntry localUnlessFileBacked(int nr, const char* name, uint32_t classes,
                                             std::initializer_list<ArgSpec> args,
                                             HandlerId handler) {
  return row(nr, name, Route::LOCAL, classes, args, handler, 0, nullptr);
}

// Run by the remote kernel, after `handler` looked at the calls the filter sends it (an
// argument-dependent rule in seccomp_filter.cc).
constexpr SyscallEntry localAfter(int nr, const char* name, uint32_t classes, HandlerId handler) {
  return row(nr, name, Route::LOCAL, classes, {}, handler, 0, nullptr);
}

// Answered by the supervisor alone.
constexpr SyscallEntry emulate(int nr, const char* name, uint32_t classes, HandlerId handler) {
  return row(nr, name, Route::EMULATE, classes, {}, handler, 0, nullptr);
}

// Executed by the deputy. Without a handler the row is regular: `args` say everything. With a
// handler, `args` describe the plain arguments for docs; pointer slots the handler decodes are
// HANDLED.
constexpr SyscallEntry forward(int nr, const char* name, uint32_t classes,
                               std::initializer_list<ArgSpec> args,
                               HandlerId handler = HandlerId::NONE) {
  return row(nr, name, Route::FORWARD, classes, args, handler, 0, nullptr);
}

// A forwarded call that a signal interrupts with ERESTARTNOHAND, as the kernel's poll, select
// and epoll_wait do (fs/select.c, fs/eventpoll.c).
constexpr SyscallEntry noRestartAfterHandler(SyscallEntry e) {
  e.restart = ERESTARTNOHAND;
  return e;
}

// A forwarded call that never blocks natively, so a signal never cuts it short (the kernel
// looks at pending signals only where a call waits): close, dup2... must run whatever is pending.
constexpr SyscallEntry notInterruptible(SyscallEntry e) {
  e.restart = NEVER_INTERRUPTED;
  return e;
}

// A local call that fails with EINTR whatever woke it, our ptrace interrupts included (it has no
// restart code): they issue it again (SyscallEntry::eintrWhenWoken).
constexpr SyscallEntry restartedAfterOurWakeup(SyscallEntry e) {
  e.eintrWhenWoken = true;
  return e;
}

// A forwarded call that the deputy adjusts around its own descriptors or /proc/self/exe.
constexpr SyscallEntry seenFromHome(HomeView view, SyscallEntry e) {
  e.view = view;
  return e;
}

// Fails with `err`; `why` goes into docs and the job's log.
constexpr SyscallEntry deny(int nr, const char* name, uint32_t classes, int err, const char* why) {
  return row(nr, name, Route::DENY, classes, {}, HandlerId::NONE, err, why);
}

// Denied to the guest like deny(), but executed at home, with the argument kinds `args`, when
// the supervisor sends it as a step of one of its own handlers (AtHome::HELPER).
constexpr SyscallEntry denyButHomeHelper(int nr, const char* name, uint32_t classes, int err,
                                         const char* why, std::initializer_list<ArgSpec> args) {
  SyscallEntry e = row(nr, name, Route::DENY, classes, args, HandlerId::NONE, err, why);
  e.atHome = AtHome::HELPER;
  return e;
}

// Run by the remote kernel in the job's own IPC namespace on the node (one per job, made with its
// pid namespace: docs/design.md, "Memory shared between job processes"): System V shared
// memory, semaphores and message queues are the job's alone and shared by its processes there.
constexpr SyscallEntry inJobIpcNamespace(int nr, const char* name, uint32_t classes) {
  return local(nr, name, classes);
}

// OnNode: how a forwarded call treats the job's node-local objects (syscall_table.h).
constexpr SyscallEntry closesNodeFd(SyscallEntry e) {
  e.onNode = OnNode::CLOSE;
  return e;
}
constexpr SyscallEntry dupsNodeFd(SyscallEntry e) {
  e.onNode = OnNode::DUP;
  return e;
}
constexpr SyscallEntry jobShmOnNode(SyscallEntry e) {
  e.onNode = OnNode::SHM_PATH;
  return e;
}
constexpr SyscallEntry opensJobShm(SyscallEntry e) {
  e.onNode = OnNode::SHM_OPEN;
  return e;
}

constexpr const char* FORK_LATER = "clone3 is not mirrored yet (glibc falls back to clone)";
constexpr const char* MOUNTS = "mounts belong to the home node; a guest cannot change them";
constexpr const char* CREDS =
    "credential changes of a guest come in a later issue (the id cache would go stale)";
// The set*id rows that change nothing succeed (SAME_IDS); a real change is refused with EPERM
// and the same reason.
constexpr const char* HOST_ADMIN = "administers the remote node, which the guest must not touch";
constexpr const char* KERNEL_AIO = "kernel AIO contexts cannot span nodes";
constexpr const char* IO_URING =
    "io_uring operations bypass the seccomp sandbox and rings cannot span nodes";
constexpr const char* CLOCK_SET = "the remote node's clock is not the job's to set";
constexpr const char* SIGNALFD =
    "signals are delivered to the guest on the remote node, not to a descriptor at home";
constexpr const char* OTHER_MEMORY = "another process's memory is not reachable from a guest";
constexpr const char* NAMESPACES = "namespaces of a guest are those of its home process";
constexpr const char* MMSG =
    "a vector of msghdrs is not forwarded yet (sendmsg and recvmsg are; glibc does not fall "
    "back, so callers see ENOSYS)";

using enum HandlerId;

constexpr SyscallEntry ROWS[] = {
    forward(__NR_read, "read", DESC, {FD, outBuf(2), VAL}),
    forward(__NR_write, "write", DESC, {FD, inBuf(2), VAL}),
    opensJobShm(forward(__NR_open, "open", DESC | FILE, {PATH, VAL, VAL}, OPEN)),
    notInterruptible(closesNodeFd(forward(__NR_close, "close", DESC, {FD}))),
    jobShmOnNode(forward(__NR_stat, "stat", FILE, {PATH, outStruct(STAT_BYTES)})),
    forward(__NR_fstat, "fstat", DESC, {FD, outStruct(STAT_BYTES)}),
    jobShmOnNode(forward(__NR_lstat, "lstat", FILE, {PATH, outStruct(STAT_BYTES)})),
    noRestartAfterHandler(seenFromHome(
        HomeView::POLL, forward(__NR_poll, "poll", DESC, {inoutArray(1, POLLFD_BYTES), VAL, VAL}))),
    forward(__NR_lseek, "lseek", DESC, {FD, VAL, VAL}),
    localUnlessFileBacked(__NR_mmap, "mmap", MEMORY | DESC, {VAL, VAL, VAL, VAL, FD, VAL}, MMAP),
    local(__NR_mprotect, "mprotect", MEMORY),
    local(__NR_munmap, "munmap", MEMORY),
    local(__NR_brk, "brk", MEMORY),
    localAfter(__NR_rt_sigaction, "rt_sigaction", SIGNAL, SIGACTION),
    local(__NR_rt_sigprocmask, "rt_sigprocmask", SIGNAL),
    local(__NR_rt_sigreturn, "rt_sigreturn", SIGNAL),
    forward(__NR_ioctl, "ioctl", DESC, {FD, VAL}, IOCTL),
    forward(__NR_pread64, "pread64", DESC, {FD, outBuf(2), VAL, VAL}),
    forward(__NR_pwrite64, "pwrite64", DESC, {FD, inBuf(2), VAL, VAL}),
    forward(__NR_readv, "readv", DESC, {FD, HANDLED, VAL}, IOV),
    forward(__NR_writev, "writev", DESC, {FD, HANDLED, VAL}, IOV),
    jobShmOnNode(forward(__NR_access, "access", FILE, {PATH, VAL})),
    notInterruptible(forward(__NR_pipe, "pipe", DESC | IPC, {outStruct(FD_PAIR_BYTES)})),
    noRestartAfterHandler(seenFromHome(
        HomeView::SELECT,
        forward(__NR_select, "select", DESC,
                {VAL, inoutBits(0), inoutBits(0), inoutBits(0), inoutStruct(TIMEVAL_BYTES)}))),
    local(__NR_sched_yield, "sched_yield", PROC),
    local(__NR_mremap, "mremap", MEMORY),
    local(__NR_msync, "msync", MEMORY),
    local(__NR_mincore, "mincore", MEMORY),
    local(__NR_madvise, "madvise", MEMORY),
    inJobIpcNamespace(__NR_shmget, "shmget", IPC | MEMORY),
    inJobIpcNamespace(__NR_shmat, "shmat", IPC | MEMORY),
    inJobIpcNamespace(__NR_shmctl, "shmctl", IPC | MEMORY),
    notInterruptible(dupsNodeFd(forward(__NR_dup, "dup", DESC, {FD}))),
    notInterruptible(dupsNodeFd(forward(__NR_dup2, "dup2", DESC, {FD, NEW_FD}))),
    local(__NR_pause, "pause", SIGNAL),
    local(__NR_nanosleep, "nanosleep", TIME),
    local(__NR_getitimer, "getitimer", TIME),
    local(__NR_alarm, "alarm", TIME | SIGNAL),
    local(__NR_setitimer, "setitimer", TIME | SIGNAL),
    emulate(__NR_getpid, "getpid", PROC, IDS),
    forward(__NR_sendfile, "sendfile", DESC | NETWORK, {FD, FD, inoutStruct(LOFF_BYTES), VAL}),
    forward(__NR_socket, "socket", NETWORK | DESC, {VAL, VAL, VAL}),
    forward(__NR_connect, "connect", NETWORK | DESC, {FD, inBuf(2), VAL}),
    forward(__NR_accept, "accept", NETWORK | DESC, {FD, outBufLenptr(2), SOCKLEN_PTR}),
    forward(__NR_sendto, "sendto", NETWORK | DESC, {FD, inBuf(2), VAL, VAL, inBuf(5), VAL}),
    forward(__NR_recvfrom, "recvfrom", NETWORK | DESC,
            {FD, outBuf(2), VAL, VAL, outBufLenptr(5), SOCKLEN_PTR}),
    seenFromHome(HomeView::SCM_RIGHTS,
                 forward(__NR_sendmsg, "sendmsg", NETWORK | DESC, {FD, HANDLED, VAL}, SOCKMSG)),
    forward(__NR_recvmsg, "recvmsg", NETWORK | DESC, {FD, HANDLED, VAL}, SOCKMSG),
    forward(__NR_shutdown, "shutdown", NETWORK | DESC, {FD, VAL}),
    forward(__NR_bind, "bind", NETWORK | DESC, {FD, inBuf(2), VAL}),
    forward(__NR_listen, "listen", NETWORK | DESC, {FD, VAL}),
    forward(__NR_getsockname, "getsockname", NETWORK | DESC, {FD, outBufLenptr(2), SOCKLEN_PTR}),
    forward(__NR_getpeername, "getpeername", NETWORK | DESC, {FD, outBufLenptr(2), SOCKLEN_PTR}),
    forward(__NR_socketpair, "socketpair", NETWORK | DESC,
            {VAL, VAL, VAL, outStruct(FD_PAIR_BYTES)}),
    forward(__NR_setsockopt, "setsockopt", NETWORK | DESC, {FD, VAL, VAL, inBuf(4), VAL}),
    forward(__NR_getsockopt, "getsockopt", NETWORK | DESC,
            {FD, VAL, VAL, outBufLenptr(4), SOCKLEN_PTR}),
    // A process: mirrored (docs/design.md, "Fork mirroring"); CLONE_THREAD: ENOSYS for now.
    forward(__NR_clone, "clone", PROC, {VAL, VAL, VAL, VAL, VAL}, FORK),
    forward(__NR_fork, "fork", PROC, {}, FORK),
    forward(__NR_vfork, "vfork", PROC, {}, FORK),
    forward(__NR_execve, "execve", PROC | FILE, {PATH, HANDLED, HANDLED}, EXEC),
    local(__NR_exit, "exit", PROC),
    forward(__NR_wait4, "wait4", PROC, {VAL, outStruct(INT_BYTES), VAL, outStruct(RUSAGE_BYTES)}),
    forward(__NR_kill, "kill", SIGNAL | PROC, {VAL, VAL}, KILL),
    forward(__NR_uname, "uname", OTHER, {outStruct(UTSNAME_BYTES)}),
    inJobIpcNamespace(__NR_semget, "semget", IPC),
    restartedAfterOurWakeup(inJobIpcNamespace(__NR_semop, "semop", IPC)),
    inJobIpcNamespace(__NR_semctl, "semctl", IPC),
    inJobIpcNamespace(__NR_shmdt, "shmdt", IPC | MEMORY),
    inJobIpcNamespace(__NR_msgget, "msgget", IPC),
    inJobIpcNamespace(__NR_msgsnd, "msgsnd", IPC),
    inJobIpcNamespace(__NR_msgrcv, "msgrcv", IPC),
    inJobIpcNamespace(__NR_msgctl, "msgctl", IPC),
    dupsNodeFd(forward(__NR_fcntl, "fcntl", DESC, {FD, VAL}, FCNTL)),
    forward(__NR_flock, "flock", DESC, {FD, VAL}),
    forward(__NR_fsync, "fsync", DESC, {FD}),
    forward(__NR_fdatasync, "fdatasync", DESC, {FD}),
    jobShmOnNode(forward(__NR_truncate, "truncate", FILE, {PATH, VAL})),
    forward(__NR_ftruncate, "ftruncate", DESC, {FD, VAL}),
    forward(__NR_getdents, "getdents", DESC, {FD, outBuf(2), VAL}),
    forward(__NR_getcwd, "getcwd", FILE, {outBuf(1), VAL}),
    forward(__NR_chdir, "chdir", FILE, {PATH}),
    forward(__NR_fchdir, "fchdir", DESC, {FD}),
    jobShmOnNode(forward(__NR_rename, "rename", FILE, {PATH, PATH})),
    forward(__NR_mkdir, "mkdir", FILE, {PATH, VAL}),
    forward(__NR_rmdir, "rmdir", FILE, {PATH}),
    forward(__NR_creat, "creat", DESC | FILE, {PATH, VAL}),
    jobShmOnNode(forward(__NR_link, "link", FILE, {PATH, PATH})),
    jobShmOnNode(forward(__NR_unlink, "unlink", FILE, {PATH})),
    forward(__NR_symlink, "symlink", FILE, {STRING, PATH}),
    seenFromHome(HomeView::EXE_LINK,
                 forward(__NR_readlink, "readlink", FILE, {PATH, outBuf(2), VAL})),
    jobShmOnNode(forward(__NR_chmod, "chmod", FILE, {PATH, VAL})),
    forward(__NR_fchmod, "fchmod", DESC, {FD, VAL}),
    forward(__NR_chown, "chown", FILE, {PATH, VAL, VAL}),
    forward(__NR_fchown, "fchown", DESC, {FD, VAL, VAL}),
    forward(__NR_lchown, "lchown", FILE, {PATH, VAL, VAL}),
    forward(__NR_umask, "umask", PROC | FILE, {VAL}),
    local(__NR_gettimeofday, "gettimeofday", TIME),
    forward(__NR_getrlimit, "getrlimit", PROC, {VAL, outStruct(RLIMIT_BYTES)}),
    local(__NR_getrusage, "getrusage", PROC),
    forward(__NR_sysinfo, "sysinfo", OTHER, {outStruct(SYSINFO_BYTES)}),
    local(__NR_times, "times", PROC | TIME),
    deny(__NR_ptrace, "ptrace", PROC, EPERM,
         "a guest cannot trace: its tracees and tracers live on the home node"),
    emulate(__NR_getuid, "getuid", PROC, IDS),
    deny(__NR_syslog, "syslog", OTHER, EPERM, HOST_ADMIN),
    emulate(__NR_getgid, "getgid", PROC, IDS),
    emulate(__NR_setuid, "setuid", PROC, SAME_IDS),
    emulate(__NR_setgid, "setgid", PROC, SAME_IDS),
    emulate(__NR_geteuid, "geteuid", PROC, IDS),
    emulate(__NR_getegid, "getegid", PROC, IDS),
    forward(__NR_setpgid, "setpgid", PROC, {VAL, VAL}),
    forward(__NR_getppid, "getppid", PROC, {}),
    forward(__NR_getpgrp, "getpgrp", PROC, {}),
    forward(__NR_setsid, "setsid", PROC, {}),
    emulate(__NR_setreuid, "setreuid", PROC, SAME_IDS),
    emulate(__NR_setregid, "setregid", PROC, SAME_IDS),
    forward(__NR_getgroups, "getgroups", PROC, {VAL, outArray(0, INT_BYTES)}),
    deny(__NR_setgroups, "setgroups", PROC, EPERM, CREDS),
    emulate(__NR_setresuid, "setresuid", PROC, SAME_IDS),
    forward(__NR_getresuid, "getresuid", PROC,
            {outStruct(INT_BYTES), outStruct(INT_BYTES), outStruct(INT_BYTES)}),
    emulate(__NR_setresgid, "setresgid", PROC, SAME_IDS),
    forward(__NR_getresgid, "getresgid", PROC,
            {outStruct(INT_BYTES), outStruct(INT_BYTES), outStruct(INT_BYTES)}),
    forward(__NR_getpgid, "getpgid", PROC, {VAL}),
    emulate(__NR_setfsuid, "setfsuid", PROC, SAME_IDS),
    emulate(__NR_setfsgid, "setfsgid", PROC, SAME_IDS),
    forward(__NR_getsid, "getsid", PROC, {VAL}),
    local(__NR_rt_sigpending, "rt_sigpending", SIGNAL),
    restartedAfterOurWakeup(local(__NR_rt_sigtimedwait, "rt_sigtimedwait", SIGNAL)),
    forward(__NR_rt_sigqueueinfo, "rt_sigqueueinfo", SIGNAL | PROC,
            {VAL, VAL, inStruct(SIGINFO_BYTES)}, KILL),
    local(__NR_rt_sigsuspend, "rt_sigsuspend", SIGNAL),
    local(__NR_sigaltstack, "sigaltstack", SIGNAL),
    forward(__NR_utime, "utime", FILE, {PATH, inStruct(UTIMBUF_BYTES)}),
    forward(__NR_mknod, "mknod", FILE, {PATH, VAL, VAL}),
    jobShmOnNode(forward(__NR_statfs, "statfs", FILE, {PATH, outStruct(STATFS_BYTES)})),
    forward(__NR_fstatfs, "fstatfs", DESC, {FD, outStruct(STATFS_BYTES)}),
    forward(__NR_getpriority, "getpriority", PROC, {VAL, VAL}),
    forward(__NR_setpriority, "setpriority", PROC, {VAL, VAL, VAL}),
    deny(__NR_vhangup, "vhangup", OTHER, EPERM, HOST_ADMIN),
    deny(__NR_modify_ldt, "modify_ldt", MEMORY, ENOSYS, "LDT segments are not migrated"),
    deny(__NR_pivot_root, "pivot_root", FILE, EPERM, MOUNTS),
    local(__NR_prctl, "prctl", PROC),
    local(__NR_arch_prctl, "arch_prctl", PROC | MEMORY),
    deny(__NR_adjtimex, "adjtimex", TIME, EPERM, CLOCK_SET),
    forward(__NR_setrlimit, "setrlimit", PROC, {VAL, inStruct(RLIMIT_BYTES)}),
    deny(__NR_chroot, "chroot", FILE, EPERM, "a guest's root directory is its home root"),
    forward(__NR_sync, "sync", FILE, {}),
    deny(__NR_acct, "acct", FILE, EPERM, HOST_ADMIN),
    deny(__NR_settimeofday, "settimeofday", TIME, EPERM, CLOCK_SET),
    deny(__NR_mount, "mount", FILE, EPERM, MOUNTS),
    deny(__NR_umount2, "umount2", FILE, EPERM, MOUNTS),
    deny(__NR_swapon, "swapon", FILE, EPERM, HOST_ADMIN),
    deny(__NR_swapoff, "swapoff", FILE, EPERM, HOST_ADMIN),
    deny(__NR_reboot, "reboot", OTHER, EPERM, HOST_ADMIN),
    deny(__NR_sethostname, "sethostname", OTHER, EPERM, HOST_ADMIN),
    deny(__NR_setdomainname, "setdomainname", OTHER, EPERM, HOST_ADMIN),
    deny(__NR_iopl, "iopl", OTHER, EPERM, HOST_ADMIN),
    deny(__NR_ioperm, "ioperm", OTHER, EPERM, HOST_ADMIN),
    deny(__NR_init_module, "init_module", OTHER, EPERM, HOST_ADMIN),
    deny(__NR_delete_module, "delete_module", OTHER, EPERM, HOST_ADMIN),
    emulate(__NR_gettid, "gettid", PROC, IDS),
    forward(__NR_readahead, "readahead", DESC, {FD, VAL, VAL}),
    forward(__NR_setxattr, "setxattr", FILE, {PATH, STRING, inBuf(3), VAL, VAL}),
    forward(__NR_lsetxattr, "lsetxattr", FILE, {PATH, STRING, inBuf(3), VAL, VAL}),
    forward(__NR_fsetxattr, "fsetxattr", DESC, {FD, STRING, inBuf(3), VAL, VAL}),
    forward(__NR_getxattr, "getxattr", FILE, {PATH, STRING, outBuf(3), VAL}),
    forward(__NR_lgetxattr, "lgetxattr", FILE, {PATH, STRING, outBuf(3), VAL}),
    forward(__NR_fgetxattr, "fgetxattr", DESC, {FD, STRING, outBuf(3), VAL}),
    forward(__NR_listxattr, "listxattr", FILE, {PATH, outBuf(2), VAL}),
    forward(__NR_llistxattr, "llistxattr", FILE, {PATH, outBuf(2), VAL}),
    forward(__NR_flistxattr, "flistxattr", DESC, {FD, outBuf(2), VAL}),
    forward(__NR_removexattr, "removexattr", FILE, {PATH, STRING}),
    forward(__NR_lremovexattr, "lremovexattr", FILE, {PATH, STRING}),
    forward(__NR_fremovexattr, "fremovexattr", DESC, {FD, STRING}),
    forward(__NR_tkill, "tkill", SIGNAL | PROC, {VAL, VAL}, KILL),
    local(__NR_time, "time", TIME),
    local(__NR_futex, "futex", IPC | MEMORY),
    local(__NR_sched_getaffinity, "sched_getaffinity", PROC),
    deny(__NR_io_setup, "io_setup", DESC, ENOSYS, KERNEL_AIO),
    deny(__NR_io_destroy, "io_destroy", DESC, ENOSYS, KERNEL_AIO),
    deny(__NR_io_getevents, "io_getevents", DESC, ENOSYS, KERNEL_AIO),
    deny(__NR_io_submit, "io_submit", DESC, ENOSYS, KERNEL_AIO),
    deny(__NR_io_cancel, "io_cancel", DESC, ENOSYS, KERNEL_AIO),
    forward(__NR_epoll_create, "epoll_create", DESC, {VAL}),
    seenFromHome(HomeView::FD_LISTING,
                 forward(__NR_getdents64, "getdents64", DESC, {FD, outBuf(2), VAL})),
    emulate(__NR_set_tid_address, "set_tid_address", PROC, SET_TID_ADDRESS),
    local(__NR_restart_syscall, "restart_syscall", SIGNAL),
    restartedAfterOurWakeup(inJobIpcNamespace(__NR_semtimedop, "semtimedop", IPC)),
    forward(__NR_fadvise64, "fadvise64", DESC, {FD, VAL, VAL, VAL}),
    deny(__NR_clock_settime, "clock_settime", TIME, EPERM, CLOCK_SET),
    local(__NR_clock_gettime, "clock_gettime", TIME),
    local(__NR_clock_getres, "clock_getres", TIME),
    local(__NR_clock_nanosleep, "clock_nanosleep", TIME),
    local(__NR_exit_group, "exit_group", PROC),
    noRestartAfterHandler(forward(__NR_epoll_wait, "epoll_wait", DESC,
                                  {FD, outArray(2, EPOLL_EVENT_BYTES), VAL, VAL})),
    forward(__NR_epoll_ctl, "epoll_ctl", DESC, {FD, VAL, FD, inStruct(EPOLL_EVENT_BYTES)}),
    forward(__NR_tgkill, "tgkill", SIGNAL | PROC, {VAL, VAL, VAL}, KILL),
    forward(__NR_utimes, "utimes", FILE, {PATH, inStruct(TIMEVAL_PAIR_BYTES)}),
    deny(__NR_kexec_load, "kexec_load", OTHER, EPERM, HOST_ADMIN),
    forward(__NR_waitid, "waitid", PROC,
            {VAL, VAL, outStruct(SIGINFO_BYTES), VAL, outStruct(RUSAGE_BYTES)}),
    forward(__NR_inotify_init, "inotify_init", DESC, {}),
    forward(__NR_inotify_add_watch, "inotify_add_watch", DESC | FILE, {FD, PATH, VAL}),
    forward(__NR_inotify_rm_watch, "inotify_rm_watch", DESC, {FD, VAL}),
    opensJobShm(forward(__NR_openat, "openat", DESC | FILE, {FD, PATH, VAL, VAL}, OPEN)),
    forward(__NR_mkdirat, "mkdirat", DESC | FILE, {FD, PATH, VAL}),
    forward(__NR_mknodat, "mknodat", DESC | FILE, {FD, PATH, VAL, VAL}),
    forward(__NR_fchownat, "fchownat", DESC | FILE, {FD, PATH, VAL, VAL, VAL}),
    forward(__NR_futimesat, "futimesat", DESC | FILE, {FD, PATH, inStruct(TIMEVAL_PAIR_BYTES)}),
    jobShmOnNode(forward(__NR_newfstatat, "newfstatat", DESC | FILE,
                         {FD, PATH, outStruct(STAT_BYTES), VAL})),
    jobShmOnNode(forward(__NR_unlinkat, "unlinkat", DESC | FILE, {FD, PATH, VAL})),
    jobShmOnNode(forward(__NR_renameat, "renameat", DESC | FILE, {FD, PATH, FD, PATH})),
    jobShmOnNode(forward(__NR_linkat, "linkat", DESC | FILE, {FD, PATH, FD, PATH, VAL})),
    forward(__NR_symlinkat, "symlinkat", DESC | FILE, {STRING, FD, PATH}),
    seenFromHome(HomeView::EXE_LINK,
                 forward(__NR_readlinkat, "readlinkat", DESC | FILE, {FD, PATH, outBuf(3), VAL})),
    jobShmOnNode(forward(__NR_fchmodat, "fchmodat", DESC | FILE, {FD, PATH, VAL})),
    jobShmOnNode(forward(__NR_faccessat, "faccessat", DESC | FILE, {FD, PATH, VAL})),
    noRestartAfterHandler(
        seenFromHome(HomeView::SELECT, forward(__NR_pselect6, "pselect6", DESC,
                                               {VAL, inoutBits(0), inoutBits(0), inoutBits(0),
                                                inoutStruct(TIMESPEC_BYTES), SIGMASK_PAIR},
                                               PSELECT))),
    noRestartAfterHandler(seenFromHome(
        HomeView::POLL,
        forward(__NR_ppoll, "ppoll", DESC,
                {inoutArray(1, POLLFD_BYTES), VAL, inoutStruct(TIMESPEC_BYTES), sigMask(4), VAL}))),
    deny(__NR_unshare, "unshare", PROC, EPERM, NAMESPACES),
    local(__NR_set_robust_list, "set_robust_list", PROC | MEMORY),
    local(__NR_get_robust_list, "get_robust_list", PROC | MEMORY),
    forward(__NR_splice, "splice", DESC | IPC,
            {FD, inoutStruct(LOFF_BYTES), FD, inoutStruct(LOFF_BYTES), VAL, VAL}),
    forward(__NR_tee, "tee", DESC | IPC, {FD, FD, VAL, VAL}),
    forward(__NR_sync_file_range, "sync_file_range", DESC, {FD, VAL, VAL, VAL}),
    deny(__NR_vmsplice, "vmsplice", DESC | MEMORY, ENOSYS,
         "it moves guest pages into a pipe that lives at home"),
    forward(__NR_utimensat, "utimensat", DESC | FILE,
            {FD, PATH_OR_NULL, inStruct(TIMESPEC_PAIR_BYTES), VAL}),
    noRestartAfterHandler(forward(__NR_epoll_pwait, "epoll_pwait", DESC,
                                  {FD, outArray(2, EPOLL_EVENT_BYTES), VAL, VAL, sigMask(5), VAL})),
    deny(__NR_signalfd, "signalfd", DESC | SIGNAL, ENOSYS, SIGNALFD),
    forward(__NR_timerfd_create, "timerfd_create", DESC | TIME, {VAL, VAL}),
    forward(__NR_eventfd, "eventfd", DESC | IPC, {VAL}),
    forward(__NR_fallocate, "fallocate", DESC, {FD, VAL, VAL, VAL}),
    forward(__NR_timerfd_settime, "timerfd_settime", DESC | TIME,
            {FD, VAL, inStruct(ITIMERSPEC_BYTES), outStruct(ITIMERSPEC_BYTES)}),
    forward(__NR_timerfd_gettime, "timerfd_gettime", DESC | TIME,
            {FD, outStruct(ITIMERSPEC_BYTES)}),
    forward(__NR_accept4, "accept4", NETWORK | DESC, {FD, outBufLenptr(2), SOCKLEN_PTR, VAL}),
    deny(__NR_signalfd4, "signalfd4", DESC | SIGNAL, ENOSYS, SIGNALFD),
    forward(__NR_eventfd2, "eventfd2", DESC | IPC, {VAL, VAL}),
    forward(__NR_epoll_create1, "epoll_create1", DESC, {VAL}),
    notInterruptible(dupsNodeFd(forward(__NR_dup3, "dup3", DESC, {FD, NEW_FD, VAL}))),
    notInterruptible(forward(__NR_pipe2, "pipe2", DESC | IPC, {outStruct(FD_PAIR_BYTES), VAL})),
    forward(__NR_inotify_init1, "inotify_init1", DESC, {VAL}),
    forward(__NR_preadv, "preadv", DESC, {FD, HANDLED, VAL, VAL, VAL}, IOV),
    forward(__NR_pwritev, "pwritev", DESC, {FD, HANDLED, VAL, VAL, VAL}, IOV),
    forward(__NR_rt_tgsigqueueinfo, "rt_tgsigqueueinfo", SIGNAL | PROC,
            {VAL, VAL, VAL, inStruct(SIGINFO_BYTES)}, KILL),
    deny(__NR_perf_event_open, "perf_event_open", OTHER, ENOSYS,
         "performance counters of the remote node are not the job's"),
    deny(__NR_recvmmsg, "recvmmsg", NETWORK | DESC, ENOSYS, MMSG),
    forward(__NR_prlimit64, "prlimit64", PROC,
            {VAL, VAL, inStruct(RLIMIT_BYTES), outStruct(RLIMIT_BYTES)}),
    deny(__NR_clock_adjtime, "clock_adjtime", TIME, EPERM, CLOCK_SET),
    forward(__NR_syncfs, "syncfs", DESC, {FD}),
    deny(__NR_sendmmsg, "sendmmsg", NETWORK | DESC, ENOSYS, MMSG),
    deny(__NR_setns, "setns", PROC, EPERM, NAMESPACES),
    local(__NR_getcpu, "getcpu", PROC),
    deny(__NR_process_vm_readv, "process_vm_readv", PROC | MEMORY, EPERM, OTHER_MEMORY),
    deny(__NR_process_vm_writev, "process_vm_writev", PROC | MEMORY, EPERM, OTHER_MEMORY),
    deny(__NR_finit_module, "finit_module", OTHER, EPERM, HOST_ADMIN),
    jobShmOnNode(forward(__NR_renameat2, "renameat2", DESC | FILE, {FD, PATH, FD, PATH, VAL})),
    deny(__NR_seccomp, "seccomp", PROC, EPERM,
         "the guest's seccomp chain already holds the sandbox's listener"),
    local(__NR_getrandom, "getrandom", OTHER),
    // Created on the node, its number held at home by a memfd of the same name (which is also
    // what the supervisor's /proc/self snapshots are, remote/sys_proc.cc).
    forward(__NR_memfd_create, "memfd_create", DESC | MEMORY, {STRING, VAL}, MEMFD),
    deny(__NR_kexec_file_load, "kexec_file_load", OTHER, EPERM, HOST_ADMIN),
    deny(__NR_bpf, "bpf", OTHER, EPERM, "BPF programs would run in the remote node's kernel"),
    forward(__NR_execveat, "execveat", PROC | FILE | DESC, {FD, PATH, HANDLED, HANDLED, VAL}, EXEC),
    deny(__NR_userfaultfd, "userfaultfd", DESC | MEMORY, ENOSYS,
         "page faults of a guest are handled by the remote kernel"),
    local(__NR_membarrier, "membarrier", MEMORY),
    forward(__NR_copy_file_range, "copy_file_range", DESC,
            {FD, inoutStruct(LOFF_BYTES), FD, inoutStruct(LOFF_BYTES), VAL, VAL}),
    forward(__NR_preadv2, "preadv2", DESC, {FD, HANDLED, VAL, VAL, VAL, VAL}, IOV),
    forward(__NR_pwritev2, "pwritev2", DESC, {FD, HANDLED, VAL, VAL, VAL, VAL}, IOV),
    jobShmOnNode(
        forward(__NR_statx, "statx", DESC | FILE, {FD, PATH, VAL, VAL, outStruct(STATX_BYTES)})),
    local(__NR_rseq, "rseq", PROC | MEMORY),
    deny(__NR_io_uring_setup, "io_uring_setup", DESC, ENOSYS, IO_URING),
    deny(__NR_io_uring_enter, "io_uring_enter", DESC, ENOSYS, IO_URING),
    deny(__NR_io_uring_register, "io_uring_register", DESC, ENOSYS, IO_URING),
    deny(__NR_open_tree, "open_tree", FILE, EPERM, MOUNTS),
    deny(__NR_move_mount, "move_mount", FILE, EPERM, MOUNTS),
    deny(__NR_fsopen, "fsopen", FILE, EPERM, MOUNTS),
    deny(__NR_fsconfig, "fsconfig", FILE, EPERM, MOUNTS),
    deny(__NR_fsmount, "fsmount", FILE, EPERM, MOUNTS),
    deny(__NR_fspick, "fspick", FILE, EPERM, MOUNTS),
    forward(__NR_pidfd_open, "pidfd_open", PROC | DESC, {VAL, VAL}),
    deny(__NR_clone3, "clone3", PROC, ENOSYS, FORK_LATER),
    notInterruptible(closesNodeFd(seenFromHome(
        HomeView::CLOSE_RANGE, forward(__NR_close_range, "close_range", DESC, {VAL, VAL, VAL})))),
    opensJobShm(forward(__NR_openat2, "openat2", DESC | FILE, {FD, PATH, inBuf(3), VAL}, OPEN)),
    deny(__NR_pidfd_getfd, "pidfd_getfd", PROC | DESC, EPERM,
         "it would take a descriptor from another process's home fd table"),
    jobShmOnNode(forward(__NR_faccessat2, "faccessat2", DESC | FILE, {FD, PATH, VAL, VAL})),
    noRestartAfterHandler(forward(
        __NR_epoll_pwait2, "epoll_pwait2", DESC,
        {FD, outArray(2, EPOLL_EVENT_BYTES), VAL, inStruct(TIMESPEC_BYTES), sigMask(5), VAL})),
    deny(__NR_mount_setattr, "mount_setattr", FILE, EPERM, MOUNTS),
    deny(__NR_memfd_secret, "memfd_secret", DESC | MEMORY, ENOSYS,
         "its descriptor would live at home but its mappings on the remote node"),
    local(__NR_futex_waitv, "futex_waitv", IPC | MEMORY),
};

// ---- The conformance programs (tests/syscalls/<program>.cc) and the rows each one checks; the
// `test` column is derived from this list. A program checks a row when it makes that syscall
// and checks its outcome, natively and under mosrun on a remote node; each row is named once, by
// the program that is about it (several programs read, write and close).

struct Conformance {
  const char* program;
  int nrs[24];
  size_t count;
};

constexpr Conformance checks(const char* program, std::initializer_list<int> nrs) {
  Conformance c{program, {}, 0};
  for (int nr : nrs) {
    c.nrs[c.count++] = nr;
  }
  return c;
}

constexpr Conformance CONFORMANCE[] = {
    checks("dirents", {__NR_chdir, __NR_fchdir, __NR_getcwd, __NR_getdents64, __NR_link,
                       __NR_linkat, __NR_mkdir, __NR_mkdirat, __NR_rename, __NR_renameat,
                       __NR_renameat2, __NR_rmdir, __NR_symlinkat, __NR_unlink, __NR_unlinkat}),
    checks("dup_fcntl", {__NR_close_range, __NR_dup, __NR_dup2, __NR_dup3, __NR_fcntl, __NR_flock}),
    checks("exec",
           {__NR_arch_prctl, __NR_execve, __NR_exit_group, __NR_rseq, __NR_set_robust_list}),
    checks("file_io", {__NR_close, __NR_copy_file_range, __NR_creat, __NR_fallocate, __NR_fdatasync,
                       __NR_fsync, __NR_ftruncate, __NR_lseek, __NR_openat, __NR_pread64,
                       __NR_preadv, __NR_pwrite64, __NR_read, __NR_readv, __NR_sendfile, __NR_umask,
                       __NR_write, __NR_writev}),
    checks("fork_clone", {__NR_clone, __NR_vfork}),
    checks("fork_groups", {__NR_setpgid, __NR_setsid}),
    checks("fork_pipe", {__NR_pipe}),
    checks("fork_wait", {__NR_wait4, __NR_waitid}),
    checks("identity",
           {__NR_futex,     __NR_getegid,  __NR_geteuid,  __NR_getgid,    __NR_getgroups,
            __NR_getpgid,   __NR_getpgrp,  __NR_getpid,   __NR_getppid,   __NR_getresgid,
            __NR_getresuid, __NR_getsid,   __NR_gettid,   __NR_getuid,    __NR_set_tid_address,
            __NR_setfsgid,  __NR_setfsuid, __NR_setregid, __NR_setresgid, __NR_setresuid,
            __NR_setreuid}),
    checks("kernel_ids", {__NR_tgkill}),
    checks("misc", {__NR_fgetxattr, __NR_flistxattr, __NR_fremovexattr, __NR_fsetxattr,
                    __NR_getrandom, __NR_getxattr, __NR_inotify_add_watch, __NR_inotify_init1,
                    __NR_inotify_rm_watch, __NR_listxattr, __NR_prctl, __NR_removexattr,
                    __NR_sched_getaffinity, __NR_sched_yield, __NR_setxattr}),
    checks("mmap_file", {__NR_brk, __NR_madvise, __NR_mincore, __NR_mmap, __NR_mprotect,
                         __NR_mremap, __NR_msync, __NR_munmap}),
    checks("pipe_poll",
           {__NR_epoll_create1, __NR_epoll_ctl, __NR_epoll_pwait, __NR_epoll_wait, __NR_eventfd2,
            __NR_pipe2, __NR_poll, __NR_ppoll, __NR_pselect6, __NR_splice, __NR_tee,
            __NR_timerfd_create, __NR_timerfd_gettime, __NR_timerfd_settime}),
    checks("proc_self", {__NR_openat2, __NR_readlink}),
    checks("rlimit_uname",
           {__NR_getpriority, __NR_prlimit64, __NR_setpriority, __NR_sysinfo, __NR_uname}),
    checks("signals", {__NR_alarm, __NR_kill, __NR_pause, __NR_rt_sigaction, __NR_rt_sigpending,
                       __NR_rt_sigprocmask, __NR_rt_sigreturn, __NR_rt_sigsuspend,
                       __NR_rt_sigtimedwait, __NR_sigaltstack}),
    checks("socket", {__NR_accept, __NR_accept4, __NR_bind, __NR_connect, __NR_getpeername,
                      __NR_getsockname, __NR_getsockopt, __NR_listen, __NR_recvfrom, __NR_sendto,
                      __NR_setsockopt, __NR_shutdown, __NR_socket}),
    checks("sockmsg", {__NR_recvmsg, __NR_sendmsg, __NR_socketpair}),
    checks("stat", {__NR_access, __NR_chmod, __NR_faccessat2, __NR_fchmod, __NR_fchmodat,
                    __NR_fstatfs, __NR_newfstatat, __NR_readlinkat, __NR_statfs, __NR_statx,
                    __NR_symlink, __NR_truncate, __NR_utimensat}),
    checks("time", {__NR_clock_getres, __NR_clock_gettime, __NR_clock_nanosleep, __NR_getitimer,
                    __NR_getrusage, __NR_gettimeofday, __NR_setitimer, __NR_time, __NR_times}),
    checks("tty_ioctl", {__NR_ioctl}),
    checks("nonblocking_eintr", {__NR_getdents}),
    // Process families (issue 6), tests/syscalls/tree.h: most of the calls they check are named
    // above, by the program about each.
    checks("clone_settid", {__NR_exit}),
    checks("kill_procs", {__NR_rt_sigqueueinfo}),
    checks("pgrp_session", {__NR_fork}),
    checks("pipe_family", {__NR_select}),
    checks("restart_read", {__NR_nanosleep}),
    checks("shared_mem", {__NR_memfd_create, __NR_semctl, __NR_semget, __NR_semop, __NR_semtimedop,
                          __NR_shmat, __NR_shmctl, __NR_shmdt, __NR_shmget}),
    checks("threads", {__NR_clone3}),
    checks("vfork_exec", {__NR_execveat}),
    checks("wait_status", {__NR_pidfd_open}),
};

constexpr size_t rowIndex(int nr) {
  for (size_t i = 0; i < std::size(ROWS); i++) {
    if (ROWS[i].nr == nr) {
      return i;
    }
  }
  return std::size(ROWS);
}

// Every row the list names exists, and is named once.
constexpr bool conformanceNamesRowsOnce() {
  bool named[std::size(ROWS)] = {};
  for (const Conformance& c : CONFORMANCE) {
    for (size_t k = 0; k < c.count; k++) {
      size_t i = rowIndex(c.nrs[k]);
      if (i == std::size(ROWS) || named[i]) {
        return false;
      }
      named[i] = true;
    }
  }
  return true;
}
static_assert(conformanceNamesRowsOnce(),
              "CONFORMANCE names a syscall without a row, or one row twice");

constexpr std::array<SyscallEntry, std::size(ROWS)> withConformance() {
  std::array<SyscallEntry, std::size(ROWS)> rows{};
  for (size_t i = 0; i < std::size(ROWS); i++) {
    rows[i] = ROWS[i];
  }
  for (const Conformance& c : CONFORMANCE) {
    for (size_t k = 0; k < c.count; k++) {
      rows[rowIndex(c.nrs[k])].test = c.program;
    }
  }
  return rows;
}

constexpr std::array<SyscallEntry, std::size(ROWS)> SYSCALLS = withConformance();

// ---- Compile-time checks (sandbox2's policy builder, gVisor's linux64_test.go).

constexpr bool isSortedAndUnique(std::span<const SyscallEntry> rows) {
  for (size_t i = 1; i < rows.size(); ++i) {
    if (rows[i - 1].nr >= rows[i].nr) {
      return false;
    }
  }
  return true;
}

constexpr bool isBufferKind(ArgKind k) {
  return k == ArgKind::IN_BUF || k == ArgKind::OUT_BUF || k == ArgKind::INOUT_ARRAY ||
         k == ArgKind::OUT_ARRAY || k == ArgKind::INOUT_BITS || k == ArgKind::OUT_BUF_LENPTR ||
         k == ArgKind::SIGMASK;
}

constexpr bool isStructKind(ArgKind k) {
  return k == ArgKind::IN_STRUCT || k == ArgKind::OUT_STRUCT || k == ArgKind::INOUT_STRUCT ||
         k == ArgKind::INOUT_ARRAY || k == ArgKind::OUT_ARRAY;
}

// Every sized kind names a length argument of the right kind and every struct kind a size.
constexpr bool argsAreWellFormed(const SyscallEntry& e) {
  for (const ArgSpec& a : e.args) {
    if (isBufferKind(a.kind)) {
      if (a.lenArg >= 6) {
        return false;
      }
      const ArgSpec& len = e.args[a.lenArg];
      if (a.kind == ArgKind::OUT_BUF_LENPTR) {
        if (len.kind != ArgKind::INOUT_STRUCT || len.size != INT_BYTES) {
          return false;
        }
      } else if (len.kind != ArgKind::VAL) {
        return false;
      }
    }
    if (isStructKind(a.kind) && a.size == 0) {
      return false;
    }
  }
  return true;
}

constexpr bool takesPath(const SyscallEntry& e) {
  for (const ArgSpec& a : e.args) {
    if (a.kind == ArgKind::PATH || a.kind == ArgKind::PATH_OR_NULL) {
      return true;
    }
  }
  return false;
}

// open, openat, openat2: the path, then the flags as a value or an open_how in-buffer.
constexpr bool opensAPath(const SyscallEntry& e) {
  for (int i = 0; i < 5; i++) {
    if (e.args[i].kind == ArgKind::PATH) {
      return e.args[i + 1].kind == ArgKind::VAL || e.args[i + 1].kind == ArgKind::IN_BUF;
    }
  }
  return false;
}

// readlink, readlinkat: the PATH, then the OUT_BUF the link's content goes to.
constexpr bool linksToABuffer(const SyscallEntry& e) {
  for (int i = 0; i < 5; i++) {
    if (e.args[i].kind == ArgKind::PATH) {
      return e.args[i + 1].kind == ArgKind::OUT_BUF;
    }
  }
  return false;
}

constexpr bool rowHasWhatItsRouteNeeds(const SyscallEntry& e) {
  if (e.name == nullptr || e.name[0] == '\0' || e.nr < 0) {
    return false;
  }
  if (!argsAreWellFormed(e)) {
    return false;
  }
  // What the deputy executes follows from the route and handler; only a DENY row may be a
  // helper the supervisor sends home. Only forwarded calls can be interrupted at home.
  if (e.atHome != atHomeOf(e.route, e.handler) &&
      !(e.route == Route::DENY && e.atHome == AtHome::HELPER)) {
    return false;
  }
  if (e.restart != ERESTARTSYS && !(e.restart == ERESTARTNOHAND && e.route == Route::FORWARD) &&
      !(e.restart == NEVER_INTERRUPTED && e.route == Route::FORWARD && e.atHome == AtHome::ARGS)) {
    return false;
  }
  if (e.handler == HandlerId::OPEN && !opensAPath(e)) {
    return false;
  }
  if (e.view != HomeView::NONE && e.atHome != AtHome::ARGS && e.atHome != AtHome::MSGHDR) {
    return false;
  }
  if (e.view == HomeView::EXE_LINK && !linksToABuffer(e)) {
    return false;
  }
  // Node-local objects: the job's /dev/shm paths are run on the node only by regular forwarded
  // rows with a path; its opens are the OPEN rows; descriptors are closed and duplicated at home.
  switch (e.onNode) {
    case OnNode::SHM_PATH:
      if (!takesPath(e) || e.route != Route::FORWARD || e.handler != HandlerId::NONE) {
        return false;
      }
      break;
    case OnNode::SHM_OPEN:
      if (e.handler != HandlerId::OPEN) {
        return false;
      }
      break;
    case OnNode::CLOSE:
    case OnNode::DUP:
      if (e.route != Route::FORWARD) {
        return false;
      }
      break;
    case OnNode::KERNEL:
      if (takesPath(e) || e.handler == HandlerId::EXEC) {
        return false;
      }
      break;
    case OnNode::RELATIVE_REFUSED:
    case OnNode::NONE: break;
  }
  if (e.handler == HandlerId::OPEN && e.onNode != OnNode::SHM_OPEN) {
    return false;
  }
  switch (e.route) {
    case Route::LOCAL:
      // Local calls never see the home node, so none may take a path; the only conditional
      // local rows are mmap and rt_sigaction.
      return e.err == 0 && e.why == nullptr && !takesPath(e) &&
             (e.handler == HandlerId::NONE || (e.handler == HandlerId::MMAP && e.nr == __NR_mmap) ||
              (e.handler == HandlerId::SIGACTION && e.nr == __NR_rt_sigaction));
    case Route::EMULATE: return e.err == 0 && e.why == nullptr && e.handler != HandlerId::NONE;
    case Route::FORWARD:
      return e.err == 0 && e.why == nullptr && e.handler != HandlerId::MMAP &&
             e.handler != HandlerId::IDS;
    case Route::DENY:
      return e.err > 0 && e.why != nullptr && e.why[0] != '\0' && e.handler == HandlerId::NONE;
  }
  return false;
}

constexpr bool everyRowHasWhatItsRouteNeeds(std::span<const SyscallEntry> rows) {
  for (const SyscallEntry& e : rows) {
    if (!rowHasWhatItsRouteNeeds(e)) {
      return false;
    }
  }
  return true;
}

static_assert(isSortedAndUnique(SYSCALLS), "SYSCALLS must be sorted by nr, without duplicates");
static_assert(everyRowHasWhatItsRouteNeeds(SYSCALLS),
              "a SYSCALLS row lacks what its route needs (see rowHasWhatItsRouteNeeds)");

}  // namespace

std::span<const SyscallEntry> syscallTable() { return SYSCALLS; }

std::span<const char* const> conformancePrograms() {
  static const std::vector<const char*> programs = [] {
    std::vector<const char*> out;
    for (const Conformance& c : CONFORMANCE) {
      out.push_back(c.program);
    }
    std::sort(out.begin(), out.end(),
              [](const char* a, const char* b) { return std::string_view(a) < b; });
    return out;
  }();
  return programs;
}

const SyscallEntry* findSyscall(int nr) {
  auto it = std::lower_bound(std::begin(SYSCALLS), std::end(SYSCALLS), nr,
                             [](const SyscallEntry& e, int n) { return e.nr < n; });
  if (it == std::end(SYSCALLS) || it->nr != nr) {
    return nullptr;
  }
  return &*it;
}

bool takesSignalMask(int nr) {
  const SyscallEntry* e = findSyscall(nr);
  return e != nullptr && std::any_of(std::begin(e->args), std::end(e->args),
                                     [](const ArgSpec& a) { return isSignalMaskKind(a.kind); });
}

const char* routeName(Route route) {
  switch (route) {
    case Route::LOCAL: return "LOCAL";
    case Route::FORWARD: return "FORWARD";
    case Route::EMULATE: return "EMULATE";
    case Route::DENY: return "DENY";
  }
  return "?";
}

const char* argKindName(ArgKind kind) {
  switch (kind) {
    case ArgKind::NONE: return "NONE";
    case ArgKind::VAL: return "VAL";
    case ArgKind::FD: return "FD";
    case ArgKind::NEW_FD: return "NEW_FD";
    case ArgKind::PATH: return "PATH";
    case ArgKind::PATH_OR_NULL: return "PATH_OR_NULL";
    case ArgKind::STRING: return "STRING";
    case ArgKind::IN_BUF: return "IN_BUF";
    case ArgKind::OUT_BUF: return "OUT_BUF";
    case ArgKind::IN_STRUCT: return "IN_STRUCT";
    case ArgKind::OUT_STRUCT: return "OUT_STRUCT";
    case ArgKind::INOUT_STRUCT: return "INOUT_STRUCT";
    case ArgKind::INOUT_ARRAY: return "INOUT_ARRAY";
    case ArgKind::INOUT_BITS: return "INOUT_BITS";
    case ArgKind::OUT_BUF_LENPTR: return "OUT_BUF_LENPTR";
    case ArgKind::SIGMASK: return "SIGMASK";
    case ArgKind::SIGMASK_PAIR: return "SIGMASK_PAIR";
    case ArgKind::OUT_ARRAY: return "OUT_ARRAY";
  }
  return "?";
}

const char* handlerName(HandlerId handler) {
  switch (handler) {
    case HandlerId::NONE: return "NONE";
    case HandlerId::IDS: return "IDS";
    case HandlerId::MMAP: return "MMAP";
    case HandlerId::EXEC: return "EXEC";
    case HandlerId::FORK: return "FORK";
    case HandlerId::IOV: return "IOV";
    case HandlerId::KILL: return "KILL";
    case HandlerId::SET_TID_ADDRESS: return "SET_TID_ADDRESS";
    case HandlerId::IOCTL: return "IOCTL";
    case HandlerId::FCNTL: return "FCNTL";
    case HandlerId::PSELECT: return "PSELECT";
    case HandlerId::SOCKMSG: return "SOCKMSG";
    case HandlerId::OPEN: return "OPEN";
    case HandlerId::SAME_IDS: return "SAME_IDS";
    case HandlerId::SIGACTION: return "SIGACTION";
    case HandlerId::MEMFD: return "MEMFD";
  }
  return "?";
}

const char* homeViewName(HomeView view) {
  switch (view) {
    case HomeView::NONE: return "NONE";
    case HomeView::CLOSE_RANGE: return "CLOSE_RANGE";
    case HomeView::POLL: return "POLL";
    case HomeView::SELECT: return "SELECT";
    case HomeView::SCM_RIGHTS: return "SCM_RIGHTS";
    case HomeView::FD_LISTING: return "FD_LISTING";
    case HomeView::EXE_LINK: return "EXE_LINK";
  }
  return "?";
}

const char* onNodeName(OnNode onNode) {
  switch (onNode) {
    case OnNode::NONE: return "NONE";
    case OnNode::KERNEL: return "KERNEL";
    case OnNode::RELATIVE_REFUSED: return "RELATIVE_REFUSED";
    case OnNode::CLOSE: return "CLOSE";
    case OnNode::DUP: return "DUP";
    case OnNode::SHM_PATH: return "SHM_PATH";
    case OnNode::SHM_OPEN: return "SHM_OPEN";
  }
  return "?";
}

const char* atHomeName(AtHome atHome) {
  switch (atHome) {
    case AtHome::NEVER: return "NEVER";
    case AtHome::ARGS: return "ARGS";
    case AtHome::MSGHDR: return "MSGHDR";
    case AtHome::HELPER: return "HELPER";
  }
  return "?";
}

int restartCode(int nr) {
  const SyscallEntry* e = findSyscall(nr);
  return e != nullptr ? e->restart : ERESTARTSYS;
}

bool neverInterrupted(int nr) { return restartCode(nr) == NEVER_INTERRUPTED; }

bool eintrWhenWoken(int nr) {
  const SyscallEntry* e = findSyscall(nr);
  return e != nullptr && e->eintrWhenWoken;
}

}  // namespace mos
