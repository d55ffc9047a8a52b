// Process-family handlers of the supervisor: ids from the cache, signals to self, execve at home.

#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <sstream>

#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "marshal.h"
#include "supervisor.h"
#include "trace_payloads.h"

namespace mos::remote {

namespace {

constexpr size_t MAX_EXEC_STRINGS = 8192;    // argv + envp entries
constexpr size_t MAX_EXEC_BYTES = 4u << 20;  // bytes of argv + envp strings

}  // namespace

// getpid(2), gettid(2), getuid(2), geteuid(2), getgid(2), getegid(2): home ids from the cache
// (design decision 4), no round trip.
Answer Supervisor::handleIds(const seccomp_notif& notif) {
  auto ids = start_.getIds();
  switch (notif.data.nr) {
    case __NR_getpid: return Answer::of(ids.getPid());
    case __NR_gettid: return Answer::of(ids.getTid());
    case __NR_getuid: return Answer::of(ids.getUid());
    case __NR_geteuid: return Answer::of(ids.getEuid());
    case __NR_getgid: return Answer::of(ids.getGid());
    case __NR_getegid: return Answer::of(ids.getEgid());
  }
  return handleUnsupported(notif, ENOSYS, "no cached id for this call");
}

// kill(2), tkill(2), tgkill(2), rt_sigqueueinfo(2), rt_tgsigqueueinfo(2). A signal the job sends
// to itself (raise, abort, os.kill(os.getpid())) names its home pid, which is also its pid in
// its own pid namespace here: the guest's kernel runs the call itself (values only, and the
// namespace holds no other process the guest may reach), so delivery, si_code (SI_USER,
// SI_TKILL) and si_pid are the kernel's own. Every other target lives at home: forwarded,
// executed by the home kernel.
Answer Supervisor::handleKill(const seccomp_notif& notif) {
  auto ids = start_.getIds();
  int64_t a0 = static_cast<int32_t>(notif.data.args[0]);
  int64_t a1 = static_cast<int32_t>(notif.data.args[1]);
  bool self = false;
  switch (notif.data.nr) {
    case __NR_kill:
    case __NR_rt_sigqueueinfo: self = a0 == ids.getPid(); break;
    case __NR_tkill: self = a0 == ids.getTid(); break;
    case __NR_tgkill:
    case __NR_rt_tgsigqueueinfo: self = a0 == ids.getPid() && a1 == ids.getTid(); break;
  }
  if (!self) {
    const SyscallEntry* entry = findSyscall(notif.data.nr);
    return forwardRegular(notif, entry->args);
  }
  return Answer::cont();
}

// execve(2), execveat(2): performed at home by the deputy (design decision 2). On success the
// deputy becomes the new program, which a migration agent sends back to this node as a new job;
// this guest ends without an exit report. On failure the guest sees the deputy's errno.
Answer Supervisor::handleExec(const seccomp_notif& notif) {
  bool at = notif.data.nr == __NR_execveat;
  uint64_t pathArg = notif.data.args[at ? 1 : 0];
  uint64_t argvArg = notif.data.args[at ? 2 : 1];
  uint64_t envpArg = notif.data.args[at ? 3 : 2];
  GuestMemory& memory = guestProcess_->memory();
  capnp::MallocMessageBuilder message;
  auto exec = message.initRoot<proto::ToDeputy>().initExec();
  exec.setSeq(notif.id);
  exec.setDirfd(at ? static_cast<int32_t>(notif.data.args[0]) : AT_FDCWD);
  exec.setFlags(at ? static_cast<int32_t>(notif.data.args[4]) : 0);
  std::string path;
  if (int err = memory.readString(RemotePtr<char>(pathArg), PATH_MAX, path); err != 0) {
    return Answer::of(-err);
  }
  exec.setPath(kj::arrayPtr(reinterpret_cast<const kj::byte*>(path.data()), path.size()));
  size_t budget = MAX_EXEC_BYTES;
  for (int which = 0; which < 2; which++) {
    uint64_t array = which == 0 ? argvArg : envpArg;
    std::vector<std::string> strings;
    for (size_t i = 0; array != 0; i++) {
      if (i >= MAX_EXEC_STRINGS) {
        return Answer::of(-E2BIG);
      }
      uint64_t ptr;
      if (memory.read(RemotePtr<void>(array + i * 8),
                      std::span<uint8_t>(reinterpret_cast<uint8_t*>(&ptr), sizeof(ptr))) != 0) {
        return Answer::of(-EFAULT);
      }
      if (ptr == 0) {
        break;
      }
      std::string s;
      if (int err = memory.readString(RemotePtr<char>(ptr), kj::min(budget, size_t(128 << 10)), s);
          err != 0) {
        return Answer::of(err == ENAMETOOLONG ? -E2BIG : -err);
      }
      budget -= kj::min(budget, s.size() + 1);
      strings.push_back(std::move(s));
    }
    auto list = which == 0 ? exec.initArgv(strings.size()) : exec.initEnvp(strings.size());
    for (size_t i = 0; i < strings.size(); i++) {
      list.set(
          i, kj::arrayPtr(reinterpret_cast<const kj::byte*>(strings[i].data()), strings[i].size()));
    }
    if (KJ_UNLIKELY(trace_->active())) {
      traceExecStrings(*trace_, at ? 1 : 0, path, which == 0, strings);
    }
  }
  std::string status = guestProcess_->procFile("status");
  auto mask = [&](const char* key) { return statusMask(status, key); };
  exec.setSigIgnored(mask("SigIgn:"));
  exec.setSigBlocked(mask("SigBlk:"));
  if (!idValid(notif.id)) {
    return Answer::drop();
  }
  bool interrupted;
  KJ_IF_MAYBE (reply, roundTrip(message, notif.id, &interrupted)) {
    if (interrupted) {
      return Answer::interrupted(notif.data.nr);
    }
    return Answer::of((*reply)->getRoot<proto::ToRemote>().getReply().getRet());
  }
  // The channel closed: the exec succeeded at home and the old image is gone there too.
  trace_->finish(0);
  spdlog::info("job {} exec'd at home; its old guest {} ends", start_.getIds().getPid(), guest_);
  endJob(0);
}

}  // namespace mos::remote
