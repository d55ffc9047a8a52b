#include "supervisor.h"

#include <fcntl.h>
#include <linux/audit.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <capnp/message.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "checkpoint.h"
#include "guest_family.h"
#include "marshal.h"
#include "migrate.h"
#include "seccomp_filter.h"
#include "trace_payloads.h"

namespace mos::remote {

namespace {
// What an untraced supervisor points at: never active, never written to (shared by threads).
TracePublisher& untracedPublisher() {
  static TracePublisher publisher;
  return publisher;
}
TraceCall& untracedCall() {
  static TraceCall call;
  return call;
}
// -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND (include/linux/errno.h): a call cut short.
bool isRestartCode(int64_t value) { return value <= -512 && value >= -514; }

// The stop signals of signal(7), which a SIGCONT discards while they are pending.
bool isStopSignal(int sig) {
  return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}
}  // namespace

Answer Answer::interrupted(int nr) {
  // A call no signal cuts short reaches here only when the home kernel itself said EINTR (a
  // close whose flush was interrupted): that result stands, the descriptor is gone.
  return neverInterrupted(nr) ? Answer::of(-EINTR) : Answer::of(-restartCode(nr));
}

// Reads a hex signal set line ("SigBlk:\t0000000000010000") of /proc/PID/status.
uint64_t statusMask(const std::string& status, const char* key) {
  size_t at = status.find(key);
  if (at == std::string::npos) {
    return 0;
  }
  return strtoull(status.c_str() + at + strlen(key), nullptr, 16);
}

std::string readStatus(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

Supervisor::Supervisor(SupervisorOptions options)
    : options_(std::move(options)),
      channel_(kj::AutoCloseFd(options_.fd)),
      exit_([](int status) { _exit(status); }),
      tracePublisher_(&untracedPublisher()),
      trace_(&untracedCall()) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  KJ_SYSCALL(sigprocmask(SIG_BLOCK, &set, nullptr));
  int fd;
  KJ_SYSCALL(fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  signalFd_ = kj::AutoCloseFd(fd);
  signal(SIGPIPE, SIG_IGN);
}

Supervisor::Supervisor(SupervisorOptions options, kj::Own<capnp::MessageReader> jobStart,
                       kj::Own<SeccompUnotify> unotify, kj::Own<GuestProcess> guest,
                       kj::Function<void(int)> exit)
    : options_(std::move(options)),
      channel_(kj::AutoCloseFd(options_.fd)),
      exit_(kj::mv(exit)),
      jobStart_(kj::mv(jobStart)),
      guest_(guest->pid()),
      guestProcess_(kj::mv(guest)),
      unotify_(kj::mv(unotify)),
      tracePublisher_(options_.trace != nullptr ? options_.trace : &untracedPublisher()),
      trace_(&untracedCall()) {
  start_ = jobStart_->getRoot<proto::JobStart>();
  ownedCache_ = kj::heap<FileCache>(options_.cacheDir, options_.peerNode);
  cache_ = ownedCache_.get();
}

int Supervisor::run() {
  try {
    receiveJobStart();
  } catch (kj::Exception& e) {
    spdlog::error("job start failed: {}", e.getDescription().cStr());
    return 1;
  }
  // The job's trace stream, keyed by its home pid: every task of the family publishes to it.
  try {
    ownedTrace_ =
        kj::heap<TracePublisher>(options_.runDir, options_.peerNode, start_.getIds().getPid());
    options_.trace = ownedTrace_.get();
    tracePublisher_ = options_.trace;
  } catch (kj::Exception& e) {
    spdlog::warn("job {}: not traceable: {}", start_.getIds().getPid(), e.getDescription().cStr());
  }
  try {
    startGuest();
  } catch (kj::Exception& e) {
    spdlog::error("cannot start the guest of job {}: {}", start_.getIds().getPid(),
                  e.getDescription().cStr());
    try {
      capnp::MallocMessageBuilder message;
      message.initRoot<proto::ToDeputy>().setFailed(
          std::string("node " + std::to_string(options_.node) + " could not start the job: ") +
          e.getDescription().cStr());
      channel_.send(message);
    } catch (kj::Exception&) {
    }
    return 1;
  }
  // Every process of the job on this node is served by one GuestFamily (a thread per guest);
  // this object serves the first guest. The kernel refuses to create a thread while the
  // caller's children go to another pid namespace than its own (clone(2), EINVAL), so our
  // children return to our own namespace now: the guests' later processes are forked by the
  // guests' own kernel inside the job's namespace (clone with CLONE_PARENT), not by us.
  try {
    int ns;
    KJ_SYSCALL(ns = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC));
    kj::AutoCloseFd own(ns);
    KJ_SYSCALL(setns(ns, CLONE_NEWPID));
  } catch (kj::Exception& e) {
    spdlog::error("job {}: {}", start_.getIds().getPid(), e.getDescription().cStr());
    endJob(1);
  }
  {
    GuestFamily family(options_, kj::heap<KernelUnotify>(kj::mv(listener_)), kj::mv(signalFd_),
                       kj::mv(pidNamespace_));
    family.run(*this, guest_, kj::mv(restoredThreads_));
  }
  record_.unlink();
  if (!options_.shmDir.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(options_.shmDir, ec);
  }
  return 0;
}

void Supervisor::becomeTask(kj::Own<SeccompUnotify> unotify, kj::Own<GuestProcess> guest,
                            kj::Function<void(int)> exit, ForkHost* host) {
  unotify_ = kj::mv(unotify);
  guestProcess_ = kj::mv(guest);
  exit_ = kj::mv(exit);
  forkHost_ = host;
}

void Supervisor::serveTask() {
  try {
    serve();
  } catch (kj::Exception& e) {
    endJobAfter(e);
  }
}

int64_t Supervisor::askDeputyToFork(uint64_t seq, uint16_t port, kj::ArrayPtr<const kj::byte> token,
                                    bool thread, pid_t tid) {
  capnp::MallocMessageBuilder message;
  auto fork = message.initRoot<proto::ToDeputy>().initFork();
  fork.setSeq(seq);
  fork.setPort(port);
  fork.setToken(token);
  fork.setThread(thread);
  fork.setTid(tid);
  KJ_IF_MAYBE (reply, callHome(message, seq)) {
    forkResult_ = (*reply)->getRoot<proto::ToRemote>().getReply().getRet();
    return forkResult_;
  }
  return -EINTR;
}

void Supervisor::endJobAfter(const kj::Exception& e) {
  if (e.getType() == kj::Exception::Type::DISCONNECTED) {
    spdlog::warn("job {}: channel to the deputy failed: {}", start_.getIds().getPid(),
                 e.getDescription().cStr());
    endJob(0);
  }
  // A message from the deputy that does not parse (or a bug): this job cannot go on, the node
  // and its other jobs can. The deputy hears why, if it still listens.
  spdlog::error("job {}: {}; ending the guest", start_.getIds().getPid(),
                e.getDescription().cStr());
  try {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::ToDeputy>().setFailed(
        std::string("node " + std::to_string(options_.node) + " ended the job: ") +
        e.getDescription().cStr());
    channel_.send(message);
  } catch (kj::Exception&) {
  }
  endJob(1);
}

void Supervisor::serve() {
  for (;;) {
    turn(-1);
  }
}

bool Supervisor::turn(int timeoutMs) {
  if (!deferred_.empty()) {
    // Home signals the guest could not queue yet (it waited in a vfork): try again soon.
    flushDeferred();
    if (!deferred_.empty() && (timeoutMs < 0 || timeoutMs > DEFERRED_RETRY_MS)) {
      timeoutMs = DEFERRED_RETRY_MS;
    }
  }
  if (moveRequested_ && deferred_.empty() && current_ == nullptr && runMove(nullptr)) {
    return true;  // refused or aborted (the guest runs on); a commit ends the task
  }
  if (parkRequested_ && deferred_.empty() && current_ == nullptr) {
    parkForMove(nullptr);  // the thread computes or waits in its kernel: nothing to cut
    return true;
  }
  if (channel_.hasBuffered()) {
    onIdleMessage();
    return true;
  }
  struct pollfd fds[4] = {{unotify_->fd(), POLLIN, 0},
                          {channel_.fd(), POLLIN, 0},
                          {guestProcess_->eventFd(), POLLIN, 0},
                          {parkWake_.get(), POLLIN, 0}};
  int n = poll(fds, parkWake_.get() >= 0 ? 4 : 3, timeoutMs);
  if (n < 0) {
    if (errno == EINTR) {
      return false;
    }
    KJ_FAIL_SYSCALL("poll", errno);
  }
  if (fds[2].revents & POLLIN) {
    onChildEvent();
  }
  if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
    onIdleMessage();
  }
  if (fds[0].revents & POLLIN) {
    serveNotification();
  }
  return n > 0;
}

