#include "guest_family.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ptrace.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <capnp/serialize.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "channel.h"
#include "guest_fork.h"
#include "stay_reason.h"

namespace mos::remote {

namespace {

constexpr int ERESTARTNOINTR = 513;             // include/linux/errno.h
constexpr unsigned PIDFD_THREAD_FLAG = O_EXCL;  // PIDFD_THREAD, linux/pidfd.h (Linux 6.9)
constexpr size_t TOKEN_BYTES = 32;
constexpr int CHILD_HELLO_MS = 5000;
// How long a child guest waits for its deputy's channel before it is killed (its home deputy
// could not connect: it exits 112 at home).
constexpr int CHILD_CHANNEL_MS = 15000;
// How long a move waits for the other threads of the process to leave their calls at home and
// park (each task cancels its call at once, and again every 50 ms).
constexpr int PARK_MS = 10000;

// A message reader that owns its flat array.
struct WordsHolder {
  kj::Array<capnp::word> words;
};
class OwnedFlatReader : private WordsHolder, public capnp::FlatArrayMessageReader {
 public:
  explicit OwnedFlatReader(kj::Array<capnp::word> words)
      : WordsHolder{kj::mv(words)}, capnp::FlatArrayMessageReader(this->words) {}
};

// The JobStart of a child task: the parent's, with the child's home pid and tid.
kj::Own<capnp::MessageReader> childJobStart(proto::JobStart::Reader parent, pid_t homePid,
                                            pid_t homeTid) {
  capnp::MallocMessageBuilder message;
  auto start = message.initRoot<proto::JobStart>();
  start.setHomeNode(parent.getHomeNode());
  start.setIds(parent.getIds());
  start.getIds().setPid(homePid);
  start.getIds().setTid(homeTid);
  start.setCommand(parent.getCommand());
  return kj::heap<OwnedFlatReader>(capnp::messageToFlatArray(message));
}

bool isExitStatus(int status) { return WIFEXITED(status) || WIFSIGNALED(status); }

// The state letter of /proc/PID/stat (R, S, D, T, t, Z...), or 0 when it is unreadable.
char processState(pid_t pid) {
  std::string stat = readNodeProcFile(pid, "stat");
  size_t close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() ? stat[close + 2] : 0;
}

}  // namespace

template <typename T>
PollQueue<T>::PollQueue() {
  int fd;
  KJ_SYSCALL(fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK | EFD_SEMAPHORE));
  event_ = kj::AutoCloseFd(fd);
}

template <typename T>
void PollQueue<T>::push(T value) {
  std::lock_guard<std::mutex> lock(mutex_);
  values_.push_back(std::move(value));
  uint64_t one = 1;
  (void)!write(event_.get(), &one, sizeof(one));
}

template <typename T>
kj::Maybe<T> PollQueue<T>::pop() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (values_.empty()) {
    return nullptr;
  }
  uint64_t one;
  (void)!read(event_.get(), &one, sizeof(one));
  T value = std::move(values_.front());
  values_.pop_front();
  return kj::mv(value);
}

template <typename T>
bool PollQueue<T>::empty() {
  std::lock_guard<std::mutex> lock(mutex_);
  return values_.empty();
}

struct GuestFamily::Call {
  const std::function<void()>* work;
  std::mutex mutex;
  std::condition_variable done;
  bool finished = false;
  kj::Maybe<kj::Exception> error;
};

template class PollQueue<int>;
template class PollQueue<seccomp_notif>;
template class PollQueue<GuestFamily::Call*>;

int RoutedUnotify::receive(seccomp_notif& notif) {
  KJ_IF_MAYBE (next, queue_.pop()) {
    notif = *next;
    return 0;
  }
  return ENOENT;
}

void RoutedGuest::queueSignal(int sig, const siginfo_t* info) {
  if (info == nullptr) {
    ::kill(tgid_, sig);
  } else {
    syscall(SYS_rt_sigqueueinfo, tgid_, sig, info);
  }
}

void RoutedGuest::queueThreadSignal(int sig) { syscall(SYS_tgkill, tgid_, pid_, sig); }

std::string RoutedGuest::procFile(const std::string& name) { return readNodeProcFile(pid_, name); }

kj::Maybe<int> RoutedGuest::nextEvent() {
  if (threadEnd_.get() < 0) {
    return events_.pop();
  }
  struct pollfd pfd = {threadEnd_.get(), POLLIN, 0};
  if (threadEndReported_ || poll(&pfd, 1, 0) <= 0) {
    return nullptr;
  }
  threadEndReported_ = true;
  return 0;  // "exited 0": the task ends; only the process's end is the job's status
}

void RoutedGuest::kill() { ::kill(tgid_, SIGKILL); }

