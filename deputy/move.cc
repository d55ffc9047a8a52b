// A live move of the job home (issue 8; docs/design.md, "Migration of a running process"): the
// deputy's side. `migrate PID home` connects to the control socket (control.h); the deputy asks
// the supervisor (ToRemote.move), receives the migration stream of the stopped guest into a file
// of the run directory, checks it, starts a migration agent in resume mode, commits, and once
// the guest is gone execs the restore stub: the agent rebuilds the job in this very process
// (decision 1: same pid, parent, session, terminal), keeping the fd table, which is the job's.

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include <capnp/message.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "checkpoint.h"
#include "cluster_auth.h"
#include "deputy.h"
#include "migrate.h"
#include "signals.h"
#include "startup.h"

namespace mos::deputy {

namespace {

std::atomic<bool> moveOfProcess{false};  // processMoving()

// Deputy-internal SIGURGs (a cancel's urgent byte: SI_KERNEL; a control connection: POLL_IN; an
// exec handoff) must not reach the job; a job's own SIGURG must.
bool isDeputySigurg(const siginfo_t& info) {
  return info.si_code == SI_KERNEL || info.si_code == POLL_IN ||
         (info.si_code == SI_QUEUE && info.si_value.sival_int == EXEC_HANDOFF_VALUE &&
          info.si_pid == getpid());
}

// Checks that the migration stream in `path` can be resumed in this process (checkResumable
// with intoDeputy) and is whole (its digest). Throws kj::Exception (FAILED) saying why not.
void checkResumableHere(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  KJ_REQUIRE(fd >= 0, "cannot read the migration image", path, strerror(errno));
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

// The job's descriptors that are close-on-exec (every open one but the deputy's reserved `fds`):
// cleared just before the restore stub's exec, set again by the agent, so that the exec closes
// only the deputy's.
std::vector<int> jobCloseOnExec(const ReservedFds& fds) {
  std::vector<int> list;
  if (DIR* dir = opendir("/proc/self/fd")) {
    while (dirent* e = readdir(dir)) {
      int fd = atoi(e->d_name);
      if (e->d_name[0] == '.' || fd == dirfd(dir) || fds.contains(fd)) {
        continue;
      }
      int flags = fcntl(fd, F_GETFD);
      if (flags >= 0 && (flags & FD_CLOEXEC)) {
        list.push_back(fd);
      }
    }
    closedir(dir);
  }
  return list;
}

// Starts the migration agent that will restore an image into this process once it execs the
// restore stub (Agent::start). The agent's intermediate process was our child: its SIGCHLD,
// pending and blocked here, is taken out (it is not the job's); any other SIGCHLD is queued
// again with its siginfo. Throws as Agent::start.
migrate::Agent startResumeAgent(const migrate::AgentConfig& config) {
  migrate::Agent agent = migrate::Agent::start(config);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  struct timespec zero = {0, 0};
  siginfo_t info;
  std::vector<siginfo_t> others;
  while (sigtimedwait(&chld, &info, &zero) == SIGCHLD) {
    if (info.si_pid != agent.helperPid()) {
      others.push_back(info);
    }
  }
  for (siginfo_t& s : others) {
    ::syscall(SYS_rt_tgsigqueueinfo, getpid(), static_cast<pid_t>(::syscall(SYS_gettid)), SIGCHLD,
              &s);
  }
  return agent;
}

// Removes the move images (<pid>.home.img) of deputies that are gone: a deputy killed during a
// move (SIGKILL) cannot remove its own.
void removeStaleImages(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) {
    return;
  }
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    const std::string suffix = ".home.img";
    if (name.size() <= suffix.size() ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    pid_t owner = static_cast<pid_t>(atol(name.c_str()));
    if (owner > 0 && kill(owner, 0) != 0 && errno == ESRCH) {
      unlinkat(dirfd(d), name.c_str(), 0);
    }
  }
  closedir(d);
}

}  // namespace

void runOnAtHome(ReservedFds& fds, const std::string& imagePath, const std::string& jobExe,
                 const std::string& why) {
  printMosrunMessage(why + "; the job runs on at home");
  std::vector<int> closeOnExec;
  try {
    checkResumableHere(imagePath);
    closeOnExec = jobCloseOnExec(fds);
    migrate::AgentConfig config;
    config.resumeImagePath = imagePath;
    config.resumeIntoDeputy = true;
    config.resumeExePath = jobExe;
    config.resumeCloseOnExec = closeOnExec;
    migrate::Agent agent = startResumeAgent(config);
    (void)agent;  // it waits for our exec of the stub
  } catch (kj::Exception& e) {
    unlink(imagePath.c_str());
    printMosrunMessage(std::string("the job is lost: ") + e.getDescription().cStr());
    _exit(EXIT_CANNOT_RUN);
  }
  for (int fd : closeOnExec) {
    fcntl(fd, F_SETFD, 0);
  }
  spdlog::info("job {}: resuming at home from {}", getpid(), imagePath);
  migrate::execRestoreStub();
  int err = errno;
  unlink(imagePath.c_str());
  printMosrunMessage(std::string("the job is lost: cannot exec the restore stub: ") +
                     strerror(err));
  _exit(EXIT_CANNOT_RUN);
}

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
    uint32_t target = 0;
    std::string address;
    unsigned port = 0;
    std::string checkpointPath;
    if (request.command.rfind("checkpoint /", 0) == 0) {
      checkpointPath = request.command.substr(11);
    } else if (request.command.rfind("node ", 0) == 0) {
      std::istringstream words(request.command.substr(5));
      std::string rest;
      if (!(words >> target >> address >> port) || (words >> rest) || target == 0 || port == 0 ||
          port > 65535) {
        refuse("malformed request '" + request.command + "' (expected `node ID ADDRESS PORT`)");
        continue;
      }
      if (target == options_.homeNode) {
        refuse("node " + std::to_string(target) + " is the home node: ask for `home`");
        continue;
      }
      if (target == options_.node) {
        refuse("it runs on node " + std::to_string(target) + " already");
        continue;
      }
    } else if (request.command != "home") {
      refuse("unknown request '" + request.command +
             "' (this deputy serves `home`, `node ID ADDRESS PORT` and `checkpoint /PATH`)");
      continue;
    }
    if (std::string why = moveRefusal(!checkpointPath.empty(), target); !why.empty()) {
      refuse(why);
      continue;
    }
    move_ = kj::heap<MoveState>();
    moveOfProcess = true;
    move_->connection = kj::mv(request.connection);
    move_->target = target;
    move_->address = address;
    move_->port = static_cast<uint16_t>(port);
    move_->checkpointPath = checkpointPath;
    if (auto* r = record_.get()) {
      r->state = static_cast<uint32_t>(JobState::MIGRATING);  // mps: on its way
    }
    if (!checkpointPath.empty()) {
      spdlog::info("job {}: checkpoint from node {} to {}", getpid(), options_.node,
                   checkpointPath);
    } else if (target == 0) {
      spdlog::info("job {}: moving home from node {}", getpid(), options_.node);
    } else {
      spdlog::info("job {}: moving from node {} to node {}", getpid(), options_.node, target);
    }
    capnp::MallocMessageBuilder message(16);
    auto move = message.initRoot<proto::ToRemote>().initMove();
    move.setTarget(target);
    move.setCheckpoint(!checkpointPath.empty());
    channel_->send(message);
  }
}

