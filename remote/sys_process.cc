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

#include <capnp/message.h>
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

// setuid(2), setreuid(2), setresuid(2), setfsuid(2) and their gid twins. The job's credentials
// live at home and the supervisor answers getuid and friends from the Ids cache, so a real change
// is refused (EPERM, logged once: it comes in a later issue). A call that changes nothing —
// every id it names is -1 or the job's current one — succeeds, as it would natively; GNU make
// does this around each child it starts. The saved id is taken to be the effective one (true of
// every job that did not exec a set-id program). setfsuid/setfsgid return the previous fs id
// (the effective one) and never fail (setfsuid(2)).
Answer Supervisor::handleSameIds(const seccomp_notif& notif) {
  auto ids = start_.getIds();
  bool uidCall = false;
  switch (notif.data.nr) {
    case __NR_setuid:
    case __NR_setreuid:
    case __NR_setresuid:
    case __NR_setfsuid: uidCall = true; break;
  }
  uint32_t real = uidCall ? ids.getUid() : ids.getGid();
  uint32_t effective = uidCall ? ids.getEuid() : ids.getEgid();
  auto arg = [&](int i) { return static_cast<uint32_t>(notif.data.args[i]); };
  auto keeps = [](uint32_t id, uint32_t current) { return id == uint32_t(-1) || id == current; };
  bool same = false;
  switch (notif.data.nr) {
    case __NR_setuid:
    case __NR_setgid: same = arg(0) == real && arg(0) == effective; break;
    case __NR_setreuid:
    case __NR_setregid: same = keeps(arg(0), real) && keeps(arg(1), effective); break;
    case __NR_setresuid:
    case __NR_setresgid:
      same = keeps(arg(0), real) && keeps(arg(1), effective) && keeps(arg(2), effective);
      break;
    case __NR_setfsuid:
    case __NR_setfsgid:
      if (arg(0) != effective) {
        (void)handleUnsupported(notif, EPERM, "a change of the fs id comes in a later issue");
      }
      return Answer::of(effective);
  }
  if (same) {
    return Answer::of(0);
  }
  return handleUnsupported(notif, EPERM,
                           "credential changes of a guest come in a later issue (the id cache "
                           "would go stale)");
}

// rt_sigaction(2) of SIGCHLD with a new action: the deputy takes the same disposition, so the
// home kernel (where the job's children and their zombies are) reaps them itself when the guest
// ignores SIGCHLD or sets SA_NOCLDWAIT. The guest's kernel then runs the call (it re-reads the
// action; a job that changes it meanwhile only confuses itself).
Answer Supervisor::handleSigaction(const seccomp_notif& notif) {
  uint64_t action[2];  // struct kernel_sigaction: handler, flags
  if (guestProcess_->memory().read(
          RemotePtr<void>(notif.data.args[1]),
          std::span<uint8_t>(reinterpret_cast<uint8_t*>(action), sizeof(action))) != 0) {
    return Answer::cont();  // the guest's kernel answers EFAULT
  }
  int mode = action[0] == reinterpret_cast<uint64_t>(SIG_IGN) ? 1
             : (action[1] & SA_NOCLDWAIT) != 0                ? 2
                                                              : 0;
  capnp::MallocMessageBuilder message(16);
  message.initRoot<proto::ToDeputy>().setChildDisposition(static_cast<uint8_t>(mode));
  channel_.send(message);
  return Answer::cont();
}

// kill(2), tkill(2), tgkill(2), rt_sigqueueinfo(2), rt_tgsigqueueinfo(2). A signal the job sends
// to itself or to one of its threads (raise, abort, os.kill(os.getpid())) names its home pid, which
// is also its pid in its own pid namespace here: the guest's kernel runs the call itself (values
// only, and the namespace holds no other process the guest may reach), so delivery, si_code
// (SI_USER, SI_TKILL) and si_pid are the kernel's own. Every other target lives at home: forwarded,
// executed by the home kernel.
Answer Supervisor::handleKill(const seccomp_notif& notif) {
  auto ids = start_.getIds();
  int64_t a0 = static_cast<int32_t>(notif.data.args[0]);
  int64_t a1 = static_cast<int32_t>(notif.data.args[1]);
  bool self = false;
  switch (notif.data.nr) {
    case __NR_kill:
    case __NR_rt_sigqueueinfo: self = a0 == ids.getPid(); break;
    case __NR_tkill:
      self = a0 == ids.getTid() ||
             (forkHost_ != nullptr && forkHost_->isThreadOf(ids.getPid(), static_cast<pid_t>(a0)));
      break;
    case __NR_tgkill:
    case __NR_rt_tgsigqueueinfo:
      // Every thread of the job's process runs here, at its home tid: a signal to any of them
      // (pthread_kill, pthread_cancel) is the guest's kernel's own, and a tid that is not one of
      // them gets ESRCH there, as at home.
      self = a0 == ids.getPid();
      break;
  }
  if (!self) {
    const SyscallEntry* entry = findSyscall(notif.data.nr);
    return forwardRegular(notif, entry->args);
  }
  int64_t sig = notif.data.nr == __NR_tgkill ? static_cast<int32_t>(notif.data.args[2]) : a1;
  // A signal to a sibling thread (pthread_kill, pthread_cancel) is left to the guest's kernel:
  // the injected siginfo below is queued by the calling thread on itself.
  int64_t targetTid = notif.data.nr == __NR_tgkill ? a1 : a0;
  bool toSibling = notif.data.nr != __NR_kill && targetTid != ids.getTid();
  bool generated = !toSibling && (notif.data.nr == __NR_kill || notif.data.nr == __NR_tkill ||
                                  notif.data.nr == __NR_tgkill);
  if (forkHost_ != nullptr && generated && sig > 0 && sig <= 64 && sig != SIGKILL &&
      sig != SIGSTOP) {
    // The guest's kernel would name its uid on this node (nobody) as the sender: the guest
    // queues the siginfo the home kernel writes instead (the job's home pid and real uid), with
    // the answer, so it still arrives before kill returns (respond, guest_signal.h).
    siginfo_t info = {};
    info.si_signo = static_cast<int>(sig);
    info.si_code = notif.data.nr == __NR_kill ? SI_USER : SI_TKILL;
    info.si_pid = ids.getPid();
    info.si_uid = ids.getUid();
    deferred_.push_back(info);
    return Answer::of(0);
  }
  // A probe (signal 0), an invalid number (the kernel's EINVAL), SIGKILL or SIGSTOP, or a
  // siginfo the job queues itself (kept as given, as natively): the guest's kernel runs it.
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
  // The channel closed: the exec succeeded at home and the old image is gone there too. Every
  // thread of the old image ends with it (the home exec ended the other deputy threads).
  trace_->finish(0);
  spdlog::info("job {} exec'd at home; its old guest {} ends", start_.getIds().getPid(), guest_);
  guestProcess_->kill();
  endJob(0);
}

}  // namespace mos::remote