void Supervisor::receiveJobStart() {
  struct pollfd pfd = {channel_.fd(), POLLIN, 0};
  int n;
  KJ_SYSCALL(n = poll(&pfd, 1, 10000));
  KJ_REQUIRE(n == 1, "no JobStart within 10 s");
  KJ_IF_MAYBE (message, channel_.receive()) {
    jobStart_ = kj::mv(*message);
  } else {
    KJ_FAIL_REQUIRE("the deputy closed the channel before JobStart");
  }
  start_ = jobStart_->getRoot<proto::JobStart>();
  // A malformed message throws when a bad pointer is read, and start_ is read everywhere, also
  // where nothing catches (log lines of error paths). So every pointer is bounds-checked here,
  // once (totalSize() walks them all), and the fields read outside the image are read once.
  start_.totalSize();
  start_.getIds();
  start_.getCommand();
  KJ_REQUIRE(start_.getHomeNode() == options_.peerNode, "JobStart names another home node",
             start_.getHomeNode(), options_.peerNode);
  KJ_REQUIRE(start_.getImageStreamed(),
             "JobStart without a migration stream (a deputy of an older umosix?)");
  ownedCache_ = kj::heap<FileCache>(options_.cacheDir, options_.peerNode);
  cache_ = ownedCache_.get();
  if (!options_.runDir.empty()) {
    // The job's /dev/shm here (sys_shm.cc), made at first use. One left by a supervisor of the
    // same home pid that was killed is stale: its job is gone.
    options_.shmDir = options_.runDir + "/shm/" + std::to_string(options_.peerNode) + "-" +
                      std::to_string(start_.getIds().getPid());
    std::error_code ec;
    std::filesystem::remove_all(options_.shmDir, ec);
  }
}

void Supervisor::rememberHomePath(const std::string& cachePath,
                                  kj::ArrayPtr<const kj::byte> homePath) {
  homePaths_[cachePath] =
      std::string(reinterpret_cast<const char*>(homePath.begin()), homePath.size());
}