bool processMoving() { return moveOfProcess.load(); }

std::string Deputy::moveRefusal(bool checkpoint, uint32_t target) {
  if (moving()) {
    return "a move of this job is already in progress";
  }
  if (options_.locked && !checkpoint) {
    return std::string("it is ") + LOCKED_REASON + " on node " + std::to_string(options_.node);
  }
  if (!leader_) {
    return "not the job's main deputy";
  }
  if (int threads = migrate::countThreads(getpid()); threads > 1 && !checkpoint) {
    // Home (clone3 set_tid at the restore) or another node (each deputy thread made again at
    // its tid for its new channel: ns_last_pid) alike.
    (void)target;
    return migrate::threadIdsRefusal(getpid(), threads);
  }
  return "";
}

void Deputy::comeHome(const std::string& reason) {
  capnp::MallocMessageBuilder message(16);
  auto root = message.initRoot<proto::ToRemote>();
  if (std::string why = moveRefusal(false, 0); !why.empty()) {
    spdlog::info("job {}: {}, but it cannot come home: {}", getpid(), reason, why);
    root.setMoveAbort(why);
    channel_->send(message);
    return;
  }
  // A move home as `migrate PID home` starts one, with nobody to answer at the end.
  move_ = kj::heap<MoveState>();
  moveOfProcess = true;
  if (auto* r = record_.get()) {
    r->state = static_cast<uint32_t>(JobState::MIGRATING);
  }
  spdlog::info("job {}: {}: brought home from node {}", getpid(), reason, options_.node);
  root.initMove().setTarget(0);
  channel_->send(message);
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
  moveOfProcess = false;
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
    // The rest of the stream of a move that was aborted while it came (a relay that failed,
    // the image file that could not be written) is expected: dropped without a word.
    if (message.isMoveImage() || message.isMoveImageEnd()) {
      spdlog::debug("the rest of an aborted move's stream, dropped");
    } else {
      spdlog::warn("a move message without a move in progress, ignored");
    }
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
  appendMoveImage(data);
  MoveState& move = *move_;
  if (move.target != 0) {
    // Remote -> remote: the relay starts as soon as the header is here; the frames follow the
    // old node's stream to the new node while they arrive (relayMove). Until then, a header
    // that does not parse yet is only incomplete.
    kj::Own<ImageFile> image;
    try {
      image = kj::heap<ImageFile>(move.path);
    } catch (kj::Exception& e) {
      if (kj::StringPtr(e.getDescription()).startsWith("migration image truncated")) {
        return;
      }
      throw;
    }
    relayMove(*image);
  }
}

