// Invariants of the syscall table (gVisor's linux64_test.go, sandbox2's policy checks): the rows
// that the seccomp filter, the dispatch and the docs are derived from.

#include "syscall_table.h"

#include <asm/unistd.h>
#include <errno.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <map>
#include <set>
#include <string>

using namespace mos;

namespace {

const SyscallEntry& row(const char* name) {
  for (const SyscallEntry& e : syscallTable()) {
    if (std::string(e.name) == name) {
      return e;
    }
  }
  FAIL("no row named " << name);
  return syscallTable()[0];
}

bool takesPath(const SyscallEntry& e) {
  for (const ArgSpec& a : e.args) {
    if (a.kind == ArgKind::PATH || a.kind == ArgKind::PATH_OR_NULL) {
      return true;
    }
  }
  return false;
}

}  // namespace

TEST_CASE("the table is sorted by nr without duplicates and findSyscall finds every row",
          "[runtime][syscalls]") {
  auto table = syscallTable();
  REQUIRE(table.size() > 200);
  std::set<std::string> names;
  for (size_t i = 0; i < table.size(); ++i) {
    if (i > 0) {
      CHECK(table[i - 1].nr < table[i].nr);
    }
    CHECK(names.insert(table[i].name).second);
    CHECK(findSyscall(table[i].nr) == &table[i]);
  }
  CHECK(findSyscall(-1) == nullptr);
  CHECK(findSyscall(335) == nullptr);  // a hole between rseq (334) and pidfd_send_signal (424)
  CHECK(findSyscall(0x40000000 | __NR_read) == nullptr);  // x32
  CHECK(findSyscall(__NR_read)->nr == 0);
  CHECK(std::string(findSyscall(__NR_openat)->name) == "openat");
}

TEST_CASE("every sized argument of a row names a valid length argument", "[runtime][syscalls]") {
  for (const SyscallEntry& e : syscallTable()) {
    INFO(e.name);
    for (const ArgSpec& a : e.args) {
      switch (a.kind) {
        case ArgKind::IN_BUF:
        case ArgKind::OUT_BUF:
        case ArgKind::INOUT_ARRAY:
        case ArgKind::OUT_ARRAY:
        case ArgKind::INOUT_BITS:
          REQUIRE(a.lenArg < 6);
          CHECK(e.args[a.lenArg].kind == ArgKind::VAL);
          break;
        case ArgKind::OUT_BUF_LENPTR:
          REQUIRE(a.lenArg < 6);
          CHECK(e.args[a.lenArg].kind == ArgKind::INOUT_STRUCT);
          CHECK(e.args[a.lenArg].size == 4);
          break;
        default: break;
      }
      if (a.kind == ArgKind::IN_STRUCT || a.kind == ArgKind::OUT_STRUCT ||
          a.kind == ArgKind::INOUT_STRUCT || a.kind == ArgKind::INOUT_ARRAY ||
          a.kind == ArgKind::OUT_ARRAY) {
        CHECK(a.size > 0);
      }
    }
  }
}

TEST_CASE("each route's rows carry what the route needs", "[runtime][syscalls]") {
  for (const SyscallEntry& e : syscallTable()) {
    INFO(e.name << " " << routeName(e.route));
    switch (e.route) {
      case Route::DENY:
        CHECK(e.err > 0);
        REQUIRE(e.why != nullptr);
        CHECK(std::string(e.why).size() > 10);
        CHECK(e.handler == HandlerId::NONE);
        break;
      case Route::EMULATE:
        CHECK(e.handler != HandlerId::NONE);
        CHECK(e.err == 0);
        break;
      case Route::LOCAL:
        CHECK(!takesPath(e));
        CHECK((e.handler == HandlerId::NONE || e.nr == __NR_mmap || e.nr == __NR_rt_sigaction));
        break;
      case Route::FORWARD:
        CHECK(e.err == 0);
        CHECK(e.why == nullptr);
        break;
    }
  }
}

