#include "deputy.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>

#include <capnp/message.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "migrate.h"
#include "signals.h"
#include "startup.h"
#include "syscall_table.h"

namespace mos::deputy {

namespace {

std::string bytesToString(capnp::Data::Reader data) {
  return std::string(reinterpret_cast<const char*>(data.begin()), data.size());
}

[[maybe_unused]] void makeDirs(const std::string& path) {
  for (size_t i = 1; i <= path.size(); i++) {
    if (i == path.size() || path[i] == '/') {
      mkdir(path.substr(0, i).c_str(), 0755);
    }
  }
}

// Every Deputy of this process, one per deputy thread: a fork child closes the channels of the
// threads it does not have.
std::mutex liveMutex;
std::set<Deputy*> liveDeputies;

// An exec that a deputy thread hands to the leader deputy thread (Deputy::handleExec).
struct ExecHandoff {
  proto::ExecRequest::Reader request;
  bool done = false;
  int64_t result = 0;
};
std::mutex handoffMutex;
std::condition_variable handoffDone;
ExecHandoff* pendingHandoff = nullptr;  // one at a time; guarded by handoffMutex

}  // namespace

void printMosrunMessage(const std::string& text) {
  std::string line = "mosrun: " + text + "\n";
  size_t done = 0;
  while (done < line.size()) {
    ssize_t n = write(STDERR_FILENO, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return;
    }
    done += n;
  }
}

Deputy::Deputy(DeputyOptions options, ReservedFds& fds, kj::Own<Channel> channel)
    : options_(std::move(options)),
      leader_(options_.leader),
      fds_(fds),
      channel_(kj::mv(channel)),
      executor_(fds, options_.jobExe, getpid()) {
  // The channel's socket moves when the job dup2()s onto its number (executor.h).
  fds_.add(channel_->fd(), [this](int, int newFd) { channel_->replaceFd(kj::AutoCloseFd(newFd)); });
  {
    std::lock_guard<std::mutex> lock(liveMutex);
    liveDeputies.insert(this);
  }
  if (!options_.runDir.empty() && options_.leader) {
    try {
      record_ = OwnedJobRecord::create(options_.runDir, "jobs", getpid(), getpid(),
                                       options_.homeNode, options_.command);
      record_.get()->node = options_.node;
      record_.get()->state = static_cast<uint32_t>(JobState::MIGRATING);
      if (options_.locked) {
        setStayReason(record_.get()->stats, LOCKED_REASON);
      }
      startInspection();
    } catch (kj::Exception& e) {
      spdlog::warn("no job record for mps: {}", e.getDescription().cStr());
    }
    control_ = ControlSocket::open(options_.runDir, getpid(), fds_);
  }
}

Deputy::~Deputy() {
  {
    std::lock_guard<std::mutex> lock(liveMutex);
    liveDeputies.erase(this);
  }
  // The number stays open until channel_ is destroyed after us: never reused while reserved.
  fds_.remove(channel_->fd());
}

void Deputy::setImageToSend(kj::AutoCloseFd fd, uint64_t offset) {
  imageFd_ = kj::mv(fd);
  imageOffset_ = offset;
}

void Deputy::startInspection() {
  JobStats& stats = record_.get()->stats;
  channel_->countBytesInto(&stats.bytesOut, &stats.bytesIn);
  publishReserved();
}

void Deputy::publishReserved() {
  publishedFds_ = fds_.generation();
  JobRecord* r = record_.get();
  if (r == nullptr) {
    return;
  }
  std::vector<int> fds = fds_.list();
  for (int i = 0; i < JobStats::MAX_RESERVED; i++) {
    r->stats.reserved[i].store(i < static_cast<int>(fds.size()) ? fds[i] : -1,
                               std::memory_order_relaxed);
  }
}

void Deputy::run() {
  for (;;) {
    kj::Maybe<kj::Own<capnp::MessageReader>> message;
    try {
      waitForMessage();
      message = channel_->receive();
    } catch (kj::Exception& e) {
      if (e.getType() != kj::Exception::Type::DISCONNECTED) {
        spdlog::error("job channel: {}", e.getDescription().cStr());
      }
      nodeDied();
    }
    KJ_IF_MAYBE (m, message) {
      try {
        handle((*m)->getRoot<proto::ToDeputy>());
      } catch (kj::Exception& e) {
        if (e.getType() == kj::Exception::Type::DISCONNECTED) {
          nodeDied();
        }
        spdlog::error("deputy of job {}: {}", getpid(), e.getDescription().cStr());
        fail(std::string("the deputy of job ") + std::to_string(getpid()) +
                 " failed: " + e.getDescription().cStr(),
             EXIT_NODE_DIED);
      }
    } else {
      nodeDied();
    }
  }
}

void Deputy::waitForMessage() {
  for (;;) {
    serveControl();
    // Until the migration stream has gone (sendImage), nothing but its bytes may follow JobStart
    // on the channel: signals stay pending in the kernel, and are forwarded once it has gone.
    // During a move home they stay blocked too (pending in the kernel, they go home with the job).
    bool holdSignals = imageFd_.get() >= 0 || moving();
    if (!holdSignals) {
      flushSignals();
    }
    serveExecHandoff();
    if (channel_->hasBuffered()) {
      return;
    }
    struct pollfd pfd = {channel_->fd(), POLLIN, 0};
    // The only place besides a forwarded call where signals are open.
    int n = ppoll(&pfd, 1, nullptr, holdSignals ? nullptr : &openSignalMask());
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      KJ_FAIL_SYSCALL("ppoll", errno);
    }
    if (!holdSignals) {
      flushSignals();
    }
    return;
  }
}