GuestFamily::GuestFamily(SupervisorOptions options, kj::Own<SeccompUnotify> listener,
                         kj::AutoCloseFd sigchld, JobPidNamespace pidNamespace)
    : options_(std::move(options)),
      listener_(kj::mv(listener)),
      sigchld_(kj::mv(sigchld)),
      pidNamespace_(kj::mv(pidNamespace)) {}

GuestFamily::~GuestFamily() noexcept(false) {}

GuestFamily::Task* GuestFamily::findTask(pid_t pid) {
  auto it = tasks_.find(pid);
  return it == tasks_.end() ? nullptr : it->second.get();
}

void GuestFamily::run(Supervisor& first, pid_t pid, std::vector<std::pair<pid_t, pid_t>> threads) {
  firstChannelFd_ = first.channelFd();
  firstStart_ = first.jobStart();
  auto task = std::make_unique<Task>();
  task->pid = pid;
  task->tgid = pid;
  task->homePid = firstStart_.getIds().getPid();
  task->homeTid = task->homePid;
  auto unotify = kj::heap<RoutedUnotify>(*listener_);
  auto guest = kj::heap<RoutedGuest>(pid);
  task->unotify = unotify.get();
  task->guest = guest.get();
  first.becomeTask(
      kj::mv(unotify), kj::mv(guest), [](int status) { throw TaskEnded{status}; }, this);
  task->supervisor = &first;
  Task* t = task.get();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    tasks_[pid] = std::move(task);
  }
  if (!threads.empty()) {
    adoptRestoredThreads(first, *t, threads);
  }
  startWorker(*t);
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = tasks_.begin(); it != tasks_.end();) {
        Task& each = *it->second;
        if (each.ended && each.isThread) {
          // A thread is never reaped; a SIGKILL would end its whole process.
          each.reaped = true;
        }
        if (each.ended && !each.reaped && each.pid > 0) {
          ::kill(each.pid, SIGKILL);  // the main thread reaps it
        }
        if (each.ended && each.reaped) {
          if (each.thread.joinable()) {
            each.thread.join();
          }
          it = tasks_.erase(it);
        } else {
          ++it;
        }
      }
      if (tasks_.empty()) {
        return;
      }
    }
    struct pollfd fds[5] = {{listener_->fd(), POLLIN, 0},
                            {sigchld_.get(), POLLIN, 0},
                            {work_.fd(), POLLIN, 0},
                            {wake_.fd(), POLLIN, 0},
                            {childListener_.get(), POLLIN, 0}};
    int n = poll(fds, childListener_.get() >= 0 ? 5 : 4, expireChildren());
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      KJ_FAIL_SYSCALL("poll", errno);
    }
    if (fds[1].revents & POLLIN) {
      reapChildren();
    }
    if (fds[0].revents & POLLIN) {
      serveListener();
    }
    if (fds[2].revents & POLLIN) {
      KJ_IF_MAYBE (call, work_.pop()) {
        Call* c = *call;
        try {
          (*c->work)();
        } catch (kj::Exception& e) {
          c->error = kj::mv(e);
        }
        std::lock_guard<std::mutex> lock(c->mutex);
        c->finished = true;
        c->done.notify_all();
      }
    }
    if (fds[3].revents & POLLIN) {
      while (wake_.pop() != nullptr) {
      }
    }
    if (n > 0 && childListener_.get() >= 0 && (fds[4].revents & POLLIN)) {
      acceptChild();
    }
  }
}

int GuestFamily::expireChildren() {
  std::lock_guard<std::mutex> lock(mutex_);
  auto now = std::chrono::steady_clock::now();
  int timeout = -1;
  for (auto& [pid, task] : tasks_) {
    if (!task->awaitingChannel) {
      continue;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    task->bornAt + std::chrono::milliseconds(CHILD_CHANNEL_MS) - now)
                    .count();
    if (left > 0) {
      timeout = timeout < 0 ? static_cast<int>(left) : std::min(timeout, static_cast<int>(left));
      continue;
    }
    spdlog::warn("job {}: no channel from the deputy of child {} within {} ms; its guest ends",
                 firstStart_.getIds().getPid(), task->homePid, CHILD_CHANNEL_MS);
    task->awaitingChannel = false;
    task->ended = true;
    ::kill(task->pid, SIGKILL);
    for (auto it = expected_.begin(); it != expected_.end(); ++it) {
      if (it->task == task.get()) {
        expected_.erase(it);
        break;
      }
    }
  }
  return timeout;
}

void GuestFamily::onMain(const std::function<void()>& work) {
  Call call;
  call.work = &work;
  work_.push(&call);
  std::unique_lock<std::mutex> lock(call.mutex);
  call.done.wait(lock, [&] { return call.finished; });
  KJ_IF_MAYBE (e, call.error) {
    kj::throwFatalException(kj::mv(*e));
  }
}

