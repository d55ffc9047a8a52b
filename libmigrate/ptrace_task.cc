#include "ptrace_task.h"

#include <elf.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <kj/debug.h>

namespace mos::migrate {

int waitTask(pid_t pid, int flags) {
  int status = 0;
  for (;;) {
    pid_t r = ::waitpid(pid, &status, __WALL | flags);
    if (r > 0) {
      return status;
    }
    if (r == 0) {
      return -1;
    }
    if (errno != EINTR) {
      KJ_FAIL_SYSCALL("waitpid", errno, pid);
    }
  }
}

std::string describeStatus(int status) {
  if (WIFEXITED(status)) {
    return "exited " + std::to_string(WEXITSTATUS(status));
  }
  if (WIFSIGNALED(status)) {
    return std::string("killed by ") + (sigabbrev_np(WTERMSIG(status)) ?: "?");
  }
  if (WIFSTOPPED(status)) {
    if (int event = ptraceEvent(status)) {
      return "event " + std::to_string(event) + " (signal " + std::to_string(WSTOPSIG(status)) +
             ")";
    }
    if (isSyscallStop(status)) {
      return "syscall stop";
    }
    return std::string("stopped by SIG") + (sigabbrev_np(WSTOPSIG(status)) ?: "?");
  }
  return "status " + std::to_string(status);
}

PtraceTask::PtraceTask(pid_t pid) : pid_(pid) {}

user_regs_struct PtraceTask::getRegs() const {
  user_regs_struct regs{};
  iovec iov{&regs, sizeof(regs)};
  KJ_SYSCALL(::ptrace(PTRACE_GETREGSET, pid_, NT_PRSTATUS, &iov), pid_);
  KJ_REQUIRE(iov.iov_len == sizeof(regs), "not a 64-bit task", iov.iov_len);
  return regs;
}

void PtraceTask::setRegs(const user_regs_struct& regs) {
  user_regs_struct copy = regs;
  iovec iov{&copy, sizeof(copy)};
  KJ_SYSCALL(::ptrace(PTRACE_SETREGSET, pid_, NT_PRSTATUS, &iov), pid_);
}

std::vector<uint8_t> PtraceTask::getXstate() const {
  std::vector<uint8_t> buf(64 * 1024);
  iovec iov{buf.data(), buf.size()};
  KJ_SYSCALL(::ptrace(PTRACE_GETREGSET, pid_, NT_X86_XSTATE, &iov), pid_);
  buf.resize(iov.iov_len);
  return buf;
}

void PtraceTask::setXstate(std::span<const uint8_t> xstate) {
  std::vector<uint8_t> copy(xstate.begin(), xstate.end());
  iovec iov{copy.data(), copy.size()};
  KJ_SYSCALL(::ptrace(PTRACE_SETREGSET, pid_, NT_X86_XSTATE, &iov), pid_, copy.size());
}

uint64_t PtraceTask::getSigmask() const {
  uint64_t mask = 0;
  KJ_SYSCALL(::ptrace(PTRACE_GETSIGMASK, pid_, sizeof(mask), &mask), pid_);
  return mask;
}

void PtraceTask::setSigmask(uint64_t mask) {
  KJ_SYSCALL(::ptrace(PTRACE_SETSIGMASK, pid_, sizeof(mask), &mask), pid_);
}

int PtraceTask::memFd() {
  if (mem_.get() < 0) {
    std::string path = "/proc/" + std::to_string(pid_) + "/mem";
    int fd;
    KJ_SYSCALL(fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC), path);
    mem_ = kj::AutoCloseFd(fd);
  }
  return mem_.get();
}

void PtraceTask::readMem(RemotePtr<uint8_t> addr, std::span<uint8_t> out) {
  int fd = memFd();
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n;
    KJ_SYSCALL(n = ::pread(fd, out.data() + done, out.size() - done, addr.addr() + done), pid_,
               addr.addr() + done);
    KJ_REQUIRE(n > 0, "short read of task memory", pid_, addr.addr() + done);
    done += n;
  }
}

void PtraceTask::writeMem(RemotePtr<uint8_t> addr, std::span<const uint8_t> in) {
  int fd = memFd();
  size_t done = 0;
  while (done < in.size()) {
    ssize_t n;
    KJ_SYSCALL(n = ::pwrite(fd, in.data() + done, in.size() - done, addr.addr() + done), pid_,
               addr.addr() + done);
    KJ_REQUIRE(n > 0, "short write of task memory", pid_, addr.addr() + done);
    done += n;
  }
}

size_t PtraceTask::readMemFast(RemotePtr<uint8_t> addr, std::span<uint8_t> out) {
  iovec local{out.data(), out.size()};
  iovec remote{reinterpret_cast<void*>(addr.addr()), out.size()};
  ssize_t n = ::process_vm_readv(pid_, &local, 1, &remote, 1, 0);
  return n < 0 ? 0 : static_cast<size_t>(n);
}