void Deputy::flushSignals() {
  if (takeCancel()) {
    // A cancel that arrived after its call had finished: just consume the urgent byte.
    char oob;
    recv(channel_->fd(), &oob, 1, MSG_OOB | MSG_DONTWAIT);
  }
  if (moving() || processMoving()) {
    // Kept (another deputy thread may have caught them): they go home with the job, or to the
    // guest if the move does not happen.
    return;
  }
  for (const siginfo_t& info : takePendingSignalInfos()) {
    int sig = info.si_signo;
    if (sig == SIGCONT) {
      continuesSent_++;
    }
    capnp::MallocMessageBuilder message(32);
    auto root = message.initRoot<proto::ToRemote>();
    root.setSignal(sig);
    if (sig == SIGCHLD) {
      // The home child that changed state (the guest's wait4 goes home too): si_pid for its
      // handler.
      root.setSignalPid(info.si_pid);
      root.setSignalStatus(info.si_status);
    }
    // The whole siginfo: the guest queues it on itself (remote/guest_signal.h).
    root.setSignalInfo(kj::arrayPtr(reinterpret_cast<const kj::byte*>(&info), sizeof(info)));
    channel_->send(message);
  }
  for (int sig : takeThreadSignals()) {
    capnp::MallocMessageBuilder message(16);
    auto root = message.initRoot<proto::ToRemote>();
    root.setSignal(sig);
    root.setSignalThread(true);
    channel_->send(message);
  }
}