void GuestFamily::serveListener() {
  seccomp_notif notif;
  if (listener_->receive(notif) != 0) {
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  Task* task = findTask(static_cast<pid_t>(notif.pid));
  if (task == nullptr) {
    spdlog::warn("notification of unknown task {} (syscall {}); refused", notif.pid, notif.data.nr);
    seccomp_notif_resp resp = {};
    resp.id = notif.id;
    resp.error = -ENOSYS;
    (void)listener_->send(resp);
    return;
  }
  if (task->ended) {
    return;  // being killed
  }
  task->unotify->push(notif);
}

void GuestFamily::route(pid_t pid, int status) {
  if (pidNamespace_.isReaper(pid)) {
    spdlog::warn("the reaper of the job's pid namespace died");
    pidNamespace_.reaped();
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  Task* task = findTask(pid);
  if (task == nullptr) {
    return;
  }
  if (isExitStatus(status)) {
    task->reaped = true;
  }
  if (!task->ended) {
    task->guest->push(status);
  }
}

void GuestFamily::reapChildren() {
  struct signalfd_siginfo info;
  while (read(sigchld_.get(), &info, sizeof(info)) == sizeof(info)) {
  }
  for (;;) {
    int status;
    pid_t pid = waitpid(-1, &status, WNOHANG | WUNTRACED | WCONTINUED | __WALL);
    if (pid <= 0) {
      return;
    }
    route(pid, status);
  }
}

int GuestFamily::waitTraced(pid_t pid) {
  for (;;) {
    int status;
    pid_t got = waitpid(pid, &status, __WALL);
    if (got < 0) {
      if (errno == EINTR) {
        continue;
      }
      return -1;
    }
    if (isExitStatus(status)) {
      route(pid, status);
    }
    return status;
  }
}

void GuestFamily::startWorker(Task& task) {
  task.started = true;
  task.thread = std::thread([this, t = &task] { workerBody(t); });
}

void GuestFamily::workerBody(Task* task) {
  try {
    task->supervisor->serveTask();
  } catch (TaskEnded&) {
  } catch (kj::Exception& e) {
    spdlog::error("task {}: {}", task->homePid, e.getDescription().cStr());
  }
  task->supervisor->unlinkRecord();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    task->ended = true;
    if (!task->isThread) {
      releaseParks(task->tgid);  // a move of its process, if one was under way, is over
    }
  }
  wake_.push(0);
}

uint16_t GuestFamily::childPort() {
  if (childListener_.get() >= 0) {
    return childPort_;
  }
  sockaddr_storage address;
  socklen_t length = sizeof(address);
  KJ_SYSCALL(getsockname(firstChannelFd_, reinterpret_cast<sockaddr*>(&address), &length));
  if (address.ss_family == AF_INET) {
    reinterpret_cast<sockaddr_in*>(&address)->sin_port = 0;
  } else if (address.ss_family == AF_INET6) {
    reinterpret_cast<sockaddr_in6*>(&address)->sin6_port = 0;
  }
  int fd;
  KJ_SYSCALL(fd = socket(address.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  childListener_ = kj::AutoCloseFd(fd);
  KJ_SYSCALL(bind(fd, reinterpret_cast<sockaddr*>(&address), length));
  KJ_SYSCALL(listen(fd, 64));
  length = sizeof(address);
  KJ_SYSCALL(getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length));
  childPort_ =
      ntohs(address.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&address)->sin_port
                                         : reinterpret_cast<sockaddr_in6*>(&address)->sin6_port);
  return childPort_;
}

void GuestFamily::acceptChild() {
  int fd = accept4(childListener_.get(), nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0) {
    return;
  }
  kj::AutoCloseFd socket(fd);
  struct timeval timeout = {CHILD_HELLO_MS / 1000, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  kj::byte hello[8 + TOKEN_BYTES + 4];
  if (recv(fd, hello, sizeof(hello), MSG_WAITALL) != static_cast<ssize_t>(sizeof(hello)) ||
      memcmp(hello, HELLO_CHILD, 8) != 0) {
    spdlog::warn("a child channel without a valid hello; closed");
    return;
  }
  timeout = {0, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  std::string token(reinterpret_cast<const char*>(hello + 8), TOKEN_BYTES);
  int32_t homePid;
  memcpy(&homePid, hello + 8 + TOKEN_BYTES, 4);
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = expected_.begin(); it != expected_.end(); ++it) {
    if (it->token != token) {
      continue;
    }
    if (it->homePid != 0 && it->homePid != homePid) {
      spdlog::warn("a child channel for home pid {} with the token of {}; closed", homePid,
                   it->homePid);
      return;
    }
    tuneJobSocket(fd);
    if (it->task != nullptr) {
      Task* task = it->task;
      expected_.erase(it);
      attachChannel(*task, kj::mv(socket));
    } else {
      it->fd = kj::mv(socket);
    }
    return;
  }
  spdlog::warn("a child channel with an unknown token; closed");
}

void GuestFamily::attachChannel(Task& task, kj::AutoCloseFd fd) {
  task.awaitingChannel = false;
  if (task.heldStopped) {
    // A restored thread: served from now on, it runs (its tracer is this, the main thread).
    task.heldStopped = false;
    ptrace(PTRACE_DETACH, task.pid, 0, 0);
  }
  SupervisorOptions options = options_;
  options.fd = fd.release();
  task.ownedSupervisor = kj::heap<Supervisor>(
      options, childJobStart(firstStart_, task.homePid, task.homeTid), kj::mv(task.pendingUnotify),
      kj::mv(task.pendingGuest), [](int status) { throw TaskEnded{status}; });
  task.supervisor = task.ownedSupervisor.get();
  task.supervisor->setForkHost(this);
  task.supervisor->setThreadTask(task.isThread);
  if (task.parkRequested) {
    task.supervisor->requestPark();  // its process is being moved: it parks at once
  }
  task.supervisor->recordChildGuest();
  if (auto it = inheritedNodeFds_.find(task.homePid); it != inheritedNodeFds_.end()) {
    task.supervisor->inheritNodeFds(kj::mv(it->second));
    inheritedNodeFds_.erase(it);
  }
  if (auto it = inheritedHomePaths_.find(task.homePid); it != inheritedHomePaths_.end()) {
    task.supervisor->inheritHomePaths(kj::mv(it->second));
    inheritedHomePaths_.erase(it);
  }
  startWorker(task);
}

void GuestFamily::adoptRestoredThreads(Supervisor& first, Task& leader,
                                       const std::vector<std::pair<pid_t, pid_t>>& threads) {
  uint16_t port = childPort();
  for (auto [tid, homeTid] : threads) {
    std::string token(TOKEN_BYTES, '\0');
    KJ_SYSCALL(getrandom(token.data(), token.size(), 0));
    auto created = std::make_unique<Task>();
    created->pid = tid;
    created->homePid = leader.homePid;
    created->homeTid = homeTid;
    created->tgid = leader.pid;
    created->isThread = true;
    created->heldStopped = true;
    created->pendingUnotify = kj::heap<RoutedUnotify>(*listener_);
    int pidfd = static_cast<int>(syscall(SYS_pidfd_open, tid, PIDFD_THREAD_FLAG));
    if (pidfd < 0) {
      spdlog::warn("pidfd_open(PIDFD_THREAD) of guest thread {}: {}; its end goes unnoticed", tid,
                   strerror(errno));
    }
    created->pendingGuest = kj::heap<RoutedGuest>(tid, leader.pid, kj::AutoCloseFd(pidfd));
    created->unotify = created->pendingUnotify.get();
    created->guest = created->pendingGuest.get();
    created->awaitingChannel = true;
    created->bornAt = std::chrono::steady_clock::now();
    Task* c = created.get();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      tasks_[tid] = std::move(created);
      expected_.push_back(Expected{token, homeTid, kj::AutoCloseFd(), c});
    }
    int64_t got = -EAGAIN;
    try {
      got = first.askDeputyToFork(
          0, port, kj::arrayPtr(reinterpret_cast<const kj::byte*>(token.data()), token.size()),
          true, homeTid);
    } catch (TaskEnded&) {
      got = -EPIPE;  // the deputy is gone: so is the job
    }
    if (got != homeTid) {
      spdlog::error(
          "job {}: no deputy thread at home tid {} for guest thread {} ({}); the job ends",
          leader.homePid, homeTid, tid, got < 0 ? strerror(static_cast<int>(-got)) : "");
      ::kill(leader.pid, SIGKILL);  // its threads die with it; every task then ends
      return;
    }
    spdlog::debug("job {}: restored guest thread {} at home tid {}", leader.homePid, tid, homeTid);
  }
}

Answer GuestFamily::forkGuest(Supervisor& supervisor, const seccomp_notif& notif) {
  Task* task;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    task = findTask(static_cast<pid_t>(notif.pid));
  }
  KJ_ASSERT(task != nullptr);
  bool restarted =
      task->forkPending && notif.data.nr == __NR_clone && (notif.data.args[0] & CLONE_PARENT) != 0;
  task->forkPending = false;
  if (!restarted) {
    // Step 1 (docs/design.md, "Fork mirroring"): not yet a clone(CLONE_PARENT).
    user_regs_struct probe = {};
    probe.orig_rax = notif.data.nr;
    probe.rdi = notif.data.args[0];
    switch (rewriteAsSiblingClone(probe)) {
      case ForkKind::PROCESS: break;
      case ForkKind::THREAD: return cloneThread(supervisor, *task, notif);
      case ForkKind::UNSUPPORTED:
        return supervisor.unsupported(notif, EINVAL, "clone flags a guest may not use");
    }
    Answer answer = Answer::drop();
    onMain([&] { answer = interruptForRewrite(*task, notif); });
    return answer;
  }
  // Step 3: the restarted clone.
  return mirrorClone(supervisor, *task, notif, false);
}