void Deputy::appendMoveImage(capnp::Data::Reader data) {
  MoveState& move = *move_;
  if (move.file.get() < 0 && move.path.empty()) {
    std::string dir = options_.runDir + "/images";
    makeDirectories(dir);
    removeStaleImages(dir);
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
  if (!move.checkpointPath.empty()) {
    writeRemoteCheckpoint();
    return;
  }
  KJ_REQUIRE(move.target == 0, "the stream ended before its header did");
  checkResumableHere(move.path);
  move.closeOnExec = jobCloseOnExec(fds_);
  migrate::AgentConfig config;
  config.resumeImagePath = move.path;
  config.resumeIntoDeputy = true;
  config.resumeExePath = options_.jobExe;
  config.resumeCloseOnExec = move.closeOnExec;
  config.reportFd = move.connection.get();
  move.agent = startResumeAgent(config);
  capnp::MallocMessageBuilder message;
  message.initRoot<proto::ToRemote>().setMoveCommit();
  channel_->send(message);
  move.committed = true;
}

namespace {

// The bytes queued in each pipe whose read and write ends are both descriptors of this process
// (a job's self-pipe: the deputy's fd table is the job's), read and written back unchanged, into
// the header's OpenFile entries of its read ends (pipeData, unread, pipeSize), as captureImage
// does by injection for a process at home. Other pipes keep what they hold where they are.
void keepSelfPipeBytes(proto::ImageHeader::Builder header) {
  auto files = header.getFiles();
  for (auto reader : files) {
    if (reader.getKind() != proto::OpenFile::Kind::PIPE || (reader.getFlags() & O_ACCMODE) != 0) {
      continue;
    }
    bool ownWriter = false;
    int writeFd = -1;
    for (auto writer : files) {
      if (writer.getKind() == proto::OpenFile::Kind::PIPE && writer.getIno() == reader.getIno() &&
          (writer.getFlags() & O_ACCMODE) == O_WRONLY) {
        ownWriter = true;
        writeFd = writer.getFd();
      }
    }
    int fd = reader.getFd();
    int size = fcntl(fd, F_GETPIPE_SZ);
    int queued = 0;
    if (!ownWriter || size < 0 || ioctl(fd, FIONREAD, &queued) != 0) {
      continue;
    }
    reader.setPipeSize(static_cast<uint32_t>(size));
    reader.setUnread(static_cast<uint32_t>(queued));
    std::string data(static_cast<size_t>(queued), '\0');
    size_t got = 0;
    while (got < data.size()) {
      ssize_t n = read(fd, data.data() + got, data.size() - got);  // queued: never blocks
      if (n < 0 && errno == EINTR) {
        continue;
      }
      KJ_REQUIRE(n > 0, "cannot read the bytes queued in a self-pipe", fd, strerror(errno));
      got += n;
    }
    for (size_t put = 0; put < data.size();) {
      ssize_t n = write(writeFd, data.data() + put, data.size() - put);  // they fitted: fit again
      if (n < 0 && errno == EINTR) {
        continue;
      }
      KJ_REQUIRE(n > 0, "cannot put back the bytes of a self-pipe", writeFd, strerror(errno));
      put += n;
    }
    reader.setPipeData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(data.data()), data.size()));
  }
}

