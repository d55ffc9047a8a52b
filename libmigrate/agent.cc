// Agent: the home side of the first migration (design decision 1). The agent is a grandchild of
// the caller (double fork: never a child the job could wait for) in its own session (terminal
// signals are the job's, not the agent's). It PTRACE_SEIZEs the caller, lets it run (signals are
// re-injected, group stops kept with PTRACE_LISTEN) until PTRACE_EVENT_EXEC, captures the new
// program there, writes the image, and injects execve(deputy) into the same process. Success is
// a second PTRACE_EVENT_EXEC; failure is the syscall-exit stop with -errno, after which the agent
// injects exit_group(125).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include <capnp/message.h>
#include <kj/debug.h>

#include "checkpoint.h"
#include "proc_maps.h"
#include "migrate.h"
#include "ptrace_task.h"

namespace mos::migrate {

namespace {

constexpr int EXEC_FAILED_STATUS = 125;

struct ReadyMessage {
  int error;  // 0, or the errno of PTRACE_SEIZE
  pid_t agent;
};

void closeAllExcept(std::vector<int> keep) {
  std::sort(keep.begin(), keep.end());
  unsigned next = 3;
  for (int fd : keep) {
    if (fd >= static_cast<int>(next)) {
      if (static_cast<unsigned>(fd) > next) {
        ::syscall(SYS_close_range, next, static_cast<unsigned>(fd) - 1, 0);
      }
      next = fd + 1;
    }
  }
  ::syscall(SYS_close_range, next, ~0u, 0);
}

bool isGroupStopSignal(int sig) {
  return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

// Resumes `pid` from a stop that is not ours to handle: signal-delivery stops get their signal
// back, group stops stay stopped (PTRACE_LISTEN). Returns the signal that a stop suppressed when
// `suppress` is set (injection phases), else 0.
int passStop(pid_t pid, int status, __ptrace_request resume, bool suppress) {
  int sig = WSTOPSIG(status);
  if (ptraceEvent(status) == PTRACE_EVENT_STOP) {
    if (isGroupStopSignal(sig) && !suppress) {
      ::ptrace(PTRACE_LISTEN, pid, 0, 0);
    } else {
      ::ptrace(resume, pid, 0, 0);
    }
    return 0;
  }
  if (ptraceEvent(status) != 0) {
    ::ptrace(resume, pid, 0, 0);
    return 0;
  }
  if (suppress) {
    ::ptrace(resume, pid, 0, 0);
    return sig;
  }
  ::ptrace(resume, pid, 0, sig);
  return 0;
}

// The argv of `pid` (/proc/PID/cmdline split at NULs), empty if unreadable.
std::vector<std::string> cmdlineOf(pid_t pid) {
  std::vector<std::string> argv;
  std::string text;
  try {
    text = readProcFile("/proc/" + std::to_string(pid) + "/cmdline");
  } catch (kj::Exception&) {
    return argv;
  }
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\0', start);
    if (end == std::string::npos) {
      end = text.size();
    }
    argv.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return argv;
}

// Writes the migration stream of `pid` to `path` (mode 0600, replaced if it exists).
void writeStreamFile(pid_t pid, const std::string& path) {
  int fd;
  KJ_SYSCALL(fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600), path);
  kj::AutoCloseFd owner(fd);
  kj::FdOutputStream out(fd);
  kj::BufferedOutputStreamWrapper buffered(out);
  captureImage(pid, buffered);
  buffered.flush();
}

// At the PTRACE_EVENT_EXEC stop of the job's program: capture, write, turn into the deputy.
[[noreturn]] void migrateAtExec(pid_t pid, const AgentConfig& config) {
  std::vector<std::string> jobArgv;  // the program's own argv, shown by ps for the deputy
  std::vector<int> pending;  // signals that arrived during the injection, delivered after it
  try {
    // The program's own execve has not returned yet: step to its syscall-exit stop, where its
    // registers are those its first instruction sees (rax 0), and capture it there.
    KJ_SYSCALL(::ptrace(PTRACE_SYSCALL, pid, 0, 0));
    for (;;) {
      int status = waitTask(pid);
      KJ_REQUIRE(WIFSTOPPED(status), "job process ended", describeStatus(status));
      if (isSyscallStop(status)) {
        break;
      }
      if (int sig = passStop(pid, status, PTRACE_SYSCALL, true)) {
        pending.push_back(sig);
      }
    }
    jobArgv = cmdlineOf(pid);
    writeStreamFile(pid, config.imagePath);
  } catch (kj::Exception& e) {
    fprintf(stderr, "mos-agent: cannot migrate pid %d, it runs at home: %s\n", pid,
            e.getDescription().cStr());
    ::unlink(config.imagePath.c_str());
    ::ptrace(PTRACE_DETACH, pid, 0, 0);
    for (int sig : pending) {
      ::kill(pid, sig);
    }
    ::_exit(1);
  }

  try {
    PtraceTask task(pid);
    user_regs_struct regs = task.getRegs();
    // Strings and pointer arrays go below rsp: the image is captured, this memory is ours.
    // The deputy's own arguments travel in its environment (UMOSIX_DEPUTY_ARGS, one per line),
    // so that its argv, which ps and /proc/PID/cmdline show at home, stays the job's own.
    std::vector<std::string> deputyArgs = config.deputyArgv;
    if (deputyArgs.empty()) {
      deputyArgs.push_back(config.deputyPath);
    }
    deputyArgs.push_back("--image");
    deputyArgs.push_back(config.imagePath);
    std::string env = "UMOSIX_DEPUTY_ARGS=";
    for (size_t i = 1; i < deputyArgs.size(); i++) {
      env += deputyArgs[i];
      env += '\n';
    }
    std::vector<std::string> args = jobArgv.empty() ? deputyArgs : jobArgv;
    std::vector<std::string> envs = {env};
    size_t bytes = config.deputyPath.size() + 1;
    for (auto& a : args) {
      bytes += a.size() + 1;
    }
    for (auto& e : envs) {
      bytes += e.size() + 1;
    }
    size_t pointers = (args.size() + envs.size() + 2) * 8;
    KJ_REQUIRE(bytes + pointers < 120000, "deputy arguments too long");
    uint64_t base = (regs.rsp - 4096 - bytes - pointers) & ~15ull;
    RemotePtr<char> strings(base + pointers);
    RemotePtr<char> path = strings;
    strings = task.writeString(strings, config.deputyPath);
    std::vector<uint64_t> argvPtrs;
    for (auto& a : args) {
      argvPtrs.push_back(strings.addr());
      strings = task.writeString(strings, a);
    }
    argvPtrs.push_back(0);  // argv terminator
    size_t envpIndex = argvPtrs.size();
    for (auto& e : envs) {
      argvPtrs.push_back(strings.addr());
      strings = task.writeString(strings, e);
    }
    argvPtrs.push_back(0);  // envp terminator
    task.writeMem(RemotePtr<uint8_t>(base),
                  std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(argvPtrs.data()),
                                           argvPtrs.size() * 8));
    uint64_t argvAt = base, envpAt = base + envpIndex * 8;

    // `syscall` at rip (the new program's entry, never to run now).
    errno = 0;
    long word = ::ptrace(PTRACE_PEEKTEXT, pid, regs.rip, 0);
    KJ_REQUIRE(errno == 0, "PTRACE_PEEKTEXT", strerror(errno));
    word = (word & ~0xffffl) | 0x050f;
    KJ_SYSCALL(::ptrace(PTRACE_POKETEXT, pid, regs.rip, word));
    uint64_t insn = regs.rip;

    regs.rax = __NR_execve;
    regs.orig_rax = static_cast<uint64_t>(-1);
    regs.rdi = path.addr();
    regs.rsi = argvAt;
    regs.rdx = envpAt;
    task.setRegs(regs);
    KJ_SYSCALL(::ptrace(PTRACE_SYSCALL, pid, 0, 0));
    bool entered = false;
    for (;;) {
      int status = waitTask(pid);
      KJ_REQUIRE(WIFSTOPPED(status), "job process ended", describeStatus(status));
      if (ptraceEvent(status) == PTRACE_EVENT_EXEC) {
        ::ptrace(PTRACE_DETACH, pid, 0, 0);
        for (int sig : pending) {
          ::kill(pid, sig);
        }
        ::_exit(0);
      }
      if (isSyscallStop(status) && !entered) {
        entered = true;
        KJ_SYSCALL(::ptrace(PTRACE_SYSCALL, pid, 0, 0));
        continue;
      }
      if (isSyscallStop(status)) {
        long rval = static_cast<long>(task.getRegs().rax);
        fprintf(stderr,
                "mos-agent: execve(%s) of the deputy failed in pid %d: %s; "
                "the process exits with status %d\n",
                config.deputyPath.c_str(), pid, strerror(static_cast<int>(-rval)),
                EXEC_FAILED_STATUS);
        ::unlink(config.imagePath.c_str());
        user_regs_struct r = task.getRegs();
        r.rax = __NR_exit_group;
        r.orig_rax = static_cast<uint64_t>(-1);
        r.rdi = EXEC_FAILED_STATUS;
        r.rip = insn;
        task.setRegs(r);
        ::ptrace(PTRACE_DETACH, pid, 0, 0);
        ::_exit(1);
      }
      if (int sig = passStop(pid, status, PTRACE_SYSCALL, true)) {
        pending.push_back(sig);
      }
    }
  } catch (kj::Exception& e) {
    fprintf(stderr, "mos-agent: turning pid %d into its deputy failed: %s; killing it\n", pid,
            e.getDescription().cStr());
    ::kill(pid, SIGKILL);
    ::_exit(1);
  }
}

// Writes `line` to the report descriptor, if any (AgentConfig::reportFd).
void report(const AgentConfig& config, const char* line) {
  if (config.reportFd < 0) {
    return;
  }
  size_t size = strlen(line), done = 0;
  while (done < size) {
    ssize_t n = ::write(config.reportFd, line + done, size - done);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return;
    }
    done += n;
  }
}