void Deputy::handle(proto::ToDeputy::Reader message) {
  switch (message.which()) {
    case proto::ToDeputy::SYSCALL: handleSyscall(message.getSyscall()); return;
    case proto::ToDeputy::EXEC: handleExec(message.getExec()); return;
    case proto::ToDeputy::FETCH_FILE: handleFetchFile(message.getFetchFile()); return;
    case proto::ToDeputy::EXIT: handleExit(message.getExit());
    case proto::ToDeputy::STARTED: guestStarted(message.getStarted()); return;
    case proto::ToDeputy::FAILED:
      if (!startImagePath_.empty() && leader_) {
        startFailed(message.getFailed().cStr());
      }
      fail(message.getFailed().cStr(), EXIT_CANNOT_RUN);
    case proto::ToDeputy::STOPPED: stopWithGuest(message.getStoppedAfterContinues()); return;
    case proto::ToDeputy::CONTINUED: return;
    case proto::ToDeputy::FORK: handleFork(message.getFork()); return;
    case proto::ToDeputy::CHILD_DISPOSITION:
      mirrorChildDisposition(message.getChildDisposition());
      return;
    case proto::ToDeputy::SEND_IMAGE:
      if (imageFd_.get() >= 0) {
        sendFileBytes(*channel_, imageFd_.get(), imageOffset_, UINT64_MAX);
        fds_.remove(imageFd_.get());
        imageFd_ = nullptr;
      } else {
        spdlog::warn("sendImage without a migration image to send, ignored");
      }
      return;
    case proto::ToDeputy::MOVE_REFUSED:
    case proto::ToDeputy::MOVE_IMAGE:
    case proto::ToDeputy::MOVE_IMAGE_END:
    case proto::ToDeputy::MOVED: handleMoveMessage(message); return;
    case proto::ToDeputy::COME_HOME: comeHome(message.getComeHome().cStr()); return;
  }
  spdlog::warn("unknown message from the supervisor (union tag {}), ignored",
               static_cast<int>(message.which()));
}

void Deputy::guestStarted(pid_t remotePid) {
  if (!startImagePath_.empty()) {
    unlink(startImagePath_.c_str());  // the job runs there: no way back to this image
    startImagePath_.clear();
  }
  if (auto* r = record_.get()) {
    r->remotePid = remotePid;
    r->node = options_.node;
    r->state = static_cast<uint32_t>(JobState::REMOTE);
    r->stats.sinceNs.store(realtimeNs(), std::memory_order_relaxed);
    noteArrival(r, options_.node);
  }
  spdlog::debug("job {} runs on node {} as pid {}", getpid(), options_.node, remotePid);
}

void Deputy::stopWithGuest(uint32_t afterContinues) {
  // Job control: the guest is in a group stop, so the job's home process stops too and the
  // shell sees the job stopped; SIGCONT (fg, bg) continues us and is forwarded. Two races with
  // that SIGCONT. It may have come after the guest stopped and already be forwarded (the
  // supervisor had received fewer when it saw the stop): the guest is continued or about to be,
  // and stopping here would leave the job's home process stopped for good. Or it may have come
  // and not been taken yet: generating SIGSTOP discards a pending SIGCONT (signal(7)), so
  // kill(2) with signals blocked would stop us with nothing left to continue us. The stop is
  // therefore made with signals open through deputy_syscall, which does not enter the kernel
  // once a signal is recorded (signals.h); what arrived is forwarded first.
  while (afterContinues == continuesSent_) {
    uint64_t args[6] = {static_cast<uint64_t>(getpid()), SIGSTOP};
    if (interruptibleSyscall(SYS_kill, args) != -EINTR) {
      return;  // stopped and continued; the SIGCONT that did it is recorded, forwarded next
    }
    flushSignals();
    if (signalsPending()) {
      // Kept during a move (flushSignals): stop as before; the move's end forwards them.
      kill(getpid(), SIGSTOP);
      return;
    }
  }
}