Answer GuestFamily::cloneThread(Supervisor& supervisor, Task& task, const seccomp_notif& notif) {
  constexpr unsigned long REFUSED = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC |
                                    CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_PIDFD |
                                    CLONE_VFORK | CLONE_PARENT;
  unsigned long flags = notif.data.args[0];
  if ((flags & REFUSED) != 0 ||
      (flags & (CLONE_VM | CLONE_SIGHAND)) != (CLONE_VM | CLONE_SIGHAND)) {
    return supervisor.unsupported(notif, EINVAL, "clone flags a guest thread may not use");
  }
  return mirrorClone(supervisor, task, notif, true);
}

Answer GuestFamily::mirrorClone(Supervisor& supervisor, Task& parent, const seccomp_notif& notif,
                                bool thread) {
  Task* task = &parent;
  // The deputy forks (or starts a thread) first; the child's channel is expected.
  std::lock_guard<std::mutex> forkLock(forkMutex_);
  std::string token(TOKEN_BYTES, '\0');
  KJ_SYSCALL(getrandom(token.data(), token.size(), 0));
  uint16_t port = 0;
  onMain([&] {
    port = childPort();
    std::lock_guard<std::mutex> lock(mutex_);
    expected_.push_back(Expected{token});
  });
  int64_t home = supervisor.askDeputyToFork(
      notif.id, port, kj::arrayPtr(reinterpret_cast<const kj::byte*>(token.data()), token.size()),
      thread);
  auto forget = [&] {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = expected_.begin(); it != expected_.end(); ++it) {
      if (it->token == token) {
        expected_.erase(it);
        return;
      }
    }
  };
  if (home <= 0) {
    forget();
    if (home == -EINTR) {
      // A signal for the guest came first (no home child exists): fork restarts after its
      // handler, as natively (kernel/fork.c answers -ERESTARTNOINTR), never EINTR.
      return Answer::of(-ERESTARTNOINTR);
    }
    return Answer::of(home < 0 ? home : -EAGAIN);
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& e : expected_) {
      if (e.token == token) {
        e.homePid = static_cast<pid_t>(home);
      }
    }
  }
  {
    // The child's fd table is a copy of the parent's: so is its set of node-local descriptors.
    std::lock_guard<std::mutex> lock(mutex_);
    inheritedNodeFds_[static_cast<pid_t>(home)] = supervisor.nodeFds();
    inheritedHomePaths_[static_cast<pid_t>(home)] = supervisor.homePaths();
  }
  pid_t child = -1;
  onMain([&] { child = runFork(*task, notif, static_cast<pid_t>(home), token, thread); });
  if (child <= 0) {
    // Its deputy (child or thread) finds its channel closed, or never accepted.
    forget();
    spdlog::error("job {}: the {} of guest {} failed here; home {} {} has no guest",
                  firstStart_.getIds().getPid(), thread ? "thread creation" : "fork", task->homeTid,
                  thread ? "thread" : "child", home);
  }
  return Answer::drop();
}