// At the PTRACE_EVENT_EXEC stop of the restore stub: the checkpoint goes into the caller.
[[noreturn]] void resumeAtExec(pid_t pid, const AgentConfig& config) {
  std::vector<int> pending;  // signals that arrived during the restore, delivered after it
  try {
    // The stub's execve has not returned yet: step to its syscall-exit stop.
    KJ_SYSCALL(::ptrace(PTRACE_SYSCALL, pid, 0, 0));
    for (;;) {
      int status = waitTask(pid);
      KJ_REQUIRE(WIFSTOPPED(status), "the process ended", describeStatus(status));
      if (isSyscallStop(status)) {
        break;
      }
      if (int sig = passStop(pid, status, PTRACE_SYSCALL, true)) {
        pending.push_back(sig);
      }
    }
    int fd;
    KJ_SYSCALL(fd = ::open(config.resumeImagePath.c_str(), O_RDONLY | O_CLOEXEC),
               config.resumeImagePath);
    kj::AutoCloseFd owner(fd);
    kj::FdInputStream in(fd);
    ImageReader reader(in);
    ResumeOptions options;
    options.intoDeputy = config.resumeIntoDeputy;
    options.exePath = config.resumeExePath;
    options.closeOnExec = config.resumeCloseOnExec;
    if (config.resumeIntoDeputy) {
      // A live move's image, received by the deputy: it is of no use after this.
      ::unlink(config.resumeImagePath.c_str());
    }
    RestoreStats stats = restoreImage(reader, pid, options);
    for (int sig : pending) {
      ::kill(pid, sig);
    }
    report(config, kj::str("ok ", stats.pages, " ", stats.injectedSyscalls, "\n").cStr());
    if (!config.afterResume.empty()) {
      std::vector<char*> argv;
      for (auto& a : config.afterResume) {
        argv.push_back(const_cast<char*>(a.c_str()));
      }
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      fprintf(stderr, "mosrun: the job resumed at home; cannot run %s: %s\n", argv[0],
              strerror(errno));
    }
    ::_exit(0);
  } catch (kj::Exception& e) {
    fprintf(stderr, "%s: resuming %s failed: %s\n",
            config.resumeIntoDeputy ? "mos-agent" : "mosrun", config.resumeImagePath.c_str(),
            e.getDescription().cStr());
    report(config, kj::str("failed: ", e.getDescription(), "; the job was killed\n").cStr());
    ::kill(pid, SIGKILL);
    ::_exit(1);
  }
}