std::string Supervisor::resolveImageFile(proto::FileRef::Reader ref) {
  KJ_IF_MAYBE (path, cache_->lookup(ref)) {
    rememberHomePath(*path, ref.getPath());
    return *path;
  }
  capnp::MallocMessageBuilder expectedMessage;
  auto expected = expectedMessage.initRoot<proto::FileRef>();
  expected.setDev(ref.getDev());
  expected.setIno(ref.getIno());
  expected.setSize(ref.getSize());
  expected.setMtimeNs(ref.getMtimeNs());
  int err = 0;
  KJ_IF_MAYBE (path, fetchIntoCache(-1, ref.getPath(), err, expected, true)) {
    rememberHomePath(*path, ref.getPath());
    return *path;
  }
  KJ_FAIL_REQUIRE("cannot fetch a file of the image from home", kj::str(ref.getPath().asChars()),
                  strerror(err));
}

void Supervisor::startGuest() {
  auto filter = buildGuestFilter();
  // The guest's kernel pid is its home pid (docs/design.md, "Home ids in the guest's kernel").
  pidNamespace_ = JobPidNamespace::create();
  migrate::RestoreOptions options;
  options.pid = start_.getIds().getPid();
  options.seccompFilter = std::span<const sock_filter>(filter.data(), filter.size());
  // Once the supervisor has received a notification, only SIGKILL ends the guest's wait: a
  // signal is then handled by the supervisor's answer (see roundTrip), which is what makes a
  // signal the job sends itself arrive before kill(2) returns.
  options.seccompExtraFlags = SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
  auto resolve = [this](proto::FileRef::Reader ref) { return resolveImageFile(ref); };
  // The migration stream follows JobStart: MAGIC and the header now; the frames once every
  // file the header maps is in the content cache (fetching needs the channel free of pages).
  // A deputy that stops sending in the middle of the stream must not hold this supervisor.
  struct timeval streamTimeout = {30, 0}, none = {0, 0};
  setsockopt(channel_.fd(), SOL_SOCKET, SO_RCVTIMEO, &streamTimeout, sizeof(streamTimeout));
  KJ_DEFER(setsockopt(channel_.fd(), SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none)));
  auto began = std::chrono::steady_clock::now();
  auto msSince = [](std::chrono::steady_clock::time_point from) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - from)
        .count();
  };
  ChannelInputStream in(channel_);
  migrate::ImageReader reader(in);
  double headerMs = msSince(began);
  std::set<std::string> seen;
  for (auto m : reader.header().getMappings()) {
    if (m.getKind() == proto::Mapping::Kind::FILE &&
        seen.insert(
                std::string(m.getFile().getPath().asChars().begin(), m.getFile().getPath().size()))
            .second) {
      resolveImageFile(m.getFile());
    }
  }
  double filesMs = msSince(began);
  capnp::MallocMessageBuilder ask(16);
  ask.initRoot<proto::ToDeputy>().setSendImage();
  channel_.send(ask);
  auto guest = migrate::restoreGuest(reader, resolve, options);
  // The profile of the start (docs/design.md, "Speed"): header read, files in the cache, stub
  // made, mappings, pages (waiting for the frames included), the rest of the rebuild.
  spdlog::info(
      "job {}: stream restored in {:.1f} ms: header {:.1f} ms, files {:.1f} ms ({} mapped), "
      "stub {:.1f} ms, mappings {:.1f} ms, pages {:.1f} ms ({} pages), state {:.1f} ms",
      start_.getIds().getPid(), msSince(began), headerMs, filesMs - headerMs, seen.size(),
      guest.stubTime.count() / 1000.0, guest.mappingsTime.count() / 1000.0,
      (guest.pagesTime - guest.mappingsTime).count() / 1000.0, guest.pages,
      (guest.totalTime - guest.pagesTime).count() / 1000.0);
  // The deputy may have sent messages right after the end frame (a signal): the reader's
  // read-ahead goes back to the channel.
  channel_.unreceive(reader.takeReadAhead());
  guest_ = guest.pid;
  // GuestFamily takes the listener and SIGCHLD (run()).
  listener_ = kj::mv(guest.listener);
  auto imageThreads = reader.header().getThreads();
  for (size_t i = 0; i < guest.threads.size() && i + 1 < imageThreads.size(); ++i) {
    restoredThreads_.emplace_back(guest.threads[i], imageThreads[i + 1].getTid());
  }
  record_ = OwnedJobRecord::create(options_.runDir, "guests", getpid(), start_.getIds().getPid(),
                                   options_.peerNode, start_.getCommand());
  record_.get()->node = options_.node;
  record_.get()->remotePid = guest_;
  record_.get()->state = static_cast<uint32_t>(JobState::REMOTE);
  cache_->countInto(&record_.get()->stats);
  channel_.countBytesInto(&record_.get()->stats.bytesOut, &record_.get()->stats.bytesIn);
  spdlog::info("job {} of node {} runs here as pid {}", start_.getIds().getPid(), options_.peerNode,
               guest_);
  capnp::MallocMessageBuilder message;
  message.initRoot<proto::ToDeputy>().setStarted(guest_);
  channel_.send(message);
}

void Supervisor::recordChildGuest() {
  if (options_.runDir.empty()) {
    return;
  }
  try {
    record_ = OwnedJobRecord::create(options_.runDir, "guests", guest_, start_.getIds().getPid(),
                                     options_.peerNode, start_.getCommand());
    record_.get()->node = options_.node;
    record_.get()->remotePid = guest_;
    record_.get()->state = static_cast<uint32_t>(JobState::REMOTE);
  } catch (kj::Exception& e) {
    spdlog::warn("no job record for mps: {}", e.getDescription().cStr());
  }
}