TEST_CASE("no call that takes a path or a descriptor runs locally", "[runtime][syscalls]") {
  for (const char* name :
       {"open",     "openat",     "stat",       "lstat",  "newfstatat", "statx",  "execve",
        "execveat", "chdir",      "readlink",   "unlink", "mkdir",      "rename", "access",
        "truncate", "statfs",     "getxattr",   "read",   "write",      "close",  "fstat",
        "ioctl",    "fcntl",      "getdents64", "socket", "connect",    "dup",    "pipe2",
        "poll",     "epoll_wait", "getcwd",     "kill",   "getppid",    "uname"}) {
    INFO(name);
    CHECK(row(name).route == Route::FORWARD);
  }
}

TEST_CASE("the calls glibc programs need have the route design decision 4 gives them",
          "[runtime][syscalls]") {
  for (const char* name : {"brk",
                           "mmap",
                           "munmap",
                           "mprotect",
                           "mremap",
                           "madvise",
                           "msync",
                           "mincore",
                           "futex",
                           "set_robust_list",
                           "get_robust_list",
                           "rseq",
                           "arch_prctl",
                           "rt_sigaction",
                           "rt_sigprocmask",
                           "rt_sigreturn",
                           "rt_sigpending",
                           "rt_sigsuspend",
                           "rt_sigtimedwait",
                           "sigaltstack",
                           "pause",
                           "nanosleep",
                           "clock_nanosleep",
                           "clock_gettime",
                           "clock_getres",
                           "gettimeofday",
                           "time",
                           "getrandom",
                           "sched_yield",
                           "sched_getaffinity",
                           "getcpu",
                           "getrusage",
                           "times",
                           "exit",
                           "exit_group",
                           "restart_syscall",
                           "prctl",
                           "alarm",
                           "getitimer",
                           "setitimer",
                           "membarrier"}) {
    INFO(name);
    CHECK(row(name).route == Route::LOCAL);
  }
  for (const char* name : {"getpid", "gettid", "getuid", "geteuid", "getgid", "getegid"}) {
    INFO(name);
    CHECK(row(name).route == Route::EMULATE);
    CHECK(row(name).handler == HandlerId::IDS);
  }
  CHECK(row("set_tid_address").handler == HandlerId::SET_TID_ADDRESS);
  CHECK(row("mmap").handler == HandlerId::MMAP);
  for (const char* name : {"execve", "execveat"}) {
    CHECK(row(name).handler == HandlerId::EXEC);
  }
  for (const char* name : {"readv", "writev", "preadv", "pwritev", "preadv2", "pwritev2"}) {
    CHECK(row(name).handler == HandlerId::IOV);
  }
  for (const char* name : {"kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"}) {
    CHECK(row(name).handler == HandlerId::KILL);
  }
  CHECK(row("ioctl").handler == HandlerId::IOCTL);
  CHECK(row("fcntl").handler == HandlerId::FCNTL);
  CHECK(row("pselect6").handler == HandlerId::PSELECT);
  CHECK(row("sendmsg").handler == HandlerId::SOCKMSG);
  CHECK(row("recvmsg").handler == HandlerId::SOCKMSG);
  for (const char* name : {"open", "openat", "openat2"}) {
    INFO(name);
    CHECK(row(name).route == Route::FORWARD);
    CHECK(row(name).handler == HandlerId::OPEN);
  }
  for (const char* name : {"read",
                           "write",
                           "pread64",
                           "pwrite64",
                           "close",
                           "close_range",
                           "creat",
                           "lseek",
                           "dup",
                           "dup2",
                           "dup3",
                           "fstat",
                           "stat",
                           "lstat",
                           "newfstatat",
                           "statx",
                           "statfs",
                           "fstatfs",
                           "getdents64",
                           "readlink",
                           "readlinkat",
                           "access",
                           "faccessat",
                           "faccessat2",
                           "mkdir",
                           "mkdirat",
                           "rmdir",
                           "unlink",
                           "unlinkat",
                           "rename",
                           "renameat",
                           "renameat2",
                           "link",
                           "linkat",
                           "symlink",
                           "symlinkat",
                           "chmod",
                           "fchmod",
                           "fchmodat",
                           "chown",
                           "fchown",
                           "lchown",
                           "fchownat",
                           "utimensat",
                           "utimes",
                           "truncate",
                           "ftruncate",
                           "fsync",
                           "fdatasync",
                           "fallocate",
                           "fadvise64",
                           "sync_file_range",
                           "flock",
                           "getcwd",
                           "chdir",
                           "fchdir",
                           "umask",
                           "pipe",
                           "pipe2",
                           "poll",
                           "ppoll",
                           "select",
                           "getppid",
                           "getpgrp",
                           "getpgid",
                           "setpgid",
                           "getsid",
                           "setsid",
                           "getgroups",
                           "uname",
                           "sysinfo",
                           "prlimit64",
                           "getrlimit",
                           "setrlimit",
                           "getpriority",
                           "setpriority",
                           "wait4",
                           "waitid",
                           "socket",
                           "connect",
                           "bind",
                           "listen",
                           "accept",
                           "accept4",
                           "sendto",
                           "recvfrom",
                           "shutdown",
                           "getsockname",
                           "getpeername",
                           "setsockopt",
                           "getsockopt",
                           "socketpair",
                           "getxattr",
                           "lgetxattr",
                           "fgetxattr",
                           "listxattr",
                           "llistxattr",
                           "flistxattr",
                           "sendfile",
                           "copy_file_range",
                           "splice",
                           "eventfd2",
                           "timerfd_create",
                           "timerfd_settime",
                           "timerfd_gettime",
                           "epoll_create1",
                           "epoll_ctl",
                           "epoll_wait",
                           "epoll_pwait",
                           "inotify_init1",
                           "inotify_add_watch"}) {
    INFO(name);
    CHECK(row(name).route == Route::FORWARD);
    CHECK(row(name).handler == HandlerId::NONE);
  }
  for (const char* name : {"fork", "vfork", "clone"}) {
    INFO(name);  // mirrored (docs/design.md, "Fork mirroring")
    CHECK(row(name).route == Route::FORWARD);
    CHECK(row(name).handler == HandlerId::FORK);
  }
  for (const char* name : {"clone3", "io_uring_setup", "io_uring_enter", "io_uring_register",
                           "sendmmsg", "recvmmsg"}) {
    INFO(name);
    CHECK(row(name).route == Route::DENY);
    CHECK(row(name).err == ENOSYS);
  }
  for (const char* name : {"ptrace", "bpf", "process_vm_readv", "process_vm_writev", "kexec_load",
                           "mount", "umount2", "pidfd_getfd", "seccomp", "setgroups"}) {
    INFO(name);
    CHECK(row(name).route == Route::DENY);
    CHECK(row(name).err == EPERM);
  }
  // Credential calls succeed only when they change nothing (the supervisor checks the ids).
  for (const char* name : {"setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
                           "setfsuid", "setfsgid"}) {
    INFO(name);
    CHECK(row(name).route == Route::EMULATE);
    CHECK(row(name).handler == HandlerId::SAME_IDS);
  }
  CHECK(row("userfaultfd").route == Route::DENY);
  CHECK(row("perf_event_open").route == Route::DENY);
}