void Deputy::handleSyscall(proto::SyscallRequest::Reader request) {
  // A small first segment: most replies are a few words; out-buffers get their own segment.
  capnp::MallocMessageBuilder replyMessage(128);
  // mps -d: the call is in flight at home until its reply is built (slot 0: our only thread).
  JobRecord* record = record_.get();
  uint64_t startNs = 0;
  if (record != nullptr) {
    uint64_t args[6] = {};
    auto wire = request.getArgs();
    for (unsigned i = 0; i < 6 && i < wire.size(); i++) {
      args[i] = wire[i];
    }
    beginCall(record->stats.inFlight[0], getpid(), request.getNr(), args);
    startNs = record->stats.inFlight[0].startNs.load(std::memory_order_relaxed);
  }
  try {
    executor_.execute(request, replyMessage);
  } catch (kj::Exception& e) {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) {
      throw;
    }
    spdlog::error("malformed syscall request {} (nr {}): {}", request.getSeq(), request.getNr(),
                  e.getDescription().cStr());
    auto reply = replyMessage.initRoot<proto::ToRemote>().initReply();
    reply.setSeq(request.getSeq());
    reply.setRet(-EINVAL);
  }
  if (record != nullptr) {
    endCall(record->stats.inFlight[0]);
    countCall(record->stats.routes[0], (realtimeNs() - startNs) / 1000);
  }
  auto reply = replyMessage.getRoot<proto::ToRemote>().getReply();
  // The cancel is this thread's own (another deputy thread may have taken the shared pending
  // flag meanwhile).
  bool cancelled = takeCancel();
  // A call no signal cuts short (close, dup2...) ran with signals blocked: its EINTR, if any,
  // is the kernel's own result, never an interruption.
  if (reply.getRet() == -EINTR && (signalsPending() || cancelled) &&
      !neverInterrupted(static_cast<int>(request.getNr()))) {
    reply.setInterrupted(true);
  }
  if (cancelled) {
    // Consume the urgent byte that carried the cancel; a call that finished anyway still
    // answers normally (the supervisor drops answers for calls the guest left).
    char oob;
    recv(channel_->fd(), &oob, 1, MSG_OOB | MSG_DONTWAIT);
  }
  if (auto* r = record_.get()) {
    r->syscalls.store(r->syscalls.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    if (fds_.generation() != publishedFds_) {
      publishReserved();  // a dup2 onto one of ours moved it
    }
  }
  // A move request first, then signals: the supervisor must know both before it decides what
  // the guest sees.
  serveControl();
  flushSignals();
  channel_->send(replyMessage);
}

// execve(2)/execveat(2) of the guest, performed here (design decision 2). The new program starts
// natively in P with the job's fds; a fresh migration agent, seized before the exec, captures it
// at its exec stop and sends it away again. Success never returns: our descriptors are all
// close-on-exec, so the supervisor sees the channel close and ends the old guest.
void Deputy::handleExec(proto::ExecRequest::Reader request) {
  int64_t ret;
  if (leader_) {
    ret = execAtHome(request);
  } else {
    // A thread's exec is run by the leader deputy thread: the migration agent traces the
    // leader, and the exec ends every other thread either way (docs/design.md, "Threads").
    ExecHandoff handoff{request};
    {
      std::unique_lock<std::mutex> lock(handoffMutex);
      handoffDone.wait(lock, [] { return pendingHandoff == nullptr; });
      pendingHandoff = &handoff;
    }
    requestExecHandoff(getpid());
    std::unique_lock<std::mutex> lock(handoffMutex);
    handoffDone.wait(lock, [&] { return handoff.done; });
    ret = handoff.result;
  }
  capnp::MallocMessageBuilder message;
  auto reply = message.initRoot<proto::ToRemote>().initReply();
  reply.setSeq(request.getSeq());
  reply.setRet(ret);
  flushSignals();
  channel_->send(message);
}

void Deputy::serveExecHandoff() {
  if (!leader_ || !takeExecHandoff()) {
    return;
  }
  ExecHandoff* handoff;
  {
    std::lock_guard<std::mutex> lock(handoffMutex);
    handoff = pendingHandoff;
  }
  if (handoff == nullptr) {
    return;
  }
  int64_t ret = execAtHome(handoff->request);  // returns only when the exec failed
  std::lock_guard<std::mutex> lock(handoffMutex);
  pendingHandoff = nullptr;
  handoff->result = ret;
  handoff->done = true;
  handoffDone.notify_all();
}