void Supervisor::serveNotification() {
  seccomp_notif notif;
  if (unotify_->receive(notif) != 0) {
    // ENOENT: the guest left the wait (signal, death) between poll and receive.
    return;
  }
  current_ = &notif;
  if (KJ_UNLIKELY(tracePublisher_->active())) {
    serveTraced(notif);
  } else {
    Answer answer = dispatch(notif);
    respond(notif.id, answer);
  }
  current_ = nullptr;
  flushDeferred();
}

void Supervisor::serveTraced(const seccomp_notif& notif) {
  auto ids = start_.getIds();
  TraceCall trace(*tracePublisher_, ids.getPid(), ids.getTid(), options_.node, options_.peerNode,
                  notif.data.nr, notif.data.args);
  const SyscallEntry* entry =
      notif.data.arch == AUDIT_ARCH_X86_64 ? findSyscall(notif.data.nr) : nullptr;
  // The route the table gives; handlers that answer otherwise say so (setRoute).
  TraceRoute route = TraceRoute::DENIED;
  if (entry != nullptr) {
    switch (entry->route) {
      case Route::LOCAL: route = TraceRoute::LOCAL_ANSWER; break;
      case Route::DENY: route = TraceRoute::DENIED; break;
      case Route::EMULATE: route = TraceRoute::EMULATED; break;
      case Route::FORWARD:
        route =
            entry->handler == HandlerId::MMAP ? TraceRoute::LOCAL_ANSWER : TraceRoute::FORWARDED;
        break;
    }
  }
  trace.setRoute(route);
  // mostrace -k: the stack while the guest thread still waits in the notification.
  traceGuestStack(trace, stacks_, notif, [this](const std::string& cachePath) {
    auto it = homePaths_.find(cachePath);
    return it != homePaths_.end() ? it->second : cachePath;
  });
  trace_ = &trace;
  forkResult_ = 0;
  KJ_DEFER(trace_ = &untracedCall());
  Answer answer = dispatch(notif);
  respond(notif.id, answer);
  switch (answer.kind) {
    case Answer::VALUE: trace.finish(answer.value); break;
    case Answer::CONTINUE:
      // The guest's own kernel runs it (a file-backed mmap of a cached file, a signal to itself).
      trace.setRoute(TraceRoute::LOCAL_ANSWER);
      trace.finishContinued();
      break;
    case Answer::DROP:
      if (entry != nullptr && entry->handler == HandlerId::FORK) {
        // A fork's first notification is only restarted as clone(CLONE_PARENT); the restarted
        // one is the call, and its result is the home child's pid.
        if (forkResult_ != 0) {
          trace.finish(forkResult_);
        }
        break;
      }
      trace.finishContinued();  // the guest left the call (a signal, death)
      break;
  }
}

void Supervisor::respond(uint64_t id, const Answer& answer) {
  if (answer.kind == Answer::DROP) {
    return;
  }
  if (parkRequested_ && answer.kind == Answer::VALUE && current_ != nullptr && current_->id == id &&
      deferred_.empty() && moveMayCut() && isRestartCode(answer.value)) {
    // The call was cut short for a move of this thread's process: the capture answers it.
    parkForMove(id);
    return;
  }
  if (moveRequested_ && answer.kind == Answer::VALUE && current_ != nullptr && current_->id == id &&
      deferred_.empty() && moveMayCut() && isRestartCode(answer.value)) {
    // The call was cut short for a move home: the move answers it (the call restarts wherever
    // the guest resumes). A refused move has answered it too.
    if (runMove(id)) {
      return;
    }
  }
  if (answer.kind == Answer::VALUE && forkHost_ != nullptr && current_ != nullptr &&
      current_->id == id) {
    // Home signals still to queue, or a call cut short whose own signal mask decides what the
    // guest takes: the guest queues them and takes the answer in one session (guest_signal.h).
    bool interrupted =
        !neverInterrupted(current_->data.nr) && answer.value == -restartCode(current_->data.nr);
    kj::Maybe<uint64_t> mask = interrupted ? currentCallMask() : nullptr;
    if (!deferred_.empty() || mask != nullptr) {
      std::vector<siginfo_t> signals = std::move(deferred_);
      deferred_.clear();
      PendingAnswer pending;
      pending.id = id;
      pending.value = answer.value;
      pending.interrupted = interrupted;
      pending.callMask = mask;
      switch (forkHost_->queueAsGuest(guest_, signals, pending)) {
        case InjectOutcome::DONE:
        case InjectOutcome::GONE:
        case InjectOutcome::BUSY: return;
        case InjectOutcome::STOPPED:
        case InjectOutcome::FAILED:
          for (const siginfo_t& info : signals) {
            queueFromOutside(info);
          }
          return;
      }
    }
  }
  seccomp_notif_resp resp = {};
  resp.id = id;
  if (answer.kind == Answer::CONTINUE) {
    resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
  } else if (answer.value < 0 && answer.value >= -4095) {
    resp.error = static_cast<int32_t>(answer.value);
  } else {
    resp.val = answer.value;
  }
  if (unotify_->send(resp) == ENOENT) {
    // The notification was cancelled (the guest got a signal, or died). Routine.
    spdlog::debug("notification {} vanished before its answer", id);
  }
}