// Waits until `channel` has a message to read, at most until `deadline`. Signals stay blocked
// (the deputy holds them during a move). Throws kj::Exception (FAILED) naming `what` at the
// deadline.
void awaitReadable(Channel& channel, std::chrono::steady_clock::time_point deadline,
                   const std::string& what) {
  while (!channel.hasBuffered()) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    KJ_REQUIRE(left > 0, kj::str(what.c_str()));
    struct pollfd pfd = {channel.fd(), POLLIN, 0};
    int n = poll(&pfd, 1, static_cast<int>(std::min<long>(left, 1000)));
    if (n < 0 && errno != EINTR) {
      KJ_FAIL_SYSCALL("poll", errno);
    }
    if (n > 0) {
      return;
    }
  }
}

constexpr auto NEW_NODE_START_TIMEOUT = std::chrono::seconds(60);
constexpr auto OLD_NODE_MOVED_TIMEOUT = std::chrono::seconds(30);

}  // namespace

void Deputy::relayMove(ImageFile& image) {
  MoveState& move = *move_;
  std::string where = "node " + std::to_string(move.target) + " (" + move.address + ":" +
                      std::to_string(move.port) + ")";
  // The header is here; the frames are still coming from the old node (old channel: moveImage
  // messages, appended to the image file). The new node gets the header now, fetches the files
  // it lacks, asks for the frames, and from then on gets each byte as soon as it is in the file:
  // the two transfers overlap. Nothing is checked here: the new node's reader checks the
  // digest and the counts at the end frame and answers `failed` for a damaged stream; the old
  // guest is still there, stopped, until the commit below, so any failure only aborts the move.
  ClusterCredentials credentials{options_.homeNode, ClusterKey::load(options_.keyPath)};
  int fd = connectJobSocket(move.address, move.port, 5000, fds_);
  KJ_REQUIRE(fd >= 0, kj::str("cannot reach ", where.c_str(), ": ", strerror(-fd)));
  auto next = kj::heap<Channel>(kj::AutoCloseFd(fd));
  bool adopted = false;
  KJ_DEFER(if (!adopted) fds_.remove(fd));  // before `next` closes it
  int err = sendHello(fd, credentials, 5000);
  KJ_REQUIRE(err == 0,
             kj::str(where.c_str(),
                     err == -EACCES ? kj::str(" refused this node (is the cluster key the same?)")
                                    : kj::str(": ", strerror(-err))));
  {
    capnp::MallocMessageBuilder start;
    fillJobStart(options_.homeNode, options_.command, start);
    next->send(start);
    sendFileBytes(*next, image.fd(), 0, image.headerEnd());
  }
  // Serve the new supervisor until its guest runs, and the old one until its stream has come.
  pid_t remotePid = 0;
  {
    kj::Own<Channel> old = kj::mv(channel_);
    channel_ = kj::mv(next);  // handleFetchFile answers on channel_
    KJ_DEFER({
      next = kj::mv(channel_);
      channel_ = kj::mv(old);
    });
    bool streamDone = move.file.get() < 0;  // moveImageEnd came already
    bool framesAsked = false;
    uint64_t sent = image.headerEnd();
    auto deadline = std::chrono::steady_clock::now() + NEW_NODE_START_TIMEOUT;
    // Until the new guest runs and the old node's stream has ended: the new node may report
    // `started` (it had the end frame) before the old one's moveImageEnd is read here.
    while (remotePid == 0 || !streamDone) {
      if (framesAsked && sent < move.bytes) {
        sendFileBytes(*channel_, image.fd(), sent, move.bytes);
        sent = move.bytes;
      }
      // Whichever channel has something (the old node's stream first), of those still served.
      bool wantOld = !streamDone, wantNew = remotePid == 0;
      bool fromOld = wantOld && old->hasBuffered();
      while (!fromOld && !(wantNew && channel_->hasBuffered())) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                        deadline - std::chrono::steady_clock::now())
                        .count();
        KJ_REQUIRE(left > 0, kj::str(where.c_str(), " did not start the job within 60 s"));
        struct pollfd pfd[2] = {{wantOld ? old->fd() : -1, POLLIN, 0},
                                {wantNew ? channel_->fd() : -1, POLLIN, 0}};
        int n = poll(pfd, 2, static_cast<int>(std::min<long>(left, 1000)));
        if (n < 0 && errno != EINTR) {
          KJ_FAIL_SYSCALL("poll", errno);
        }
        if (n > 0) {
          fromOld = pfd[0].revents != 0;
          break;
        }
      }
      if (fromOld) {
        KJ_IF_MAYBE (m, old->receive()) {
          auto root = (*m)->getRoot<proto::ToDeputy>();
          switch (root.which()) {
            case proto::ToDeputy::MOVE_IMAGE:
              if (framesAsked && sent == move.bytes) {
                // Caught up: straight on, the file is only for what came before sendImage.
                auto data = root.getMoveImage();
                channel_->sendBytes(data.begin(), data.size());
                move.bytes += data.size();
                sent = move.bytes;
              } else {
                appendMoveImage(root.getMoveImage());
              }
              break;
            case proto::ToDeputy::MOVE_IMAGE_END:
              KJ_REQUIRE(root.getMoveImageEnd() == move.bytes,
                         "the migration image arrived incomplete", root.getMoveImageEnd(),
                         move.bytes);
              fds_.remove(move.file.get());
              move.file = nullptr;
              streamDone = true;
              break;
            case proto::ToDeputy::MOVE_REFUSED: KJ_FAIL_REQUIRE(kj::str(root.getMoveRefused()));
            default:
              KJ_FAIL_REQUIRE(kj::str("unexpected message from node ", options_.node,
                                      " in the middle of its stream (union tag ",
                                      static_cast<int>(root.which()), ")"));
          }
        } else {
          KJ_FAIL_REQUIRE(kj::str("node ", options_.node,
                                  " closed the connection in the middle of its stream"));
        }
        continue;
      }
      KJ_IF_MAYBE (m, channel_->receive()) {
        auto root = (*m)->getRoot<proto::ToDeputy>();
        switch (root.which()) {
          case proto::ToDeputy::FETCH_FILE: handleFetchFile(root.getFetchFile()); break;
          case proto::ToDeputy::SEND_IMAGE: framesAsked = true; break;
          case proto::ToDeputy::STARTED: remotePid = root.getStarted(); break;
          case proto::ToDeputy::FAILED: KJ_FAIL_REQUIRE(kj::str(root.getFailed()));
          default:
            KJ_FAIL_REQUIRE(kj::str("unexpected message from ", where.c_str(),
                                    " before its guest ran (union tag ",
                                    static_cast<int>(root.which()), ")"));
        }
      } else {
        KJ_FAIL_REQUIRE(kj::str(where.c_str(), " closed the connection before the job ran"));
      }
    }
    KJ_REQUIRE(sent == move.bytes, "the new node ran the job before its stream ended", sent,
               move.bytes);
  }
  // The new guest runs (its first calls wait on the new channel). Commit: the old one ends.
  {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::ToRemote>().setMoveCommit();
    channel_->send(message);
  }
  move.committed = true;
  uint32_t from = options_.node;
  try {
    auto deadline = std::chrono::steady_clock::now() + OLD_NODE_MOVED_TIMEOUT;
    for (bool moved = false; !moved;) {
      awaitReadable(*channel_, deadline, "no `moved` from the old node within 30 s");
      KJ_IF_MAYBE (m, channel_->receive()) {
        moved = (*m)->getRoot<proto::ToDeputy>().isMoved();
      } else {
        break;  // the old node closed the channel: its guest is gone with it
      }
    }
  } catch (kj::Exception& e) {
    // Dropping the old channel below ends its guest all the same (its supervisor ends the job
    // when the deputy goes away).
    spdlog::warn("job {}: {}", getpid(), e.getDescription().cStr());
  }
  fds_.remove(channel_->fd());
  channel_ = kj::mv(next);
  adopted = true;
  fds_.add(channel_->fd(), [this](int, int newFd) { channel_->replaceFd(kj::AutoCloseFd(newFd)); });
  options_.node = move.target;
  options_.address = move.address;
  options_.port = move.port;
  if (auto* r = record_.get()) {
    startInspection();  // the new channel's byte counters
    r->remotePid = remotePid;
    r->node = move.target;
    r->state = static_cast<uint32_t>(JobState::REMOTE);
    r->stats.sinceNs.store(realtimeNs(), std::memory_order_relaxed);
    noteArrival(r, move.target);
  }
  spdlog::info("job {}: moved from node {} to node {} (pid {} there)", getpid(), from, move.target,
               remotePid);
  endMove("ok node " + std::to_string(move.target) + " " + std::to_string(remotePid) + " " +
          std::to_string(move.bytes));
}