TEST_CASE("structure sizes follow the x86-64 kernel ABI", "[runtime][syscalls]") {
  CHECK(row("fstat").args[1].size == 144);
  CHECK(row("newfstatat").args[2].size == sizeof(struct stat));
  CHECK(row("statx").args[4].size == 256);
  CHECK(row("statfs").args[1].size == 120);
  CHECK(row("uname").args[0].size == 390);
  CHECK(row("sysinfo").args[0].size == 112);
  CHECK(row("getrlimit").args[1].size == 16);
  CHECK(row("wait4").args[3].size == 144);
  CHECK(row("waitid").args[2].size == 128);
  CHECK(row("utimensat").args[2].size == 32);
  CHECK(row("epoll_wait").args[1].size == 12);
  CHECK(row("poll").args[0].size == 8);
  CHECK(row("read").args[1].kind == ArgKind::OUT_BUF);
  CHECK(row("read").args[1].lenArg == 2);
  CHECK(row("getsockname").args[1].kind == ArgKind::OUT_BUF_LENPTR);
}

TEST_CASE("what the deputy executes follows from the route and the handler",
          "[runtime][syscalls]") {
  for (const SyscallEntry& e : syscallTable()) {
    INFO(e.name);
    if (e.route != Route::FORWARD) {
      CHECK(e.atHome == AtHome::NEVER);
    } else if (e.handler == HandlerId::IOV || e.handler == HandlerId::EXEC ||
               e.handler == HandlerId::FORK) {
      CHECK(e.atHome == AtHome::NEVER);  // read/write, an ExecRequest or a ForkRequest
    } else if (e.handler == HandlerId::SOCKMSG) {
      CHECK(e.atHome == AtHome::MSGHDR);
    } else {
      CHECK(e.atHome == AtHome::ARGS);
    }
  }
  // What the deputy used to refuse by a list of its own: every one is NEVER now.
  for (const char* name : {"fork",
                           "vfork",
                           "clone",
                           "clone3",
                           "execve",
                           "execveat",
                           "exit",
                           "exit_group",
                           "rt_sigreturn",
                           "rt_sigaction",
                           "rt_sigprocmask",
                           "sigaltstack",
                           "set_tid_address",
                           "set_robust_list",
                           "rseq",
                           "arch_prctl",
                           "modify_ldt",
                           "mmap",
                           "munmap",
                           "mprotect",
                           "mremap",
                           "brk",
                           "madvise",
                           "shmat",
                           "shmdt",
                           "seccomp",
                           "ptrace",
                           "prctl"}) {
    INFO(name);
    CHECK(row(name).atHome == AtHome::NEVER);
  }
  // memfd_create makes a node-local memfd and its placeholder at home (a memfd of the same name,
  // also the supervisor's /proc/self snapshots): the deputy runs it with its kinds.
  CHECK(row("memfd_create").route == Route::FORWARD);
  CHECK(row("memfd_create").handler == HandlerId::MEMFD);
  CHECK(row("memfd_create").atHome == AtHome::ARGS);
  CHECK(row("memfd_create").args[0].kind == ArgKind::STRING);
  CHECK(row("memfd_create").args[1].kind == ArgKind::VAL);
}