Answer Supervisor::dispatch(const seccomp_notif& notif) {
  RouteCount count(*this, notif);  // mps -d: counted by route when the dispatch returns
  int nr = notif.data.nr;
  const SyscallEntry* entry =
      (notif.data.arch == AUDIT_ARCH_X86_64 && nr >= 0) ? findSyscall(nr) : nullptr;
  if (entry == nullptr) {
    return handleUnsupported(notif, ENOSYS, "no row in the syscall table");
  }
  if (!nodeFds_.empty()) {
    KJ_IF_MAYBE (answer, routeNodeFd(notif, *entry)) {
      return *answer;
    }
  }
  if (entry->handler == HandlerId::MMAP) {
    return handleMmap(notif);
  }
  if (entry->handler == HandlerId::SIGACTION) {
    return handleSigaction(notif);
  }
  switch (entry->route) {
    case Route::LOCAL:
      // The filter allows these; a notification means an argument-dependent rule sent it here.
      return Answer::cont();
    case Route::DENY: return handleUnsupported(notif, entry->err, entry->why);
    case Route::EMULATE:
    case Route::FORWARD: break;
  }
  switch (entry->handler) {
    case HandlerId::NONE: return forwardRegular(notif, entry->args);
    case HandlerId::IDS: return handleIds(notif);
    case HandlerId::SAME_IDS: return handleSameIds(notif);
    case HandlerId::EXEC: return handleExec(notif);
    case HandlerId::IOV: return handleIov(notif);
    case HandlerId::KILL: return handleKill(notif);
    case HandlerId::SET_TID_ADDRESS:
      // set_tid_address(2): run by the guest's kernel, which keeps the clear-child-tid address
      // (a thread's exit zeroes and wakes it) and answers the caller's tid in the job's pid
      // namespace: its home tid. A value argument only: nothing is read.
      return Answer::cont();
    case HandlerId::IOCTL:
    case HandlerId::FCNTL:
    case HandlerId::PSELECT: {
      ArgSpec specs[6];
      uint64_t args[6];
      for (int i = 0; i < 6; i++) {
        args[i] = notif.data.args[i];
      }
      if (!dynamicArgSpecs(*entry, args, specs)) {
        return Answer::of(entry->handler == HandlerId::IOCTL ? -ENOTTY : -EINVAL);
      }
      return forwardRegular(notif, specs);
    }
    case HandlerId::SOCKMSG: return handleSockmsg(notif);
    case HandlerId::FORK:
      if (forkHost_ == nullptr) {
        return handleUnsupported(notif, ENOSYS, "fork is not served here");
      }
      return forkHost_->forkGuest(*this, notif);
    case HandlerId::OPEN:
      return forwardRegular(notif, entry->args);  // it serves the job's /proc files itself
    case HandlerId::MEMFD: return handleMemfd(notif);
    case HandlerId::MMAP:
    case HandlerId::SIGACTION: break;  // dispatched above
  }
  return handleUnsupported(notif, ENOSYS, "no handler");
}

Answer Supervisor::handleUnsupported(const seccomp_notif& notif, int err, const char* why) {
  trace_->setRoute(TraceRoute::DENIED);
  int nr = notif.data.nr;
  if (reported_.insert(nr).second) {
    const SyscallEntry* entry = findSyscall(nr);
    spdlog::warn("job {}: syscall {} ({}) is not supported on a remote node: {}; it fails with {}",
                 start_.getIds().getPid(), entry != nullptr ? entry->name : "unknown", nr, why,
                 strerrorname_np(err));
  }
  return Answer::of(-err);
}

kj::Maybe<kj::Own<capnp::MessageReader>> Supervisor::awaitMessage(
    const std::function<bool(proto::ToRemote::Reader)>& isMine, uint64_t seq) {
  bool watchGuest = seq != 0;
  for (;;) {
    // The deputy answers every request, and a dead peer surfaces through the socket's keepalive
    // and user timeout (tuneJobSocket). While a call blocks at home, look every 50 ms whether
    // the guest has a signal to take (a timer of this node): then cancel the call at home.
    while (watchGuest && !channel_.hasBuffered()) {
      struct pollfd pfd = {channel_.fd(), POLLIN, 0};
      int n = poll(&pfd, 1, CANCEL_CHECK_MS);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      KJ_REQUIRE(n >= 0, "poll", strerror(errno));
      if (n > 0) {
        break;
      }
      if (!deferred_.empty() || moveDue()) {
        // A home signal (or a move request) crossed this request (the deputy sent it while idle,
        // then began the call): cancel the call so the guest can take it. Again every 50 ms: a
        // cancel that reaches the deputy before its call starts is consumed as stale.
        char cancel = 'c';
        send(channel_.fd(), &cancel, 1, MSG_OOB | MSG_NOSIGNAL);
        continue;
      }
      if (guestHasSignalToTake() || guestGone()) {
        spdlog::debug("guest has a signal pending during call {}; cancelling it at home", seq);
        char cancel = 'c';
        send(channel_.fd(), &cancel, 1, MSG_OOB | MSG_NOSIGNAL);
        watchGuest = false;
      }
    }
    KJ_IF_MAYBE (message, channel_.receive()) {
      auto root = (*message)->getRoot<proto::ToRemote>();
      if (isMine(root)) {
        return kj::mv(*message);
      }
      if (root.isSignal()) {
        deliverSignal(root);
        continue;
      }
      if (root.isMove()) {
        onMoveRequest(root.getMove());
        continue;
      }
      spdlog::debug("unexpected message from the deputy, ignored");
    } else {
      return nullptr;
    }
  }
}

