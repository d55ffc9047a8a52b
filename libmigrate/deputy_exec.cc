// execDeputy(): a running job process, captured and still stopped, becomes its own deputy
// (design decision 1, checkpoint.h). Everything is done by syscall injection at the vDSO's
// `syscall` instruction, with every signal blocked, arguments in one scratch mapping that the
// successful execve discards.
#include <dirent.h>
#include <fcntl.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>

#include <kj/debug.h>

#include "checkpoint.h"
#include "image_internal.h"
#include "proc_maps.h"
#include "ptrace_task.h"

namespace mos::migrate {

namespace {

constexpr uint64_t PAGE = 4096;

uint64_t roundUp(uint64_t v) { return (v + PAGE - 1) & ~(PAGE - 1); }

// The address of a `syscall` instruction in the vDSO of process `pid` (traced by `task`), where
// injected calls run (rr's way: never the process's own code). Throws kj::Exception (FAILED)
// when the process has no vDSO or its vDSO has no such instruction.
RemotePtr<uint8_t> vdsoSyscallInstruction(PtraceTask& task, pid_t pid) {
  VdsoLayout vdso = vdsoLayout(readMaps(pid));
  KJ_REQUIRE(vdso.present(), "the process has no vDSO");
  RemotePtr<uint8_t> insn =
      task.findSyscallInstruction(vdso.vdsoStart, vdso.vdsoStart + vdso.vdsoSize);
  KJ_REQUIRE(!insn.isNull(), "no syscall instruction in the vDSO");
  return insn;
}

// Runs one injected call in `pid` at its vDSO's `syscall` instruction with every signal blocked,
// and puts registers and mask back. Returns the call's result (-errno on failure).
long injectOne(pid_t pid, long nr, std::initializer_list<uint64_t> args) {
  PtraceTask task(pid);
  const user_regs_struct savedRegs = task.getRegs();
  const uint64_t savedMask = task.getSigmask();
  task.setSyscallInstruction(vdsoSyscallInstruction(task, pid));
  task.setSigmask(~0ull);
  KJ_DEFER({
    task.setRegs(savedRegs);
    task.setSigmask(savedMask);
  });
  return task.syscall(nr, args);
}

}  // namespace

InjectedSocket injectSocket(pid_t pid, int domain, int type) {
  long fd = injectOne(pid, __NR_socket, {uint64_t(domain), uint64_t(type), 0});
  KJ_REQUIRE(fd >= 0, kj::str("socket(2) in the process failed: ", strerror(int(-fd))));
  KJ_ON_SCOPE_FAILURE(closeInjectedFd(pid, int(fd)));
  InjectedSocket out;
  out.local = takeFd(pid, int(fd));
  out.remoteFd = int(fd);
  return out;
}

void closeInjectedFd(pid_t pid, int fd) {
  try {
    injectOne(pid, __NR_close, {uint64_t(fd)});
  } catch (kj::Exception&) {
  }
}

std::vector<int> execDeputy(pid_t pid, proto::ImageHeader::Reader header, const DeputyExec& exec) {
  PtraceTask task(pid);
  const user_regs_struct savedRegs = task.getRegs();
  const uint64_t savedMask = task.getSigmask();
  RemotePtr<uint8_t> insn = vdsoSyscallInstruction(task, pid);
  task.setSyscallInstruction(insn);
  task.setSigmask(~0ull);

  // Scratch: page 0 for small values, then the execve strings and pointer arrays.
  size_t stringBytes = exec.path.size() + 1;
  for (auto& a : exec.argv) {
    stringBytes += a.size() + 1;
  }
  for (auto& e : exec.env) {
    stringBytes += e.size() + 1;
  }
  size_t pointerBytes = (exec.argv.size() + exec.env.size() + 2) * 8;
  uint64_t scratchSize = PAGE + roundUp(pointerBytes) + roundUp(stringBytes);
  KJ_REQUIRE(scratchSize < (uint64_t{1} << 24), "deputy arguments too long");
  uint64_t scratch =
      task.syscallOrThrow("mmap(scratch)", __NR_mmap,
                          {0, scratchSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                           static_cast<uint64_t>(-1), 0});

  // Interval timers survive execve: the guest gets them from the image, so P's stop here.
  itimerval timers[3] = {};
  for (int which = 0; which < 3; ++which) {
    task.syscallOrThrow("getitimer", __NR_getitimer, {uint64_t(which), scratch});
    task.readMem(RemotePtr<uint8_t>(scratch),
                 std::span<uint8_t>(reinterpret_cast<uint8_t*>(&timers[which]), sizeof(itimerval)));
  }
  itimerval zero{};
  task.writeValue(RemotePtr<itimerval>(scratch), zero);
  for (int which = 0; which < 3; ++which) {
    task.syscallOrThrow("setitimer", __NR_setitimer, {uint64_t(which), scratch, 0});
  }

  // Pending signals survive execve too, and the image holds them: take them off the queues.
  std::vector<siginfo_t> drained;
  {
    uint64_t all = ~0ull;
    timespec now{0, 0};
    task.writeValue(RemotePtr<uint64_t>(scratch), all);
    task.writeValue(RemotePtr<timespec>(scratch + 16), now);
    for (int guard = 0; guard < 100000; ++guard) {
      long r = task.syscall(__NR_rt_sigtimedwait, {scratch, scratch + 64, scratch + 16, 8});
      if (r <= 0) {
        break;  // -EAGAIN: nothing left
      }
      siginfo_t si;
      task.readMem(RemotePtr<uint8_t>(scratch + 64),
                   std::span<uint8_t>(reinterpret_cast<uint8_t*>(&si), sizeof(si)));
      drained.push_back(si);
    }
  }

  // Close-on-exec descriptors must outlive the exec; the deputy sets the flags again.
  std::vector<int> cleared;
  for (auto f : header.getFiles()) {
    if (f.getCloseOnExec()) {
      if (task.syscall(__NR_fcntl, {uint64_t(f.getFd()), F_SETFD, 0}) == 0) {
        cleared.push_back(f.getFd());
      }
    }
  }

  uint64_t pointers = scratch + PAGE;
  RemotePtr<char> strings(pointers + roundUp(pointerBytes));
  RemotePtr<char> path = strings;
  strings = task.writeString(strings, exec.path);
  std::vector<uint64_t> table;
  for (auto& a : exec.argv) {
    table.push_back(strings.addr());
    strings = task.writeString(strings, a);
  }
  table.push_back(0);
  size_t envAt = table.size();
  for (auto& e : exec.env) {
    table.push_back(strings.addr());
    strings = task.writeString(strings, e);
  }
  table.push_back(0);
  task.writeMem(
      RemotePtr<uint8_t>(pointers),
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(table.data()), table.size() * 8));
  long r = task.syscall(__NR_execve, {path.addr(), pointers, pointers + envAt * 8});
  if (r == 0) {
    // The process is the deputy now, at its first instruction. Signals that arrived after the
    // capture are not in the image: the caller sends them again, and the deputy forwards them.
    std::map<int, int> inImage;
    for (auto p : header.getPending()) {
      siginfo_t si;
      memcpy(&si, p.getSiginfo().begin(), kj::min(sizeof(si), p.getSiginfo().size()));
      inImage[si.si_signo]++;
    }
    for (auto t : header.getThreads()) {
      for (auto p : t.getPending()) {
        siginfo_t si;
        memcpy(&si, p.getSiginfo().begin(), kj::min(sizeof(si), p.getSiginfo().size()));
        inImage[si.si_signo]++;
      }
    }
    std::vector<int> extra;
    for (auto& si : drained) {
      if (inImage[si.si_signo] > 0) {
        inImage[si.si_signo]--;
      } else {
        extra.push_back(si.si_signo);
      }
    }
    return extra;
  }