bool GuestFamily::queueFromInside(pid_t homePid, int sig, pid_t fromPid, uid_t uid, int value) {
  std::lock_guard<std::mutex> reaperLock(reaperMutex_);
  return pidNamespace_.queueSignal(homePid, sig, fromPid, uid, value) == 0;
}

bool GuestFamily::isThreadOf(pid_t homePid, pid_t homeTid) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [pid, task] : tasks_) {
    if (task->homePid == homePid && task->homeTid == homeTid && !task->ended) {
      return true;
    }
  }
  return false;
}

InjectOutcome GuestFamily::queueAsGuest(pid_t pid, const std::vector<siginfo_t>& signals,
                                        kj::Maybe<PendingAnswer> answer) {
  InjectOutcome outcome = InjectOutcome::FAILED;
  onMain([&] {
    InjectRequest request;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Task* task = findTask(pid);
      if (task == nullptr || task->ended) {
        outcome = InjectOutcome::GONE;
        return;
      }
      // Only this thread receives notifications, so none can become received-and-unanswered
      // (a wait only SIGKILL ends) while the session runs; one already queued would block the
      // session's interrupt.
      if (answer == nullptr && task->unotify->hasQueued()) {
        outcome = InjectOutcome::BUSY;
        return;
      }
      // A guest in an uninterruptible or killable wait (a vfork parent until its child execs or
      // exits) would not stop for the interrupt, and this thread would wait for it while the
      // child's notifications wait for this thread: later. No such wait can begin meanwhile
      // (a fork needs this thread).
      // Right after its vfork the parent is still on its way into that wait (state R), so the
      // child's liveness decides too: a session begun then waited forever for a stop while
      // the child's notifications waited for this thread (make -j2's posix_spawn hung so).
      bool inVfork = false;
      if (task->vforkChild > 0) {
        char child = processState(task->vforkChild);
        inVfork = child != 0 && child != 'Z' && child != 'X';
        if (!inVfork) {
          task->vforkChild = 0;
        }
      }
      if (answer == nullptr && (inVfork || processState(pid) == 'D')) {
        outcome = InjectOutcome::BUSY;
        return;
      }
      request.homePid = task->homePid;
    }
    request.pid = pid;
    request.signals = signals;
    request.answer = answer;
    outcome = injectSignals(request, mainHost());
  });
  return outcome;
}