int64_t Deputy::execAtHome(proto::ExecRequest::Reader request) {
  int dirfd = request.getDirfd();
  if (dirfd != AT_FDCWD && fds_.contains(dirfd)) {
    return -EBADF;
  }
  std::string path = bytesToString(request.getPath());
  switch (executor_.classifyPath(dirfd, path.c_str())) {
    case Executor::ProcPath::RESERVED_FD: return -ENOENT;
    case Executor::ProcPath::EXE:
      if (!options_.jobExe.empty()) {
        path = options_.jobExe;  // re-exec of /proc/self/exe means the job's program
      }
      break;
    case Executor::ProcPath::OTHER: break;
  }
  std::vector<std::string> argvStrings, envpStrings;
  for (auto a : request.getArgv()) {
    argvStrings.push_back(bytesToString(a));
  }
  for (auto e : request.getEnvp()) {
    envpStrings.push_back(bytesToString(e));
  }
  std::vector<char*> argv, envp;
  for (auto& s : argvStrings) {
    argv.push_back(s.data());
  }
  argv.push_back(nullptr);
  for (auto& s : envpStrings) {
    envp.push_back(s.data());
  }
  envp.push_back(nullptr);

  // Dispositions as the guest had them: SIG_IGN survives exec, handlers become SIG_DFL.
  struct sigaction saved[65];
  bool haveSaved[65] = {};
  uint64_t ignored = request.getSigIgnored();
  for (int sig = 1; sig <= 64; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, nullptr, &saved[sig]) < 0) {
      continue;
    }
    haveSaved[sig] = true;
    struct sigaction next = {};
    next.sa_handler = (ignored & (uint64_t{1} << (sig - 1))) ? SIG_IGN : SIG_DFL;
    sigaction(sig, &next, nullptr);
  }
  JobRecord* r = record_.get();
  if (r != nullptr) {
    // The new program runs at home until its agent migrates it; the next deputy rewrites this.
    r->state = static_cast<uint32_t>(JobState::HOME);
    r->node = options_.homeNode;
    r->remotePid = 0;
  }
#if MOS_DEPUTY_HAVE_AGENT
  migrate::Agent agent;
  bool haveAgent = false;
  if (!options_.runDir.empty() && !options_.selfExe.empty()) {
    try {
      migrate::AgentConfig config;
      config.deputyPath = options_.selfExe;
      config.deputyArgv = options_.selfArgv;
      makeDirs(options_.runDir + "/images");
      config.imagePath = options_.runDir + "/images/" + std::to_string(getpid()) + ".img";
      agent = migrate::Agent::start(config);
      haveAgent = true;
    } catch (kj::Exception& e) {
      spdlog::warn("job {}: no migration agent for the exec ({}); the new program stays home",
                   getpid(), e.getDescription().cStr());
    }
  }
#else
  spdlog::warn("job {}: built without libmigrate's agent; the new program stays home", getpid());
#endif
  sigset_t mask;
  sigemptyset(&mask);
  uint64_t blocked = request.getSigBlocked();
  for (int sig = 1; sig <= 64; sig++) {
    if (blocked & (uint64_t{1} << (sig - 1))) {
      sigaddset(&mask, sig);
    }
  }
  sigprocmask(SIG_SETMASK, &mask, nullptr);
  ::syscall(__NR_execveat, dirfd, path.c_str(), argv.data(), envp.data(), request.getFlags());
  int err = errno;

  // Still here: the exec failed. Back to the deputy's state, and the guest sees the errno.
  blockAllSignals();
  for (int sig = 1; sig <= 64; sig++) {
    if (haveSaved[sig]) {
      sigaction(sig, &saved[sig], nullptr);
    }
  }
#if MOS_DEPUTY_HAVE_AGENT
  if (haveAgent) {
    agent.cancel();
  }
#endif
  if (r != nullptr) {
    r->state = static_cast<uint32_t>(JobState::REMOTE);
    r->node = options_.node;
  }
  return -err;
}

void Deputy::handleFork(proto::ForkRequest::Reader request) {
  uint64_t seq = request.getSeq();
  uint16_t port = request.getPort();
  auto tokenBytes = request.getToken();
  std::vector<kj::byte> token(tokenBytes.begin(), tokenBytes.end());
  // Signals recorded so far belong to the parent; every signal stays blocked across the fork.
  flushSignals();
  timespec before, after;
  clock_gettime(CLOCK_MONOTONIC, &before);
  int64_t ret;
  if (request.getThread()) {
    ret = startThread(port, kj::arrayPtr(token.data(), token.size()), request.getTid());
  } else {
    pid_t child;
    {
      // Other deputy threads must not hold these across fork(2): the child would find them
      // locked forever.
      std::lock_guard<std::mutex> live(liveMutex);
      std::lock_guard<std::mutex> reserved(fds_.mutex());
      child = fork();
    }
    if (child == 0) {
      becomeForkChild(port, kj::arrayPtr(token.data(), token.size()));
      return;  // back to run(): the child's loop on its own channel
    }
    ret = child < 0 ? -errno : child;
  }
  clock_gettime(CLOCK_MONOTONIC, &after);
  capnp::MallocMessageBuilder message;
  auto reply = message.initRoot<proto::ToRemote>().initReply();
  reply.setSeq(seq);
  reply.setRet(ret);
  reply.setHomeNs(uint64_t(after.tv_sec - before.tv_sec) * 1000000000u + uint64_t(after.tv_nsec) -
                  uint64_t(before.tv_nsec));
  flushSignals();
  channel_->send(message);
}