void Deputy::writeRemoteCheckpoint() {
  MoveState& move = *move_;
  int in = open(move.path.c_str(), O_RDONLY | O_CLOEXEC);
  KJ_REQUIRE(in >= 0, "cannot read the image file", move.path, strerror(errno));
  kj::AutoCloseFd inOwner(in);
  kj::FdInputStream input(in);
  migrate::ImageReader reader(input);
  capnp::MallocMessageBuilder header;
  header.setRoot(reader.header());
  auto h = header.getRoot<proto::ImageHeader>();
  // The job's descriptors and cwd are ours (the deputy executed every call that made them).
  migrate::describeOpenFiles(getpid(), h, [&](int fd) { return fds_.contains(fd) || fd == in; });
  std::string cwd = readLink("/proc/self/cwd");
  h.setCwd(kj::arrayPtr(reinterpret_cast<const kj::byte*>(cwd.data()), cwd.size()));
  mode_t mask = umask(0);  // umask is forwarded: the job's is ours
  umask(mask);
  h.setUmask(mask);
  keepSelfPipeBytes(h);
  // The guest's executable is its restore stub; the job's is the home file it runs.
  struct stat st;
  if (stat(options_.jobExe.c_str(), &st) == 0) {
    auto exe = h.initExe();
    exe.setPath(kj::arrayPtr(reinterpret_cast<const kj::byte*>(options_.jobExe.data()),
                             options_.jobExe.size()));
    exe.setDev(st.st_dev);
    exe.setIno(st.st_ino);
    exe.setSize(st.st_size);
    exe.setMtimeNs(uint64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec);
  }
  std::string tmp = move.checkpointPath + ".tmp." + std::to_string(getpid());
  int out = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  KJ_REQUIRE(out >= 0, kj::str("cannot create ", tmp.c_str(), ": ", strerror(errno)));
  kj::AutoCloseFd outOwner(out);
  bool renamed = false;
  KJ_DEFER(if (!renamed) unlink(tmp.c_str()));
  kj::FdOutputStream output(out);
  kj::BufferedOutputStreamWrapper buffered(output);
  migrate::ImageWriter writer(buffered);
  writer.writeHeader(header);
  auto buffer = kj::heapArray<uint8_t>(migrate::MAX_RUN_PAGES * migrate::IMAGE_PAGE);
  for (;;) {
    KJ_IF_MAYBE (run, reader.nextRun()) {
      auto bytes = std::span<uint8_t>(buffer.begin(), run->count * migrate::IMAGE_PAGE);
      reader.readPages(bytes);
      writer.writePages(run->start, bytes);
    } else {
      break;
    }
  }
  writer.finish();
  buffered.flush();
  KJ_REQUIRE(fsync(out) == 0, kj::str("cannot write ", tmp.c_str(), ": ", strerror(errno)));
  KJ_REQUIRE(rename(tmp.c_str(), move.checkpointPath.c_str()) == 0,
             kj::str("cannot rename ", tmp.c_str(), ": ", strerror(errno)));
  renamed = true;
  spdlog::info("job {}: checkpoint of its guest on node {} written to {} ({} pages)", getpid(),
               options_.node, move.checkpointPath, writer.pages());
  // The guest runs on where it is.
  capnp::MallocMessageBuilder message;
  message.initRoot<proto::ToRemote>().setMoveAbort("checkpoint written");
  channel_->send(message);
  endMove("ok checkpoint " + std::to_string(writer.pages()) + " " + std::to_string(writer.bytes()));
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