InjectHost GuestFamily::mainHost() {
  InjectHost host;
  host.send = [this](uint64_t id, int64_t value) {
    seccomp_notif_resp resp = {};
    resp.id = id;
    if (value < 0 && value >= -4095) {
      resp.error = static_cast<int32_t>(value);
    } else {
      resp.val = value;
    }
    return listener_->send(resp);
  };
  host.wait = [this](pid_t p) { return waitTraced(p); };
  return host;
}

bool GuestFamily::parkSiblings(Task& leader) {
  std::unique_lock<std::mutex> lock(mutex_);
  pid_t tgid = leader.tgid;
  Task* late = nullptr;
  auto allParked = [&] {
    bool all = true;
    for (auto& [p, t] : tasks_) {
      if (t->tgid != tgid || !t->isThread || t->ended) {
        continue;
      }
      if (!t->parkRequested) {
        t->parkRequested = true;
        if (t->supervisor != nullptr && t->started) {
          t->supervisor->requestPark();
        }
      }
      if (!t->parked) {
        all = false;
        late = t.get();
      }
    }
    return all;
  };
  if (parkChanged_.wait_for(lock, std::chrono::milliseconds(PARK_MS), allParked)) {
    return true;
  }
  spdlog::warn("job {}: thread {} did not stop for the move within {} ms",
               firstStart_.getIds().getPid(), late != nullptr ? late->homeTid : 0, PARK_MS);
  releaseParks(tgid);
  return false;
}

void GuestFamily::releaseParks(pid_t tgid) {
  for (auto& [p, t] : tasks_) {
    if (t->tgid == tgid && t->isThread) {
      t->parkRequested = false;
    }
  }
  parkChanged_.notify_all();
}

bool GuestFamily::parkForMove(pid_t tid, kj::Maybe<uint64_t> heldId) {
  std::unique_lock<std::mutex> lock(mutex_);
  Task* t = findTask(tid);
  if (t == nullptr || !t->parkRequested) {
    return false;  // released before it got here
  }
  t->heldId = heldId;
  t->parked = true;
  parkChanged_.notify_all();
  parkChanged_.wait(lock, [&] { return !t->parkRequested; });
  t->parked = false;
  bool answered = heldId != nullptr && t->heldId == nullptr;
  t->heldId = nullptr;
  return answered;
}