void Deputy::becomeForkChild(uint16_t port, kj::ArrayPtr<const kj::byte> token) {
  pid_t self = getpid();
  executor_.setPid(self);
  // The parent's channels (ours and its other deputy threads') stay the parent's: close our
  // copies. This thread is the child's only one, so it is the child's leader.
  leader_ = true;
  {
    std::lock_guard<std::mutex> lock(liveMutex);
    for (Deputy* other : liveDeputies) {
      if (other != this) {
        fds_.remove(other->channel_->fd());
        close(other->channel_->fd());
      }
    }
    liveDeputies.clear();
    liveDeputies.insert(this);
  }
  int old = channel_->fd();
  fds_.remove(old);
  int fd = connectJobSocket(options_.address, port, 5000, fds_);
  if (fd < 0) {
    fail("node " + std::to_string(options_.node) + " unreachable for the child " +
             std::to_string(self) + " of a fork: " + strerror(-fd),
         EXIT_NODE_DIED);
  }
  kj::byte hello[8 + 32 + 4];
  memcpy(hello, HELLO_CHILD, 8);
  memset(hello + 8, 0, 32);
  memcpy(hello + 8, token.begin(), kj::min(token.size(), size_t(32)));
  int32_t pid = self;
  memcpy(hello + 40, &pid, 4);
  if (send(fd, hello, sizeof(hello), MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(hello))) {
    fail("node " + std::to_string(options_.node) + " unreachable for the child " +
             std::to_string(self) + " of a fork",
         EXIT_NODE_DIED);
  }
  channel_ = kj::heap<Channel>(kj::AutoCloseFd(fd));
  fds_.remove(fd);
  fds_.add(fd, [this](int, int newFd) { channel_->replaceFd(kj::AutoCloseFd(newFd)); });
  // The control socket at our parent's pid is our parent's: ours is at our own pid.
  if (control_.get() != nullptr) {
    control_->abandon();
    control_ = nullptr;
  }
  move_ = nullptr;
  if (!options_.runDir.empty()) {
    control_ = ControlSocket::open(options_.runDir, self, fds_);
  }
  // The parent's record stays the parent's (our copy of the mapping is simply dropped).
  record_ = OwnedJobRecord();
  if (!options_.runDir.empty()) {
    try {
      record_ = OwnedJobRecord::create(options_.runDir, "jobs", self, self, options_.homeNode,
                                       options_.command);
      record_.get()->node = options_.node;
      record_.get()->state = static_cast<uint32_t>(JobState::REMOTE);
      if (record_.get()->moves == 0) {
        // Born on the node (a guest's fork): its trail starts there, not at home.
        record_.get()->trail[0] = options_.node;
      }
      if (options_.locked) {
        setStayReason(record_.get()->stats, LOCKED_REASON);  // its fork is locked too
      }
      startInspection();
    } catch (kj::Exception& e) {
      spdlog::warn("no job record for mps: {}", e.getDescription().cStr());
    }
  }
}