[[noreturn]] void runAgent(pid_t caller, const AgentConfig& config, int readyFd, int controlFd) {
  ::setsid();
  int devnull = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (devnull >= 0) {
    ::dup2(devnull, 0);
    ::dup2(devnull, 1);
  }
  std::vector<int> keep = {readyFd, controlFd};
  if (config.reportFd >= 0) {
    keep.push_back(config.reportFd);
  }
  closeAllExcept(keep);

  ReadyMessage ready{0, ::getpid()};
  if (::ptrace(PTRACE_SEIZE, caller, 0, PTRACE_O_TRACEEXEC | PTRACE_O_TRACESYSGOOD) != 0) {
    ready.error = errno;
    (void)!::write(readyFd, &ready, sizeof(ready));
    ::_exit(1);
  }
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  ::sigprocmask(SIG_BLOCK, &chld, nullptr);
  int sfd = ::signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  (void)!::write(readyFd, &ready, sizeof(ready));
  ::close(readyFd);

  bool controlOpen = true;
  for (;;) {
    signalfd_siginfo info;
    while (::read(sfd, &info, sizeof(info)) > 0) {
    }
    for (;;) {
      int status = 0;
      pid_t r = ::waitpid(caller, &status, WNOHANG | __WALL);
      if (r < 0 && errno == EINTR) {
        continue;
      }
      if (r < 0) {
        ::_exit(0);  // no longer traced: nothing left to do
      }
      if (r == 0) {
        break;
      }
      if (WIFEXITED(status) || WIFSIGNALED(status)) {
        ::_exit(0);
      }
      if (ptraceEvent(status) == PTRACE_EVENT_EXEC) {
        if (!config.resumeImagePath.empty()) {
          resumeAtExec(caller, config);
        }
        migrateAtExec(caller, config);
      }
      passStop(caller, status, PTRACE_CONT, false);
    }
    pollfd fds[2] = {{sfd, POLLIN, 0}, {controlOpen ? controlFd : -1, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      continue;
    }
    if (controlOpen && (fds[1].revents & (POLLIN | POLLHUP))) {
      char c;
      ssize_t n = ::read(controlFd, &c, 1);
      if (n > 0) {
        ::_exit(0);  // cancel(): the exit detaches us from the caller
      }
      if (n == 0) {
        // The caller's exec closed it (CLOEXEC) or the Agent was dropped: the exec event, or
        // the caller's exit, is what we wait for now.
        controlOpen = false;
      }
    }
  }
}

}  // namespace