kj::Maybe<kj::Own<capnp::MessageReader>> Supervisor::roundTrip(capnp::MallocMessageBuilder& request,
                                                               uint64_t seq, bool* interrupted) {
  *interrupted = false;
  for (;;) {
    channel_.send(request);
    auto reply = awaitMessage(
        [seq](proto::ToRemote::Reader m) { return m.isReply() && m.getReply().getSeq() == seq; },
        seq);
    KJ_IF_MAYBE (r, reply) {
      trace_->addHomeNs((*r)->getRoot<proto::ToRemote>().getReply().getHomeNs());
      // A call no signal cuts short (close, dup2...) is never reported interrupted by the
      // deputy, which runs it with signals blocked; its result stands in any case.
      bool standing =
          current_ != nullptr && current_->id == seq && neverInterrupted(current_->data.nr);
      if (standing || !(*r)->getRoot<proto::ToRemote>().getReply().getInterrupted()) {
        homeCalls_++;
        if (record_.get() != nullptr) {
          record_.get()->syscalls.fetch_add(1, std::memory_order_relaxed);
        }
        return kj::mv(*r);
      }
      // In a family, deferred home signals (not on the guest yet) or a call with a signal mask
      // of its own: respond() lets the guest decide, with the signals queued (guest_signal.h).
      bool decideInGuest = forkHost_ != nullptr && current_ != nullptr && current_->id == seq &&
                           (!deferred_.empty() || currentCallMask() != nullptr);
      bool forMove = moveDue() && current_ != nullptr && current_->id == seq;
      if (decideInGuest || forMove || guestHasSignalToTake() || guestGone()) {
        // Answer the row's restart code (-ERESTARTSYS, -ERESTARTNOHAND) with the signal pending:
        // on its way out of the syscall the guest's kernel runs the handler and then restarts
        // the call or returns EINTR as SA_RESTART says, or stops, or dies: exactly what a native
        // blocking call does (signal(7)).
        *interrupted = true;
        return kj::mv(*r);
      }
      // The guest blocks or ignores that signal: a native call would not have been
      // interrupted, so run it again at home.
      continue;
    }
    return nullptr;
  }
}

kj::Maybe<kj::Own<capnp::MessageReader>> Supervisor::callHome(capnp::MallocMessageBuilder& request,
                                                              uint64_t seq) {
  if (!deferred_.empty() && current_ != nullptr && current_->id == seq &&
      !neverInterrupted(current_->data.nr)) {
    // Home signals the guest has not taken yet arrived before this call: it is cut short
    // before it starts, as natively by a signal pending at its entry; respond() lets the guest
    // take them and restart the call or return EINTR (guest_signal.h). Not a call that never
    // blocks (close, dup2, pipe): natively it runs whatever is pending, and the signals go with
    // its answer.
    return nullptr;
  }
  if (moveDue() && current_ != nullptr && current_->id == seq) {
    // A move is due: the call does not start here; it restarts after the move.
    return nullptr;
  }
  if (forkHost_ != nullptr && current_ != nullptr && current_->id == seq &&
      takesSignalMask(current_->data.nr) && guestHasSignalToTake(true)) {
    // A signal that was pending, blocked, when the guest entered a call whose own mask opens
    // it: natively the call sees it at once and fails EINTR after the handler (pselect(2));
    // the kernel never saw that mask here (the notification comes first), so the call is cut
    // short before it starts and respond() lets the guest take it under the call's mask.
    return nullptr;
  }
  bool interrupted;
  KJ_IF_MAYBE (reply, roundTrip(request, seq, &interrupted)) {
    if (interrupted) {
      return nullptr;
    }
    return kj::mv(*reply);
  }
  endJob(0);
}

Answer Supervisor::forwardRegular(const seccomp_notif& notif, const ArgSpec (&specs)[6]) {
  uint64_t args[6];
  for (int i = 0; i < 6; i++) {
    args[i] = notif.data.args[i];
  }
  GuestMemory& memory = guestProcess_->memory();
  // A small first segment: most requests are a few words; bulk data gets its own segment.
  capnp::MallocMessageBuilder message(128);
  auto request = message.initRoot<proto::ToDeputy>().initSyscall();
  request.setSeq(notif.id);
  int err = marshalRequest(notif.data.nr, specs, args, memory, request);
  if (err != 0) {
    return Answer::of(-err);
  }
  bool readMemory = request.getIn().size() > 0;
  if (readMemory && !idValid(notif.id)) {
    // The memory we read may belong to a task that is no longer the one that trapped.
    return Answer::drop();
  }
  if (KJ_UNLIKELY(trace_->active())) {
    traceRequestPayloads(*trace_, specs, args, request.asReader());
  }
  const SyscallEntry* entry = findSyscall(notif.data.nr);
  if (entry != nullptr &&
      (entry->onNode == OnNode::SHM_PATH || entry->onNode == OnNode::SHM_OPEN)) {
    KJ_IF_MAYBE (answer, runJobShmCall(notif, *entry, specs, request.asReader())) {
      return *answer;
    }
  }
  if (entry != nullptr && entry->handler == HandlerId::OPEN) {
    // The path is already in the request: an open of the job's own /proc files is served here.
    KJ_IF_MAYBE (open, describeOpen(specs, args, request.asReader())) {
      KJ_IF_MAYBE (answer, serveJobProcFile(notif, open->path, open->dirfd, open->flags)) {
        trace_->setRoute(TraceRoute::LOCAL_ANSWER);
        return *answer;
      }
    }
  }
  KJ_IF_MAYBE (reply, callHome(message, notif.id)) {
    auto r = (*reply)->getRoot<proto::ToRemote>().getReply();
    if (r.getOut().size() > 0 && !idValid(notif.id)) {
      return Answer::drop();
    }
    int64_t result = unmarshalReply(notif.data.nr, specs, args, r, memory);
    if (KJ_UNLIKELY(trace_->active())) {
      traceReplyPayloads(*trace_, specs, message.getRoot<proto::ToDeputy>().getSyscall(), r,
                         result);
    }
    return Answer::of(result);
  }
  return Answer::interrupted(notif.data.nr);
}