TEST_CASE("System V IPC runs in the job's IPC namespace on the node", "[runtime][syscalls]") {
  for (const char* name : {"shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop",
                           "semctl", "msgget", "msgsnd", "msgrcv", "msgctl"}) {
    INFO(name);
    CHECK(row(name).route == Route::LOCAL);
  }
}

TEST_CASE("node-local descriptors and /dev/shm paths are columns of the table",
          "[runtime][syscalls]") {
  for (const char* name : {"open", "openat", "openat2"}) {
    INFO(name);
    CHECK(row(name).onNode == OnNode::SHM_OPEN);
  }
  for (const char* name : {"stat", "lstat", "newfstatat", "statx", "access", "faccessat",
                           "faccessat2", "unlink", "unlinkat", "link", "linkat", "rename",
                           "renameat", "renameat2", "truncate", "chmod", "fchmodat", "statfs"}) {
    INFO(name);
    CHECK(row(name).onNode == OnNode::SHM_PATH);
  }
  CHECK(row("close").onNode == OnNode::CLOSE);
  CHECK(row("close_range").onNode == OnNode::CLOSE);
  for (const char* name : {"dup", "dup2", "dup3", "fcntl"}) {
    INFO(name);
    CHECK(row(name).onNode == OnNode::DUP);
  }
  // The rest follows from the kinds: a descriptor without a path runs in the guest's kernel.
  for (const char* name :
       {"read", "write", "pread64", "ftruncate", "fstat", "lseek", "readv", "fallocate", "mmap"}) {
    INFO(name);
    CHECK(row(name).onNode == OnNode::KERNEL);
  }
  CHECK(row("mkdirat").onNode == OnNode::RELATIVE_REFUSED);
  CHECK(row("getpid").onNode == OnNode::NONE);
}