size_t PtraceTask::writeMemFast(RemotePtr<uint8_t> addr, std::span<const uint8_t> in) {
  iovec local{const_cast<uint8_t*>(in.data()), in.size()};
  iovec remote{reinterpret_cast<void*>(addr.addr()), in.size()};
  ssize_t n = ::process_vm_writev(pid_, &local, 1, &remote, 1, 0);
  return n < 0 ? 0 : static_cast<size_t>(n);
}

RemotePtr<char> PtraceTask::writeString(RemotePtr<char> addr, const std::string& s) {
  writeMem(addr.cast<uint8_t>(),
           std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.c_str()), s.size() + 1));
  return addr + (s.size() + 1);
}

RemotePtr<uint8_t> PtraceTask::findSyscallInstruction(uint64_t start, uint64_t end) {
  std::vector<uint8_t> code(end - start);
  readMem(RemotePtr<uint8_t>(start), code);
  for (size_t i = 0; i + 1 < code.size(); ++i) {
    if (code[i] == 0x0f && code[i + 1] == 0x05) {
      return RemotePtr<uint8_t>(start + i);
    }
  }
  return RemotePtr<uint8_t>();
}

int PtraceTask::waitSyscallStop(bool entry) {
  for (;;) {
    int status;
    if (!entry && whileInSyscall_) {
      // The injected call may be blocked in a seccomp notification that only our callback can
      // answer: alternate between it and a non-blocking wait.
      status = waitTask(pid_, WNOHANG);
      if (status == -1) {
        whileInSyscall_();
        status = waitTask(pid_, WNOHANG);
        if (status == -1) {
          ::poll(nullptr, 0, 1);
          continue;
        }
      }
    } else {
      status = waitTask(pid_);
    }
    int event = ptraceEvent(status);
    if (event == PTRACE_EVENT_CLONE || event == PTRACE_EVENT_FORK || event == PTRACE_EVENT_VFORK) {
      // An injected clone3 with PTRACE_O_TRACECLONE set: on to its exit stop.
      unsigned long child = 0;
      if (::ptrace(PTRACE_GETEVENTMSG, pid_, 0, &child) == 0) {
        lastChild_ = static_cast<pid_t>(child);
      }
      KJ_SYSCALL(::ptrace(PTRACE_SYSCALL, pid_, 0, 0), pid_);
      continue;
    }
    KJ_REQUIRE(isSyscallStop(status), "injected syscall: unexpected stop", pid_,
               describeStatus(status));
    return status;
  }
}

long PtraceTask::syscall(long nr, std::initializer_list<uint64_t> args) {
  KJ_REQUIRE(!syscallInsn_.isNull(), "no syscall instruction known in the task");
  KJ_REQUIRE(args.size() <= 6);
  ++injected_;
  user_regs_struct regs = getRegs();
  uint64_t a[6] = {};
  size_t i = 0;
  for (uint64_t v : args) {
    a[i++] = v;
  }
  regs.rax = nr;
  regs.orig_rax = static_cast<uint64_t>(-1);  // no syscall-restart logic on the way out
  regs.rip = syscallInsn_.addr();
  regs.rdi = a[0];
  regs.rsi = a[1];
  regs.rdx = a[2];
  regs.r10 = a[3];
  regs.r8 = a[4];
  regs.r9 = a[5];
  setRegs(regs);

  KJ_SYSCALL(::ptrace(PTRACE_SYSCALL, pid_, 0, 0), pid_);
  waitSyscallStop(true);
  __ptrace_syscall_info info{};
  KJ_SYSCALL(::ptrace(PTRACE_GET_SYSCALL_INFO, pid_, sizeof(info), &info), pid_);
  KJ_REQUIRE(info.op == PTRACE_SYSCALL_INFO_ENTRY && static_cast<long>(info.entry.nr) == nr,
             "injected syscall: not at its entry stop", pid_, info.op, nr);
  KJ_SYSCALL(::ptrace(PTRACE_SYSCALL, pid_, 0, 0), pid_);
  waitSyscallStop(false);
  KJ_SYSCALL(::ptrace(PTRACE_GET_SYSCALL_INFO, pid_, sizeof(info), &info), pid_);
  KJ_REQUIRE(info.op == PTRACE_SYSCALL_INFO_EXIT, "injected syscall: not at its exit stop", pid_,
             info.op, nr);
  return static_cast<long>(info.exit.rval);
}

uint64_t PtraceTask::syscallOrThrow(const char* what, long nr,
                                    std::initializer_list<uint64_t> args) {
  long r = syscall(nr, args);
  if (r < 0 && r > -4096) {
    KJ_FAIL_REQUIRE("injected syscall failed", what, strerror(static_cast<int>(-r)), pid_);
  }
  return static_cast<uint64_t>(r);
}

}  // namespace mos::migrate