void Supervisor::onIdleMessage() {
  kj::Maybe<kj::Own<capnp::MessageReader>> message;
  try {
    message = channel_.receive();
  } catch (kj::Exception& e) {
    spdlog::warn("job {}: channel to the deputy failed: {}", start_.getIds().getPid(),
                 e.getDescription().cStr());
    endJob(0);
  }
  KJ_IF_MAYBE (m, message) {
    auto root = (*m)->getRoot<proto::ToRemote>();
    if (root.isSignal()) {
      deliverSignal(root);
      flushDeferred();
    } else if (root.isMove()) {
      onMoveRequest(root.getMove());  // run by the next turn
    } else {
      spdlog::debug("message from the deputy outside a call, ignored");
    }
  } else {
    // The deputy is gone (killed, or its home node died): the guest must not outlive it.
    spdlog::info("job {}: the deputy closed the channel; ending the guest",
                 start_.getIds().getPid());
    endJob(0);
  }
}

void Supervisor::deliverSignal(proto::ToRemote::Reader message) {
  auto bytes = message.getSignalInfo();
  siginfo_t info;
  bool whole = bytes.size() == sizeof(info);
  if (whole) {
    memcpy(&info, bytes.begin(), sizeof(info));
  }
  deliverSignal(message.getSignal(), message.getSignalPid(), message.getSignalStatus(),
                whole ? &info : nullptr, message.getSignalThread());
}

void Supervisor::deliverSignal(int sig, int32_t fromPid, int32_t status, const siginfo_t* info,
                               bool toThread) {
  if (sig == SIGCONT && !toThread) {
    continuesReceived_++;
    // The kernel discards a pending stop signal when SIGCONT is generated (signal(7);
    // prepare_signal): a deferred SIGTSTP queued after this SIGCONT would stop the guest after
    // fg, for good.
    std::erase_if(deferred_, [](const siginfo_t& info) { return isStopSignal(info.si_signo); });
  }
  if (sig <= 0 || sig >= 65 || guest_ <= 0) {
    return;
  }
  spdlog::debug("signal {} to guest {}", sig, guest_);
  if (sig != SIGKILL && sig != SIGSTOP && sig != SIGCONT) {
    // A signal the guest ignores and does not block (SIG_IGN: the SIGINT of a background job)
    // is discarded when it is generated (signal(7); the kernel's sig_ignored): queueing it would
    // only disturb the call the guest waits in.
    std::string status = guestProcess_->procFile("status");
    uint64_t bit = uint64_t{1} << (sig - 1);
    if ((statusMask(status, "SigIgn:") & ~statusMask(status, "SigBlk:") & bit) != 0) {
      return;
    }
  }
  if (toThread) {
    guestProcess_->queueThreadSignal(sig);  // tgkill at home named this task's deputy thread
    return;
  }
  siginfo_t home = {};
  if (info != nullptr) {
    home = *info;
  } else {
    home.si_code = SI_USER;
    if (sig == SIGCHLD && fromPid > 0) {
      home.si_code = CLD_EXITED;
      home.si_pid = fromPid;
      home.si_uid = start_.getIds().getUid();
      home.si_status = status;
    }
  }
  home.si_signo = sig;
  if (forkHost_ != nullptr && info != nullptr && sig != SIGKILL && sig != SIGCONT) {
    // The guest queues it itself, with this siginfo (flushDeferred, or respond).
    deferred_.push_back(home);
    return;
  }
  queueFromOutside(home);
}

void Supervisor::queueFromOutside(const siginfo_t& home) {
  int sig = home.si_signo;
  // Queued only: a guest inside a received notification waits killably, so the signal acts when
  // that call is answered (roundTrip), or at once if the guest is computing.
  if (sig == SIGCHLD && home.si_pid > 0) {
    // The home child's pid as si_pid (a handler may compare it with fork's result). The kernel
    // lets only a process itself queue CLD_* codes, so si_code reads SI_QUEUE; si_status is in
    // si_value's place. Queued from inside the job's pid namespace (the kernel zeroes si_pid
    // of a signal from outside); from here when there is no namespace (tests).
    if (forkHost_ != nullptr &&
        forkHost_->queueFromInside(start_.getIds().getPid(), sig, home.si_pid,
                                   start_.getIds().getUid(), home.si_status)) {
      return;
    }
    siginfo_t info = {};
    info.si_signo = SIGCHLD;
    info.si_code = SI_QUEUE;
    info.si_pid = home.si_pid;
    info.si_uid = start_.getIds().getUid();
    info.si_value.sival_int = home.si_status;
    guestProcess_->queueSignal(sig, &info);
    return;
  }
  guestProcess_->queueSignal(sig, nullptr);
}

bool Supervisor::guestGone() {
  std::string status = guestProcess_->procFile("status");
  if (status.empty()) {
    return true;
  }
  size_t at = status.find("State:\t");
  return at != std::string::npos && at + 7 < status.size() &&
         (status[at + 7] == 'Z' || status[at + 7] == 'X');
}