  // The exec failed: the process gets back everything it had, and runs on at home.
  for (int fd : cleared) {
    task.syscall(__NR_fcntl, {uint64_t(fd), F_SETFD, FD_CLOEXEC});
  }
  for (int which = 0; which < 3; ++which) {
    task.writeValue(RemotePtr<itimerval>(scratch), timers[which]);
    task.syscall(__NR_setitimer, {uint64_t(which), scratch, 0});
  }
  for (auto& si : drained) {
    task.writeValue(RemotePtr<siginfo_t>(scratch), si);
    task.syscall(__NR_rt_sigqueueinfo, {uint64_t(pid), uint64_t(si.si_signo), scratch});
  }
  task.syscall(__NR_munmap, {scratch, scratchSize});
  task.setRegs(savedRegs);
  task.setSigmask(savedMask);
  KJ_FAIL_REQUIRE(kj::str("execve(", exec.path.c_str(),
                          ") of the deputy failed: ", strerror(static_cast<int>(-r))));
}

std::string threadIdsRefusal(pid_t pid, int threads) {
  std::string status;
  if (FILE* f = fopen(("/proc/" + std::to_string(pid) + "/status").c_str(), "re")) {
    char line[512];
    while (fgets(line, sizeof(line), f) != nullptr) {
      if (strncmp(line, "CapEff:", 7) == 0) {
        status = line + 7;
      }
    }
    fclose(f);
  }
  uint64_t effective = strtoull(status.c_str(), nullptr, 16);
  constexpr int CAP_SYS_ADMIN_BIT = 21, CAP_CHECKPOINT_RESTORE_BIT = 40;  // linux/capability.h
  if ((effective >> CAP_SYS_ADMIN_BIT & 1) || (effective >> CAP_CHECKPOINT_RESTORE_BIT & 1)) {
    return "";
  }
  return "it has " + std::to_string(threads) +
         " threads, and giving each its thread id back at home needs CAP_SYS_ADMIN or "
         "CAP_CHECKPOINT_RESTORE, which the job's process does not have";
}

