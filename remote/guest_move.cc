#include "guest_move.h"

#include <sys/ptrace.h>
#include <sys/wait.h>

#include <algorithm>
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
  std::vector<pid_t> tasks = {pid};  // the leader first
  tasks.insert(tasks.end(), request.threads.begin(), request.threads.end());
  auto answerAll = [&] {
    KJ_IF_MAYBE (id, request.answerId) {
      host.send(*id, -ERESTARTNOINTR);  // the call runs again wherever the guest resumes
    }
    for (uint64_t id : request.threadAnswers) {
      host.send(id, -ERESTARTNOINTR);
    }
  };
  std::vector<pid_t> seized;
  auto detachAll = [&](bool restoreOptions) {
    // The leader last: a thread that runs on before it never finds its process half traced.
    for (auto it = seized.rbegin(); it != seized.rend(); ++it) {
      if (restoreOptions) {
        ptrace(PTRACE_SETOPTIONS, *it, 0, PTRACE_O_TRACESYSGOOD);
      }
      ptrace(PTRACE_DETACH, *it, 0, 0);
    }
    seized.clear();
  };
  for (pid_t tid : tasks) {
    if (ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD) != 0) {
      result.reason = std::string("the supervisor cannot trace the guest's thread ") +
                      std::to_string(tid) + ": " + strerror(errno);
      for (pid_t t : seized) {
        ptrace(PTRACE_INTERRUPT, t, 0, 0);
        host.wait(t);
      }
      detachAll(false);
      answerAll();
      return result;
    }
    seized.push_back(tid);
    ptrace(PTRACE_INTERRUPT, tid, 0, 0);
  }
  // Every thread leaves its call now, set to restart, and stops on its way out.
  answerAll();
  bool groupStopped = false;
  std::vector<pid_t> gone;
  for (pid_t tid : tasks) {
    for (;;) {
      int status = host.wait(tid);
      if (ended(status)) {
        gone.push_back(tid);
        break;
      }
      if (!WIFSTOPPED(status)) {
        continue;
      }
      int event = status >> 16;
      if (event == PTRACE_EVENT_STOP) {
        groupStopped = groupStopped || isGroupStopSignal(WSTOPSIG(status));
        break;
      }
      // A signal on its way in before our interrupt: it is delivered here (its handler runs on
      // this node), then the interrupt stop follows.
      ptrace(PTRACE_CONT, tid, 0, event == 0 ? WSTOPSIG(status) : 0);
    }
  }
  if (!gone.empty()) {
    seized.erase(std::remove_if(
                     seized.begin(), seized.end(),
                     [&](pid_t t) { return std::find(gone.begin(), gone.end(), t) != gone.end(); }),
                 seized.end());
    detachAll(false);
    if (gone.front() == pid || gone.size() == tasks.size()) {
      result.outcome = MoveOutcome::GONE;  // the process ended (its status was routed)
    } else {
      result.reason =
          "its thread " + std::to_string(gone.front()) + " ended during the capture; ask again";
    }
    return result;
  }
  if (groupStopped) {
    detachAll(false);  // the group stop stays
    result.reason = "the job is stopped (job control); continue it first";
    return result;
  }
  // Stopped: libmigrate's injected calls must reach the kernel, not us.
  for (pid_t tid : tasks) {
    if (ptrace(PTRACE_SETOPTIONS, tid, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_SUSPEND_SECCOMP) != 0) {
      result.reason = std::string("cannot suspend the guest's filter: ") + strerror(errno);
      detachAll(true);
      return result;
    }
  }
  try {
    migrate::CaptureOptions options;
    options.editHeader = request.editHeader;
    migrate::CaptureStats stats = migrate::captureImage(pid, *request.sink, options);
    result.pages = stats.pages;
    result.outcome = MoveOutcome::DONE;
    spdlog::info("guest {} captured for a move: {} threads, {} pages in {} runs, stopped {:.1f} ms",
                 pid, tasks.size(), stats.pages, stats.runs, stats.frozen.count() / 1000.0);
  } catch (kj::Exception& e) {
    result.reason = e.getDescription().cStr();
    detachAll(true);
  }
  return result;
}

void finishMove(pid_t pid, const std::vector<pid_t>& threads, bool commit, const InjectHost& host) {
  if (commit) {
    kill(pid, SIGKILL);
    // Traced threads are reaped by their tracer, and the leader only after all of them.
    for (pid_t tid : threads) {
      for (;;) {
        int status = host.wait(tid);
        if (ended(status)) {
          break;
        }
        ptrace(PTRACE_CONT, tid, 0, 0);  // a stop reported before the kill took effect
      }
    }
    for (;;) {
      int status = host.wait(pid);
      if (ended(status)) {
        return;
      }
      // A stop reported before the kill took effect: let the kill act.
      ptrace(PTRACE_CONT, pid, 0, 0);
    }
  }
  for (pid_t tid : threads) {
    ptrace(PTRACE_SETOPTIONS, tid, 0, PTRACE_O_TRACESYSGOOD);  // the filter applies again
    ptrace(PTRACE_DETACH, tid, 0, 0);
  }
  ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD);
  ptrace(PTRACE_DETACH, pid, 0, 0);
}

}  // namespace mos::remote