void Supervisor::flushDeferred() {
  if (deferred_.empty() || forkHost_ == nullptr || guest_ <= 0) {
    return;
  }
  std::vector<siginfo_t> signals = std::move(deferred_);
  deferred_.clear();
  switch (forkHost_->queueAsGuest(guest_, signals, nullptr)) {
    case InjectOutcome::DONE:
    case InjectOutcome::GONE: return;
    case InjectOutcome::BUSY:
      // A notification of the guest waits in our queue: they go with its answer.
      deferred_ = std::move(signals);
      return;
    case InjectOutcome::STOPPED:
    case InjectOutcome::FAILED:
      for (const siginfo_t& info : signals) {
        queueFromOutside(info);
      }
      return;
  }
}

kj::Maybe<uint64_t> Supervisor::currentCallMask() {
  if (current_ == nullptr) {
    return nullptr;
  }
  uint64_t args[6];
  for (int i = 0; i < 6; i++) {
    args[i] = current_->data.args[i];
  }
  GuestMemory& memory = guestProcess_->memory();
  return callSignalMask(current_->data.nr, args, [&](uint64_t at, void* out, size_t bytes) {
    return memory.read(RemotePtr<void>(at),
                       std::span<uint8_t>(static_cast<uint8_t*>(out), bytes)) == 0;
  });
}

bool Supervisor::guestHasSignalToTake(bool underCallMaskOnly) {
  std::string status = guestProcess_->procFile("status");
  uint64_t pending = statusMask(status, "SigPnd:") | statusMask(status, "ShdPnd:");
  if (pending == 0) {
    return false;
  }
  // Inside a call with a signal mask of its own (pselect6, ppoll, epoll_pwait), that mask is
  // the one the native call would wait under: a SIGCHLD that make blocks while it computes
  // interrupts its pselect6, whose mask opens it. Only where the guest can take a signal under
  // that mask (respond's session needs the family host).
  if (forkHost_ != nullptr) {
    KJ_IF_MAYBE (mask, currentCallMask()) {
      return (pending & ~*mask) != 0;
    }
  }
  return !underCallMaskOnly && (pending & ~statusMask(status, "SigBlk:")) != 0;
}

void Supervisor::onChildEvent() {
  for (;;) {
    int status;
    KJ_IF_MAYBE (event, guestProcess_->nextEvent()) {
      status = *event;
    } else {
      return;
    }
    if (threadTask_) {
      // The guest thread ended: its deputy thread ends when the channel closes. The process's
      // end is reported by its leader's task.
      guest_ = -1;
      endJob(0);
    }
    capnp::MallocMessageBuilder message;
    auto root = message.initRoot<proto::ToDeputy>();
    if (WIFSTOPPED(status)) {
      root.setStopped(WSTOPSIG(status));
      root.setStoppedAfterContinues(continuesReceived_);
      channel_.send(message);
      continue;
    }
    if (WIFCONTINUED(status)) {
      root.setContinued();
      channel_.send(message);
      continue;
    }
    auto exit = root.initExit();
    spdlog::info("job {}: guest {} {} {}", start_.getIds().getPid(), guest_,
                 WIFSIGNALED(status) ? "killed by signal" : "exited with status",
                 WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    if (WIFSIGNALED(status)) {
      exit.setSignal(WTERMSIG(status));
      exit.setCoreDumped(WCOREDUMP(status));
    } else {
      exit.setStatus(WEXITSTATUS(status));
    }
    guest_ = -1;
    try {
      channel_.send(message);
      // Wait for the deputy to act on it and close, so a reply it is still sending never
      // meets a closed socket (which it would take for a node death).
      struct pollfd pfd = {channel_.fd(), POLLIN, 0};
      for (int i = 0; i < 100; i++) {
        if (!channel_.hasBuffered() && poll(&pfd, 1, 100) <= 0) {
          continue;
        }
        if (channel_.receive() == nullptr) {
          break;
        }
      }
    } catch (kj::Exception& e) {
      spdlog::debug("deputy gone after exit: {}", e.getDescription().cStr());
    }
    endJob(0);
  }
}

void Supervisor::endJob(int status) {
  // A thread's task leaves the process to its leader's task: a deputy thread ends only with its
  // guest thread or with the whole deputy (then the leader's channel closes too).
  if (guest_ > 0 && !threadTask_) {
    guestProcess_->kill();
  }
  pidNamespace_ = JobPidNamespace();
  record_.unlink();
  exit_(status);
  abort();  // exit_ does not return
}

void Supervisor::countRoute(const seccomp_notif& notif, uint64_t homeCallsBefore,
                            uint64_t startNs) {
  JobRecord* record = record_.get();
  if (record == nullptr) {
    return;  // a child task: its guest has no record here yet
  }
  // Indexes as TraceRoute: forwarded, emulated, localAnswer, denied.
  int route = 2;
  const SyscallEntry* entry = notif.data.arch == AUDIT_ARCH_X86_64 && notif.data.nr >= 0
                                  ? findSyscall(static_cast<int>(notif.data.nr))
                                  : nullptr;
  if (homeCalls_ != homeCallsBefore) {
    route = 0;
  } else if (entry == nullptr || entry->route == Route::DENY) {
    route = 3;
  } else if (entry->route == Route::EMULATE) {
    route = 1;
  }
  countCall(record->stats.routes[route], (realtimeNs() - startNs) / 1000);
}

}  // namespace mos::remote
