// A live move of the job home (issue 8; docs/design.md, "Migration of a running process"): the
// deputy's side. `migrate PID home` connects to the control socket (control.h); the deputy asks
// the supervisor (ToRemote.move), receives the migration stream of the stopped guest into a file
// of the run directory, checks it, starts a migration agent in resume mode, commits, and once
// the guest is gone execs the restore stub: the agent rebuilds the job in this very process
// (decision 1: same pid, parent, session, terminal), keeping the fd table, which is the job's.

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include <capnp/message.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "checkpoint.h"
#include "deputy.h"
#include "migrate.h"
#include "signals.h"

namespace mos::deputy {

namespace {

// Deputy-internal SIGURGs (a cancel's urgent byte: SI_KERNEL; a control connection: POLL_IN; an
// exec handoff) must not reach the job; a job's own SIGURG must.
bool isDeputySigurg(const siginfo_t& info) {
  return info.si_code == SI_KERNEL || info.si_code == POLL_IN ||
         (info.si_code == SI_QUEUE && info.si_value.sival_int == EXEC_HANDOFF_VALUE &&
          info.si_pid == getpid());
}

}  // namespace

void Deputy::serveControl() {
  if (!takeControlRequest() || control_.get() == nullptr) {
    return;
  }
  for (;;) {
    ControlSocket::Request request;
    KJ_IF_MAYBE (r, control_->accept()) {
      request = kj::mv(*r);
    } else {
      return;
    }
    int fd = request.connection.get();
    auto refuse = [&](const std::string& why) {
      replyControl(fd, "refused: " + why);
      fds_.remove(fd);
    };
    if (request.command != "home") {
      refuse("unknown request '" + request.command + "' (this deputy serves `home`)");
      continue;
    }
    if (moving()) {
      refuse("a move of this job is already in progress");
      continue;
    }
    if (!leader_) {
      refuse("not the job's main deputy");
      continue;
    }
    if (int threads = migrate::countThreads(getpid()); threads > 1) {
      refuse("it has " + std::to_string(threads) +
             " threads: only single-threaded processes move yet");
      continue;
    }
    move_ = kj::heap<MoveState>();
    move_->connection = kj::mv(request.connection);
    if (auto* r = record_.get()) {
      r->state = static_cast<uint32_t>(JobState::MIGRATING);  // mps: on its way home
    }
    spdlog::info("job {}: moving home from node {}", getpid(), options_.node);
    capnp::MallocMessageBuilder message(16);
    message.initRoot<proto::ToRemote>().initMove().setTarget(0);
    channel_->send(message);
  }
}

void Deputy::endMove(const std::string& reply) {
  if (!moving()) {
    return;
  }
  if (move_->connection.get() >= 0) {
    replyControl(move_->connection.get(), reply);
    fds_.remove(move_->connection.get());
  }
  if (move_->file.get() >= 0) {
    fds_.remove(move_->file.get());
  }
  if (!move_->path.empty()) {
    unlink(move_->path.c_str());
  }
  if (move_->agent.pid() > 0) {
    move_->agent.cancel();
  }
  move_ = nullptr;
  if (auto* r = record_.get()) {
    r->state = static_cast<uint32_t>(JobState::REMOTE);
  }
  // What the deputy kept meanwhile goes to the guest now, which runs on.
  flushSignals();
}

void Deputy::abortMove(const std::string& why) {
  spdlog::warn("job {}: the move home is refused here: {}", getpid(), why);
  capnp::MallocMessageBuilder message;
  message.initRoot<proto::ToRemote>().setMoveAbort(why);
  channel_->send(message);
  endMove("refused: " + why);
}

void Deputy::handleMoveMessage(proto::ToDeputy::Reader message) {
  if (!moving()) {
    spdlog::warn("a move message without a move in progress, ignored");
    return;
  }
  switch (message.which()) {
    case proto::ToDeputy::MOVE_REFUSED:
      endMove(std::string("refused: ") + message.getMoveRefused().cStr());
      return;
    case proto::ToDeputy::MOVE_IMAGE: {
      try {
        writeMoveImage(message.getMoveImage());
      } catch (kj::Exception& e) {
        abortMove(e.getDescription().cStr());
      }
      return;
    }
    case proto::ToDeputy::MOVE_IMAGE_END: {
      try {
        finishMoveImage(message.getMoveImageEnd());
      } catch (kj::Exception& e) {
        abortMove(e.getDescription().cStr());
      }
      return;
    }
    case proto::ToDeputy::MOVED: completeMoveHome();
    default: return;
  }
}

void Deputy::writeMoveImage(capnp::Data::Reader data) {
  MoveState& move = *move_;
  if (move.file.get() < 0 && move.path.empty()) {
    std::string dir = options_.runDir + "/images";
    makeDirectories(dir);
    move.path = dir + "/" + std::to_string(getpid()) + ".home.img";
    int fd = open(move.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    KJ_REQUIRE(fd >= 0, "cannot create the image file", move.path, strerror(errno));
    move.file = kj::AutoCloseFd(fds_.moveHigh(fd));
  }
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = write(move.file.get(), data.begin() + done, data.size() - done);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    KJ_REQUIRE(n > 0, "cannot write the image file", move.path, strerror(errno));
    done += n;
  }
  move.bytes += data.size();
}

void Deputy::finishMoveImage(uint64_t bytes) {
  MoveState& move = *move_;
  KJ_REQUIRE(move.file.get() >= 0, "the migration image is empty");
  KJ_REQUIRE(bytes == move.bytes, "the migration image arrived incomplete", bytes, move.bytes);
  fds_.remove(move.file.get());
  move.file = nullptr;
  {
    int fd = open(move.path.c_str(), O_RDONLY | O_CLOEXEC);
    KJ_REQUIRE(fd >= 0, "cannot read the image file", move.path, strerror(errno));
    kj::AutoCloseFd owner(fd);
    kj::FdInputStream in(fd);
    migrate::ImageReader reader(in);
    migrate::ResumeOptions options;
    options.intoDeputy = true;
    std::vector<std::string> problems = migrate::checkResumable(reader.header(), options);
    if (!problems.empty()) {
      std::string all;
      for (auto& p : problems) {
        all += (all.empty() ? "" : "; ") + p;
      }
      KJ_FAIL_REQUIRE(kj::str("the image cannot be resumed at home: ", all.c_str()));
    }
    reader.verifyToEnd();
  }
  // The job's descriptors that are close-on-exec: cleared just before the stub's exec, set
  // again by the agent (so the exec closes only ours).
  move.closeOnExec.clear();
  if (DIR* dir = opendir("/proc/self/fd")) {
    while (dirent* e = readdir(dir)) {
      if (e->d_name[0] == '.') {
        continue;
      }
      int fd = atoi(e->d_name);
      if (fd == dirfd(dir) || fds_.contains(fd)) {
        continue;
      }
      int flags = fcntl(fd, F_GETFD);
      if (flags >= 0 && (flags & FD_CLOEXEC)) {
        move.closeOnExec.push_back(fd);
      }
    }
    closedir(dir);
  }
  migrate::AgentConfig config;
  config.resumeImagePath = move.path;
  config.resumeIntoDeputy = true;
  config.resumeExePath = options_.jobExe;
  config.resumeCloseOnExec = move.closeOnExec;
  config.reportFd = move.connection.get();
  move.agent = migrate::Agent::start(config);
  // The agent's intermediate process was our child: its SIGCHLD is not the job's.
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  struct timespec zero = {0, 0};
  siginfo_t info;
  std::vector<siginfo_t> others;
  while (sigtimedwait(&chld, &info, &zero) == SIGCHLD) {
    if (info.si_pid != move.agent.helperPid()) {
      others.push_back(info);
    }
  }
  for (siginfo_t& s : others) {
    ::syscall(SYS_rt_tgsigqueueinfo, getpid(), static_cast<pid_t>(::syscall(SYS_gettid)), SIGCHLD,
              &s);
  }
  capnp::MallocMessageBuilder message;
  message.initRoot<proto::ToRemote>().setMoveCommit();
  channel_->send(message);
  move.committed = true;
}

void Deputy::completeMoveHome() {
  MoveState& move = *move_;
  KJ_REQUIRE(move.committed, "the guest left before the home node committed");
  if (auto* r = record_.get()) {
    r->state = static_cast<uint32_t>(JobState::HOME);
    r->node = options_.homeNode;
    r->remotePid = 0;
    noteArrival(r, options_.homeNode);
    r->stats.sinceNs.store(realtimeNs(), std::memory_order_relaxed);
  }
  if (control_.get() != nullptr) {
    control_->unlinkPath();
  }
  // Signals the deputy recorded and kept during the move are queued on this process again,
  // blocked: they survive the exec and are the job's once the agent restores its mask. A SIGURG
  // of the deputy's own (a cancel, the control connection) is dropped, a job's is kept.
  pid_t self = getpid();
  pid_t tid = static_cast<pid_t>(::syscall(SYS_gettid));
  std::vector<siginfo_t> keep = takePendingSignalInfos();
  sigset_t urg;
  sigemptyset(&urg);
  sigaddset(&urg, SIGURG);
  struct timespec zero = {0, 0};
  siginfo_t info;
  while (sigtimedwait(&urg, &info, &zero) == SIGURG) {
    if (!isDeputySigurg(info)) {
      keep.push_back(info);
    }
  }
  for (siginfo_t& s : keep) {
    ::syscall(SYS_rt_tgsigqueueinfo, self, tid, s.si_signo, &s);
  }
  for (int fd : move.closeOnExec) {
    fcntl(fd, F_SETFD, 0);
  }
  spdlog::info("job {}: the guest is gone; resuming the job at home", self);
  migrate::execRestoreStub();
  int err = errno;
  for (int fd : move.closeOnExec) {
    fcntl(fd, F_SETFD, FD_CLOEXEC);
  }
  replyControl(move.connection.get(),
               std::string("failed: cannot exec the restore stub: ") + strerror(err));
  unlink(move.path.c_str());
  fail("job " + std::to_string(self) + " lost: the restore stub could not be executed (" +
           strerror(err) + ")",
       EXIT_NODE_DIED);
}

}  // namespace mos::deputy
