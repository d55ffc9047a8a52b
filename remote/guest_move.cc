#include "guest_move.h"

#include <sys/ptrace.h>
#include <sys/wait.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>

#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "checkpoint.h"

namespace mos::remote {

namespace {

constexpr int64_t ERESTARTNOINTR = 513;  // include/linux/errno.h

bool isGroupStopSignal(int sig) {
  return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

bool ended(int status) { return status < 0 || WIFEXITED(status) || WIFSIGNALED(status); }

}  // namespace

bool parseCacheKey(const std::string& name, CacheKey& key) {
  unsigned home = 0;
  unsigned long long dev = 0, ino = 0, size = 0;
  long long mtime = 0;
  int used = 0;
  if (sscanf(name.c_str(), "n%u-%llx-%llu-%llu-%lld%n", &home, &dev, &ino, &size, &mtime, &used) !=
          5 ||
      static_cast<size_t>(used) != name.size()) {
    return false;
  }
  key.homeNode = home;
  key.dev = dev;
  key.ino = ino;
  key.size = size;
  key.mtimeNs = mtime;
  return true;
}

MoveResult captureForMove(const MoveRequest& request, const InjectHost& host) {
  MoveResult result;
  pid_t pid = request.pid;
  if (ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACESYSGOOD) != 0) {
    result.reason = std::string("the supervisor cannot trace the guest: ") + strerror(errno);
    KJ_IF_MAYBE (id, request.answerId) {
      host.send(*id, -ERESTARTNOINTR);  // the call runs again, here
    }
    return result;
  }
  ptrace(PTRACE_INTERRUPT, pid, 0, 0);
  KJ_IF_MAYBE (id, request.answerId) {
    // The guest leaves its call now, set to restart, and stops on its way out.
    host.send(*id, -ERESTARTNOINTR);
  }
  for (;;) {
    int status = host.wait(pid);
    if (ended(status)) {
      result.outcome = MoveOutcome::GONE;
      return result;
    }
    if (!WIFSTOPPED(status)) {
      continue;
    }
    int event = status >> 16;
    if (event == PTRACE_EVENT_STOP) {
      if (isGroupStopSignal(WSTOPSIG(status))) {
        ptrace(PTRACE_DETACH, pid, 0, 0);  // the group stop stays
        result.reason = "the job is stopped (job control); continue it first";
        return result;
      }
      break;
    }
    // A signal on its way in before our interrupt: it is delivered here (its handler runs on
    // this node), then the interrupt stop follows.
    ptrace(PTRACE_CONT, pid, 0, event == 0 ? WSTOPSIG(status) : 0);
  }
  // Stopped: libmigrate's injected calls must reach the kernel, not us.
  if (ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_SUSPEND_SECCOMP) != 0) {
    result.reason = std::string("cannot suspend the guest's filter: ") + strerror(errno);
    ptrace(PTRACE_DETACH, pid, 0, 0);
    return result;
  }
  try {
    migrate::CaptureOptions options;
    options.editHeader = request.editHeader;
    migrate::CaptureStats stats = migrate::captureImage(pid, *request.sink, options);
    result.pages = stats.pages;
    result.outcome = MoveOutcome::DONE;
    spdlog::info("guest {} captured for a move: {} pages in {} runs, stopped {:.1f} ms", pid,
                 stats.pages, stats.runs, stats.frozen.count() / 1000.0);
  } catch (kj::Exception& e) {
    result.reason = e.getDescription().cStr();
    ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD);
    ptrace(PTRACE_DETACH, pid, 0, 0);
  }
  return result;
}

void finishMove(pid_t pid, bool commit, const InjectHost& host) {
  if (commit) {
    kill(pid, SIGKILL);
    for (;;) {
      int status = host.wait(pid);
      if (ended(status)) {
        return;
      }
      // A stop reported before the kill took effect: let the kill act.
      ptrace(PTRACE_CONT, pid, 0, 0);
    }
  }
  ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD);  // the filter applies again
  ptrace(PTRACE_DETACH, pid, 0, 0);
}

}  // namespace mos::remote