MoveResult GuestFamily::moveCapture(pid_t pid, kj::Maybe<uint64_t> answerId, kj::OutputStream& sink,
                                    std::function<void(proto::ImageHeader::Builder)> editHeader) {
  MoveResult result;
  Task* leader;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    leader = findTask(pid);
    if (leader == nullptr || leader->ended) {
      result.outcome = MoveOutcome::GONE;
      return result;
    }
  }
  // Every other thread's task cuts its call and parks first (they may wait at home).
  if (!parkSiblings(*leader)) {
    result.reason = "a thread of the job did not leave its call at home within " +
                    std::to_string(PARK_MS / 1000) + " s";
    KJ_IF_MAYBE (id, answerId) {
      seccomp_notif_resp resp = {};
      resp.id = *id;
      resp.error = -ERESTARTNOINTR;
      (void)listener_->send(resp);
    }
    return result;
  }
  onMain([&] {
    MoveRequest request;
    std::map<pid_t, pid_t> homeTids;  // node tid -> home tid
    pid_t homePid;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Task* task = findTask(pid);
      if (task == nullptr || task->ended) {
        result.outcome = MoveOutcome::GONE;
        releaseParks(pid);
        return;
      }
      // As for a signal session (queueAsGuest): a notification already routed to the task
      // would keep the guest from stopping, and so would a wait only SIGKILL ends.
      if (answerId == nullptr && (task->unotify->hasQueued() || processState(pid) == 'D')) {
        result.outcome = MoveOutcome::BUSY;  // the other threads stay parked until the retry
        return;
      }
      homePid = task->homePid;
      homeTids[pid] = task->homeTid;
      for (auto& [p, t] : tasks_) {
        if (t->tgid != task->tgid || !t->isThread || t->ended) {
          continue;
        }
        request.threads.push_back(t->pid);
        homeTids[t->pid] = t->homeTid;
        // The call it waits in, cut at home, and one routed to it since it parked: the capture
        // answers them once the thread is interrupted.
        KJ_IF_MAYBE (id, t->heldId) {
          request.threadAnswers.push_back(*id);
          t->heldId = nullptr;
        }
        while (true) {
          seccomp_notif queued;
          if (t->unotify->receive(queued) != 0) {
            break;
          }
          request.threadAnswers.push_back(queued.id);
        }
      }
    }
    request.pid = pid;
    request.answerId = answerId;
    request.sink = &sink;
    // The capture names the threads by their node tids: the image is the job's, with home ones.
    request.editHeader = [edit = kj::mv(editHeader), homeTids, homePid,
                          pid](proto::ImageHeader::Builder header) {
      edit(header);
      KJ_REQUIRE(header.getSourcePid() == pid, "the capture is not the guest's",
                 header.getSourcePid(), pid);
      header.setSourcePid(homePid);
      for (auto thread : header.getThreads()) {
        auto home = homeTids.find(static_cast<pid_t>(thread.getTid()));
        if (home == homeTids.end()) {
          throw kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                              kj::str("its thread ", thread.getTid(),
                                      " has no task on this node (it was just created)"));
        }
        thread.setTid(home->second);
      }
    };
    result = captureForMove(request, mainHost());
    std::lock_guard<std::mutex> lock(mutex_);
    if (result.outcome == MoveOutcome::DONE) {
      capturedThreads_[pid] = request.threads;
    } else {
      releaseParks(pid);
    }
  });
  return result;
}

void GuestFamily::moveFinish(pid_t pid, bool commit) {
  onMain([&] {
    std::vector<pid_t> threads;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      threads = kj::mv(capturedThreads_[pid]);
      capturedThreads_.erase(pid);
    }
    finishMove(pid, threads, commit, mainHost());
    std::lock_guard<std::mutex> lock(mutex_);
    releaseParks(pid);
  });
}

std::string GuestFamily::moveRefusal(pid_t pid) {
  std::vector<GuestMaps> guests;
  size_t self = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Task* task = findTask(pid);
    if (task == nullptr || task->ended) {
      return "the guest has ended";
    }
    for (auto& [p, t] : tasks_) {
      if (t->ended || t->isThread) {
        continue;  // threads share their process's memory: they move with it
      }
      if (t.get() == task) {
        self = guests.size();
      }
      GuestMaps maps;
      maps.homePid = t->homePid;
      maps.shared = sharedMappings(readNodeProcFile(t->pid, "maps"));
      guests.push_back(kj::mv(maps));
    }
  }
  std::vector<std::string> reasons = stayReasons(guests);
  if (self < reasons.size() && reasons[self].rfind("shares memory", 0) == 0) {
    return "it " + reasons[self];
  }
  return "";
}

Answer GuestFamily::interruptForRewrite(Task& task, const seccomp_notif& notif) {
  pid_t g = task.pid;
  if (ptrace(PTRACE_SEIZE, g, 0, PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE) !=
      0) {
    spdlog::warn("cannot trace guest {} for its fork: {}", g, strerror(errno));
    return Answer::of(-EAGAIN);
  }
  ptrace(PTRACE_INTERRUPT, g, 0, 0);
  seccomp_notif_resp resp = {};
  resp.id = notif.id;
  resp.error = -ERESTARTNOINTR;
  if (listener_->send(resp) == ENOENT) {
    // Gone or interrupted: it stops at the interrupt anyway; let it go.
    int status = waitTraced(g);
    if (!isExitStatus(status)) {
      ptrace(PTRACE_DETACH, g, 0, 0);
    }
    return Answer::drop();
  }
  int status = waitTraced(g);
  if (status < 0 || isExitStatus(status)) {
    return Answer::drop();
  }
  user_regs_struct regs;
  ptrace(PTRACE_GETREGS, g, 0, &regs);
  user_regs_struct saved = regs;
  if (static_cast<int64_t>(regs.rax) == -ERESTARTNOINTR &&
      rewriteAsSiblingClone(regs) == ForkKind::PROCESS) {
    ptrace(PTRACE_SETREGS, g, 0, &regs);
    task.savedRegs = saved;
    task.forkPending = true;
  } else {
    spdlog::warn("guest {} not at its fork restart (rax {}); fork not mirrored", g,
                 static_cast<int64_t>(regs.rax));
  }
  ptrace(PTRACE_DETACH, g, 0, 0);
  return Answer::drop();
}