void endOtherThreads(pid_t pid) {
  PtraceTask leader(pid);
  RemotePtr<uint8_t> insn = vdsoSyscallInstruction(leader, pid);
  std::vector<pid_t> tids;
  std::string dir = "/proc/" + std::to_string(pid) + "/task";
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      pid_t tid = static_cast<pid_t>(atoi(e->d_name));
      if (e->d_name[0] != '.' && tid != pid) {
        tids.push_back(tid);
      }
    }
    ::closedir(d);
  }
  for (pid_t tid : tids) {
    PtraceTask t(tid);
    t.setSyscallInstruction(insn);
    t.setSigmask(~0ull);
    // Its exit must not touch the job's memory, which the image holds (and a shared mapping
    // another process sees): no robust-list walk, no clear-child-tid write and wake.
    constexpr uint64_t ROBUST_LIST_HEAD_SIZE = 24;  // sizeof(struct robust_list_head)
    t.syscall(__NR_set_robust_list, {0, ROBUST_LIST_HEAD_SIZE});
    t.syscall(__NR_set_tid_address, {0});
    user_regs_struct regs = t.getRegs();
    regs.rax = __NR_exit;
    regs.orig_rax = static_cast<uint64_t>(-1);
    regs.rip = insn.addr();
    regs.rdi = 0;
    t.setRegs(regs);
    KJ_SYSCALL(::ptrace(PTRACE_CONT, tid, 0, 0), tid);
    for (;;) {
      int status = waitTask(tid);
      if (WIFEXITED(status) || WIFSIGNALED(status)) {
        break;
      }
      KJ_SYSCALL(::ptrace(PTRACE_CONT, tid, 0, 0), tid);
    }
  }
}

}  // namespace mos::migrate