namespace {

bool tidInUse(pid_t tid) { return ::kill(tid, 0) == 0 || errno != ESRCH; }

// Makes the next id the home pid namespace allocates `tid` (ns_last_pid, under the flock that
// CRIU and others take on it). Returns the locked file (the caller creates the thread, then
// closes it) or -errno.
int reserveNextTid(pid_t tid) {
  int fd = open("/proc/sys/kernel/ns_last_pid", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    return -errno;
  }
  flock(fd, LOCK_EX);
  std::string value = std::to_string(tid - 1);
  if (write(fd, value.data(), value.size()) != static_cast<ssize_t>(value.size())) {
    int err = errno;
    close(fd);
    return -err;
  }
  return fd;
}

}  // namespace

pid_t Deputy::startThread(uint16_t port, kj::ArrayPtr<const kj::byte> token, pid_t wantedTid) {
  if (wantedTid > 0) {
    // A deputy thread of the node the job left may still hold it (its channel closes once the
    // old guest is gone).
    for (int i = 0; i < 1000 && tidInUse(wantedTid); ++i) {
      usleep(10000);
    }
    if (tidInUse(wantedTid)) {
      spdlog::error("job {}: home tid {} stays in use; no deputy thread for it", getpid(),
                    wantedTid);
      return -EBUSY;
    }
  }
  for (int attempt = 0;; ++attempt) {
    int lock = -1;
    if (wantedTid > 0) {
      lock = reserveNextTid(wantedTid);
      if (lock < 0) {
        spdlog::error("job {}: cannot choose home tid {} (ns_last_pid): {}", getpid(), wantedTid,
                      strerror(-lock));
        return lock;
      }
    }
    std::mutex mutex;
    std::condition_variable reported;
    bool done = false;
    pid_t result = -EAGAIN;
    std::function<void(pid_t)> report = [&](pid_t tid) {
      std::lock_guard<std::mutex> guard(mutex);
      result = tid;
      done = true;
      reported.notify_all();
    };
    try {
      // Every signal stays blocked in the new thread (it inherits our mask) outside its windows.
      std::thread([options = options_, fds = &fds_, port,
                   bytes = std::vector<kj::byte>(token.begin(), token.end()), wantedTid,
                   &report]() mutable {
        threadMain(std::move(options), fds, port, std::move(bytes), wantedTid, report);
      }).detach();
    } catch (std::system_error& e) {
      result = -EAGAIN;
      done = true;
    }
    if (lock >= 0) {
      close(lock);
    }
    std::unique_lock<std::mutex> guard(mutex);
    reported.wait(guard, [&] { return done; });
    if (result != -EBUSY || attempt >= 20) {
      return result;
    }
    // Another process took the tid between our write and the thread's birth: again.
  }
}

void Deputy::threadMain(DeputyOptions options, ReservedFds* fds, uint16_t port,
                        std::vector<kj::byte> token, pid_t wantedTid,
                        const std::function<void(pid_t)>& reportTid) {
  pid_t tid = static_cast<pid_t>(::syscall(SYS_gettid));
  if (wantedTid > 0 && tid != wantedTid) {
    reportTid(-EBUSY);
    return;
  }
  // Connected from this thread: the socket's owner (SIGURG for a cancel) is this thread.
  int fd = connectJobSocket(options.address, port, 5000, *fds);
  if (fd < 0) {
    spdlog::warn("deputy thread of job {}: node {} unreachable: {}", getpid(), options.node,
                 strerror(-fd));
    reportTid(fd);
    return;
  }
  kj::byte hello[8 + 32 + 4];
  memcpy(hello, HELLO_CHILD, 8);
  memset(hello + 8, 0, 32);
  memcpy(hello + 8, token.data(), kj::min(token.size(), size_t(32)));
  int32_t id = tid;
  memcpy(hello + 40, &id, 4);
  if (send(fd, hello, sizeof(hello), MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(hello))) {
    int err = errno;
    fds->remove(fd);
    close(fd);
    reportTid(-err);
    return;
  }
  reportTid(tid);  // the caller's objects are gone from here on
  options.leader = false;
  try {
    Deputy deputy(std::move(options), *fds, kj::heap<Channel>(kj::AutoCloseFd(fd)));
    deputy.run();
  } catch (DeputyThreadEnded&) {
  }
}