TEST_CASE("descriptor arguments are columns: FD must be open, NEW_FD is assigned",
          "[runtime][syscalls]") {
  // The executor's former fd-first list (close, dup, dup2, dup3, fcntl, ioctl).
  for (const char* name : {"close", "dup", "dup2", "dup3", "fcntl", "ioctl"}) {
    INFO(name);
    CHECK(row(name).args[0].kind == ArgKind::FD);
  }
  CHECK(row("dup2").args[1].kind == ArgKind::NEW_FD);
  CHECK(row("dup3").args[1].kind == ArgKind::NEW_FD);
  CHECK_FALSE(isPointerKind(ArgKind::NEW_FD));
  for (const SyscallEntry& e : syscallTable()) {
    for (const ArgSpec& a : e.args) {
      if (a.kind == ArgKind::NEW_FD) {
        INFO(e.name);
        CHECK((e.nr == __NR_dup2 || e.nr == __NR_dup3));
      }
    }
  }
}

TEST_CASE("restart codes are a column: ERESTARTNOHAND for the poll, select and epoll_wait family",
          "[runtime][syscalls]") {
  std::set<std::string> noHand, never;
  for (const SyscallEntry& e : syscallTable()) {
    if (e.restart == ERESTARTNOHAND) {
      noHand.insert(e.name);
    } else if (e.restart == NEVER_INTERRUPTED) {
      never.insert(e.name);
    } else {
      INFO(e.name);
      CHECK(e.restart == ERESTARTSYS);
    }
  }
  CHECK(noHand == std::set<std::string>{"poll", "ppoll", "select", "pselect6", "epoll_wait",
                                        "epoll_pwait", "epoll_pwait2"});
  // Calls that never block: no signal cuts them short (a close undone by SIGCHLD leaked a
  // pipeline's write end at home).
  CHECK(never ==
        std::set<std::string>{"close", "close_range", "dup", "dup2", "dup3", "pipe", "pipe2"});
  CHECK(neverInterrupted(__NR_close));
  CHECK(!neverInterrupted(__NR_read));
  CHECK(restartCode(__NR_read) == ERESTARTSYS);
  CHECK(restartCode(100000) == ERESTARTSYS);
}

TEST_CASE("the deputy's views around its own descriptors are a column", "[runtime][syscalls]") {
  std::map<std::string, HomeView> views;
  for (const SyscallEntry& e : syscallTable()) {
    if (e.view != HomeView::NONE) {
      views[e.name] = e.view;
    }
  }
  CHECK(views == std::map<std::string, HomeView>{{"close_range", HomeView::CLOSE_RANGE},
                                                 {"poll", HomeView::POLL},
                                                 {"ppoll", HomeView::POLL},
                                                 {"select", HomeView::SELECT},
                                                 {"pselect6", HomeView::SELECT},
                                                 {"sendmsg", HomeView::SCM_RIGHTS},
                                                 {"getdents64", HomeView::FD_LISTING},
                                                 {"readlink", HomeView::EXE_LINK},
                                                 {"readlinkat", HomeView::EXE_LINK}});
  // Symlink targets and xattr names are strings, not paths the deputy looks up.
  CHECK(row("symlink").args[0].kind == ArgKind::STRING);
  CHECK(row("symlinkat").args[0].kind == ArgKind::STRING);
  CHECK(row("setxattr").args[1].kind == ArgKind::STRING);
  CHECK(isPointerKind(ArgKind::STRING));
}

TEST_CASE("every conformance program the table names checks at least one row",
          "[runtime][syscalls]") {
  std::map<std::string, int> rows;
  for (const SyscallEntry& e : syscallTable()) {
    if (e.test != nullptr) {
      rows[e.test]++;
    }
  }
  auto programs = conformancePrograms();
  REQUIRE(programs.size() == rows.size());
  for (const char* p : programs) {
    INFO(p);
    CHECK(rows[p] > 0);
  }
  CHECK(std::string(row("openat2").test) == "proc_self");
  CHECK(std::string(row("sendmsg").test) == "sockmsg");
}