pid_t GuestFamily::runFork(Task& task, const seccomp_notif& notif, pid_t homePid,
                           const std::string& token, bool thread) {
  pid_t g = task.pid;
  if (ptrace(PTRACE_SEIZE, g, 0, PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE) !=
      0) {
    spdlog::warn("cannot trace guest {} for its fork: {}", g, strerror(errno));
    seccomp_notif_resp resp = {};
    resp.id = notif.id;
    resp.error = -EAGAIN;
    (void)listener_->send(resp);
    return -1;
  }
  int err;
  {
    std::lock_guard<std::mutex> reaperLock(reaperMutex_);
    err = pidNamespace_.setNextPid(homePid);
  }
  if (err != 0) {
    spdlog::warn("cannot place home pid {} in the job's namespace: {}", homePid, strerror(err));
  }
  seccomp_notif_resp resp = {};
  resp.id = notif.id;
  resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
  if (listener_->send(resp) == ENOENT) {
    ptrace(PTRACE_DETACH, g, 0, 0);
    return -1;
  }
  int status = waitTraced(g);
  int event = status >> 16;
  if (status < 0 || isExitStatus(status) ||
      (event != PTRACE_EVENT_FORK && event != PTRACE_EVENT_VFORK && event != PTRACE_EVENT_CLONE)) {
    spdlog::warn("guest {} did not fork (status {:#x})", g, status);
    if (status >= 0 && !isExitStatus(status)) {
      int sig = WIFSTOPPED(status) && event == 0 ? WSTOPSIG(status) : 0;
      ptrace(PTRACE_DETACH, g, 0, sig);
    }
    return -1;
  }
  unsigned long message = 0;
  ptrace(PTRACE_GETEVENTMSG, g, 0, &message);
  pid_t child = static_cast<pid_t>(message);
  // The id the job's namespace gave it (NSpid's last field) must be the home one: a tid or pid
  // still taken there (a guest not yet reaped) would make the kernel take the next free one.
  std::string procStatus = readNodeProcFile(child, "status");
  size_t nspid = procStatus.find("NSpid:");
  if (nspid != std::string::npos) {
    size_t end = procStatus.find('\n', nspid);
    size_t last = procStatus.find_last_of(" \t", end);
    pid_t inside = static_cast<pid_t>(atoi(procStatus.c_str() + last + 1));
    if (inside != homePid) {
      spdlog::error(
          "job {}: guest {} {} was given id {} in the job's namespace, not its home id {}",
          firstStart_.getIds().getPid(), thread ? "thread" : "child", child, inside, homePid);
    }
  }
  if (event == PTRACE_EVENT_VFORK) {
    task.vforkChild = child;
  }
  auto created = std::make_unique<Task>();
  created->pid = child;
  created->pendingUnotify = kj::heap<RoutedUnotify>(*listener_);
  if (thread) {
    created->homePid = task.homePid;
    created->homeTid = homePid;
    created->tgid = task.tgid;
    created->isThread = true;
    // The thread's end, which no waitpid of ours reports (it is not our child).
    int pidfd = static_cast<int>(syscall(SYS_pidfd_open, child, PIDFD_THREAD_FLAG));
    if (pidfd < 0) {
      spdlog::warn("pidfd_open(PIDFD_THREAD) of guest thread {}: {}; its end goes unnoticed", child,
                   strerror(errno));
    }
    created->pendingGuest = kj::heap<RoutedGuest>(child, task.tgid, kj::AutoCloseFd(pidfd));
  } else {
    created->homePid = homePid;
    created->homeTid = homePid;
    created->tgid = child;
    created->pendingGuest = kj::heap<RoutedGuest>(child);
  }
  created->unotify = created->pendingUnotify.get();
  created->guest = created->pendingGuest.get();
  Task* c = created.get();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    tasks_[child] = std::move(created);
  }
  int childStatus = waitTraced(child);
  for (pid_t t : {g, child}) {
    if (t == child && (childStatus < 0 || isExitStatus(childStatus))) {
      continue;
    }
    if (!thread) {  // a thread's clone was not rewritten
      user_regs_struct now;
      ptrace(PTRACE_GETREGS, t, 0, &now);
      restoreArgumentRegisters(now, task.savedRegs);
      ptrace(PTRACE_SETREGS, t, 0, &now);
    }
    ptrace(PTRACE_DETACH, t, 0, 0);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = expected_.begin(); it != expected_.end(); ++it) {
    if (it->token == token) {
      if (it->fd.get() >= 0) {
        kj::AutoCloseFd fd = kj::mv(it->fd);
        expected_.erase(it);
        attachChannel(*c, kj::mv(fd));
      } else {
        it->task = c;
        c->awaitingChannel = true;
        c->bornAt = std::chrono::steady_clock::now();
      }
      break;
    }
  }
  spdlog::debug("guest {} forked {} (home pid {})", g, child, homePid);
  return child;
}

}  // namespace mos::remote