// Identity (and bytes) of a home file for the remote content cache (design decision 6).
void Deputy::handleFetchFile(proto::FetchFile::Reader request) {
  int fd = request.getFd();
  kj::AutoCloseFd owned;
  std::string path;
  int err = 0;
  if (fd >= 0) {
    if (fds_.contains(fd)) {
      err = EBADF;
    } else {
      path = readLink("/proc/self/fd/" + std::to_string(fd));
    }
  } else {
    path = bytesToString(request.getPath());
    switch (executor_.classifyPath(AT_FDCWD, path.c_str())) {
      case Executor::ProcPath::RESERVED_FD: err = ENOENT; break;
      case Executor::ProcPath::EXE:
        if (!options_.jobExe.empty()) {
          path = options_.jobExe;
        }
        break;
      case Executor::ProcPath::OTHER: break;
    }
    if (err == 0) {
      // O_NONBLOCK: a FIFO must not hang the deputy; regular files ignore it.
      fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
      if (fd < 0) {
        err = errno;
      } else {
        owned = kj::AutoCloseFd(fd);
      }
    }
  }
  sendFetchedFile(*channel_, request.getId(), fd, path, err, request.getWantData());
}

// The guest ended: end the same way, so the shell sees the same status or the same death.
void Deputy::handleExit(proto::GuestExit::Reader exit) {
  if (auto* r = record_.get()) {
    r->state = static_cast<uint32_t>(JobState::EXITED);
  }
  record_.unlink();
  if (control_.get() != nullptr) {
    control_->unlinkPath();
  }
  int sig = exit.getSignal();
  if (sig <= 0 || sig > 64) {
    _exit(exit.getStatus() & 0xff);
  }
  if (!exit.getCoreDumped()) {
    // No core at home either: the status word's core bit matches the guest's.
    struct rlimit none = {0, 0};
    struct rlimit current;
    if (getrlimit(RLIMIT_CORE, &current) == 0) {
      none.rlim_max = current.rlim_max;
    }
    setrlimit(RLIMIT_CORE, &none);
  }
  struct sigaction dfl = {};
  dfl.sa_handler = SIG_DFL;
  sigaction(sig, &dfl, nullptr);
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, sig);
  ::syscall(SYS_tgkill, getpid(), static_cast<pid_t>(::syscall(SYS_gettid)), sig);
  sigprocmask(SIG_UNBLOCK, &one, nullptr);
  // A signal whose default action does not kill (SIGCHLD, or a stop signal after SIGCONT).
  _exit(128 + sig);
}

void Deputy::nodeDied() {
  if (!leader_) {
    // The guest thread ended (its task closed the channel), or the whole job is ending and the
    // leader hears why on its own channel.
    throw DeputyThreadEnded{};
  }
  if (!startImagePath_.empty()) {
    startFailed("node " + std::to_string(options_.node) +
                " closed the connection before the job "
                "ran there");
  }
  fail("node " + std::to_string(options_.node) + " died; job " + std::to_string(getpid()) + " lost",
       EXIT_NODE_DIED);
}

void Deputy::startFailed(const std::string& why) {
  std::string path = kj::mv(startImagePath_);
  startImagePath_.clear();
  if (auto* r = record_.get()) {
    r->state = static_cast<uint32_t>(JobState::HOME);
    r->node = options_.homeNode;
    r->remotePid = 0;
    setStayReason(r->stats, START_FAILED_REASON);
  }
  if (control_.get() != nullptr) {
    control_->unlinkPath();
  }
  runOnAtHome(fds_, path, options_.jobExe, why);
}

void Deputy::fail(const std::string& text, int status) {
  printMosrunMessage(text);
  record_.unlink();
  if (moving() && !move_->path.empty()) {
    unlink(move_->path.c_str());  // a move's image that will never be used
  }
  if (moving() && move_->connection.get() >= 0) {
    // `migrate` waits for the move's verdict: the job ends, it does not run anywhere.
    replyControl(move_->connection.get(), "failed: " + text);
  }
  if (control_.get() != nullptr) {
    control_->unlinkPath();
  }
  _exit(status);
}

}  // namespace mos::deputy