Agent Agent::start(const AgentConfig& config) {
  pid_t caller = ::getpid();
  int ready[2], control[2];
  KJ_SYSCALL(::pipe2(ready, O_CLOEXEC));
  kj::AutoCloseFd readyRead(ready[0]), readyWrite(ready[1]);
  KJ_SYSCALL(::pipe2(control, O_CLOEXEC));
  kj::AutoCloseFd controlRead(control[0]), controlWrite(control[1]);

  pid_t middle;
  KJ_SYSCALL(middle = ::fork());
  if (middle == 0) {
    pid_t agent = ::fork();
    if (agent != 0) {
      ::_exit(agent > 0 ? 0 : 1);
    }
    try {
      runAgent(caller, config, ready[1], control[0]);
    } catch (...) {
    }
    ::_exit(1);
  }
  readyWrite = nullptr;
  controlRead = nullptr;
  waitTask(middle);

  ReadyMessage msg{};
  ssize_t n;
  KJ_SYSCALL(n = ::read(readyRead.get(), &msg, sizeof(msg)));
  KJ_REQUIRE(n == sizeof(msg), "migration agent died before seizing the caller");
  if (msg.error != 0) {
    KJ_FAIL_REQUIRE("migration agent cannot ptrace the caller", strerror(msg.error));
  }
  Agent agent;
  agent.pid_ = msg.agent;
  agent.helper_ = middle;
  agent.control_ = kj::mv(controlWrite);
  return agent;
}

Agent::Agent(Agent&& other) noexcept
    : pid_(other.pid_), helper_(other.helper_), control_(kj::mv(other.control_)) {
  other.pid_ = -1;
}

Agent& Agent::operator=(Agent&& other) noexcept {
  pid_ = other.pid_;
  helper_ = other.helper_;
  control_ = kj::mv(other.control_);
  other.pid_ = -1;
  return *this;
}

Agent::~Agent() {}

void Agent::cancel() {
  if (control_.get() >= 0) {
    // Opened before the agent is told to go, so its pid cannot have been reused meanwhile.
    int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
    char c = 'c';
    (void)!::write(control_.get(), &c, 1);
    control_ = nullptr;
    if (pidfd >= 0) {
      pollfd p = {pidfd, POLLIN, 0};
      // The caller's handlers run without SA_RESTART: a signal only shortens the wait.
      while (::poll(&p, 1, 5000) < 0 && errno == EINTR) {
      }
      ::close(pidfd);
    }
  }
}

}  // namespace mos::migrate
