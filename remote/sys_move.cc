// A live move of the guest home (issue 8; docs/design.md, "Migration of a running process"):
// the task's side. The deputy asks (ToRemote.move); the loop runs the move when the guest is
// computing (turn), or as the answer of the call it waits in (respond: the call is cut short
// and restarts wherever the guest resumes); the guest is captured by the main thread
// (GuestFamily::moveCapture) into the job channel, and the deputy's verdict ends the task or
// lets the guest run on.

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include <capnp/message.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "supervisor.h"

namespace mos::remote {

namespace {

// The migration stream as ToDeputy.moveImage messages of at most 1 MiB: one copy into the
// message, one sendmsg each; nothing of the stream is held beyond one chunk.
class ChannelImageSink final : public kj::OutputStream {
 public:
  explicit ChannelImageSink(Channel& channel) : channel_(channel) { buffer_.reserve(CHUNK); }

  void write(const void* data, size_t size) override {
    auto* bytes = static_cast<const kj::byte*>(data);
    while (size > 0) {
      size_t take = kj::min(size, CHUNK - buffer_.size());
      buffer_.insert(buffer_.end(), bytes, bytes + take);
      bytes += take;
      size -= take;
      total_ += take;
      if (buffer_.size() == CHUNK) {
        flush();
      }
    }
  }

  void flush() {
    if (buffer_.empty()) {
      return;
    }
    capnp::MallocMessageBuilder message(buffer_.size() / sizeof(capnp::word) + 16);
    auto data = message.initRoot<proto::ToDeputy>().initMoveImage(buffer_.size());
    memcpy(data.begin(), buffer_.data(), buffer_.size());
    buffer_.clear();
    channel_.send(message);
  }

  uint64_t total() const { return total_; }

 private:
  static constexpr size_t CHUNK = 1u << 20;
  Channel& channel_;
  std::vector<kj::byte> buffer_;
  uint64_t total_ = 0;
};

}  // namespace

void Supervisor::setThreadTask(bool thread) {
  threadTask_ = thread;
  if (thread && parkWake_.get() < 0) {
    int fd;
    KJ_SYSCALL(fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    parkWake_ = kj::AutoCloseFd(fd);
  }
}

void Supervisor::requestPark() {
  parkRequested_ = true;
  uint64_t one = 1;
  (void)!write(parkWake_.get(), &one, sizeof(one));
}

void Supervisor::parkForMove(kj::Maybe<uint64_t> heldId) {
  // Cleared first: a request of the next move, made once this one is released, parks again.
  parkRequested_ = false;
  uint64_t count;
  (void)!read(parkWake_.get(), &count, sizeof(count));
  bool answered = forkHost_ != nullptr && forkHost_->parkForMove(guest_, heldId);
  KJ_IF_MAYBE (id, heldId) {
    if (!answered) {
      // The move did not capture this thread: its call is issued again, here.
      seccomp_notif_resp resp = {};
      resp.id = *id;
      resp.error = -ERESTARTNOINTR;
      (void)unotify_->send(resp);
    }
  }
}

void Supervisor::sendMoveRefused(const std::string& why) {
  spdlog::info("job {}: move refused: {}", start_.getIds().getPid(), why);
  capnp::MallocMessageBuilder message;
  message.initRoot<proto::ToDeputy>().setMoveRefused(why);
  channel_.send(message);
}

bool Supervisor::moveMayCut() {
  if (current_ == nullptr) {
    return true;
  }
  const SyscallEntry* entry = findSyscall(static_cast<int>(current_->data.nr));
  return entry == nullptr || entry->handler != HandlerId::FORK;
}

void Supervisor::onMoveRequest(proto::MoveRequest::Reader request) {
  if (moveRequested_) {
    return;
  }
  if (forkHost_ == nullptr || guest_ <= 0 || threadTask_) {
    sendMoveRefused("this guest cannot be moved by its supervisor");
    return;
  }
  if (!nodeFds_.empty()) {
    std::string fds;
    for (int fd : nodeFds_) {
      fds += (fds.empty() ? "" : ", ") + std::to_string(fd);
    }
    sendMoveRefused("it holds descriptors of objects that live on node " +
                    std::to_string(options_.node) + " (memfds, its /dev/shm files): fd " + fds);
    return;
  }
  std::string why = forkHost_->moveRefusal(guest_);
  if (!why.empty()) {
    sendMoveRefused(why);
    return;
  }
  moveRequested_ = true;
  moveTarget_ = request.getTarget();
}

kj::Maybe<Answer> Supervisor::bringHome(const seccomp_notif& notif, const std::string& reason) {
  if (forkHost_ == nullptr || guest_ <= 0 || threadTask_ || moveRequested_) {
    return nullptr;
  }
  spdlog::info("job {}: {}: asking its deputy to bring it home", start_.getIds().getPid(), reason);
  {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::ToDeputy>().setComeHome(reason);
    channel_.send(message);
  }
  auto verdict =
      awaitMessage([](proto::ToRemote::Reader m) { return m.isMove() || m.isMoveAbort(); });
  KJ_IF_MAYBE (v, verdict) {
    auto root = (*v)->getRoot<proto::ToRemote>();
    if (root.isMoveAbort()) {
      spdlog::info("job {}: it stays here: {}", start_.getIds().getPid(),
                   root.getMoveAbort().cStr());
      return nullptr;
    }
    onMoveRequest(root.getMove());
    if (!moveRequested_) {
      return nullptr;  // refused here (node-local objects...): the deputy heard why
    }
    // respond() runs the move as the answer of this call, which restarts at home.
    return Answer::of(-ERESTARTNOINTR);
  }
  endJob(0);
}

void Supervisor::editMoveHeader(proto::ImageHeader::Builder header) {
  std::string cacheDir = options_.cacheDir;
  while (!cacheDir.empty() && cacheDir.back() == '/') {
    cacheDir.pop_back();
  }
  for (auto m : header.getMappings()) {
    if (m.getKind() != proto::Mapping::Kind::FILE) {
      continue;
    }
    auto ref = m.getFile();
    std::string path(reinterpret_cast<const char*>(ref.getPath().begin()), ref.getPath().size());
    CacheKey key;
    auto slash = path.rfind('/');
    auto home = homePaths_.find(path);
    if (path.compare(0, cacheDir.size() + 1, cacheDir + "/") != 0 || slash == std::string::npos ||
        !parseCacheKey(path.substr(slash + 1), key) || home == homePaths_.end()) {
      throw kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                          kj::str("it maps ", path.c_str(), ", a file of node ", options_.node,
                                  " that its home node does not have"));
    }
    ref.setPath(
        kj::arrayPtr(reinterpret_cast<const kj::byte*>(home->second.data()), home->second.size()));
    ref.setDev(key.dev);
    ref.setIno(key.ino);
    ref.setSize(key.size);
    ref.setMtimeNs(key.mtimeNs);
    m.setName(home->second);
  }
  // The guest's descriptors are the content cache's shadows of home ones (the job's are the
  // deputy's); its cwd is meaningless. Neither goes home.
  header.initFiles(0);
  header.setCwd(capnp::Data::Reader());
}

bool Supervisor::runMove(kj::Maybe<uint64_t> answerId) {
  ChannelImageSink sink(channel_);
  MoveResult result = forkHost_->moveCapture(
      guest_, answerId, sink,
      [this](proto::ImageHeader::Builder header) { editMoveHeader(header); });
  switch (result.outcome) {
    case MoveOutcome::BUSY: return false;
    case MoveOutcome::GONE:
      moveRequested_ = false;
      sendMoveRefused("the job ended before it could move");
      return true;
    case MoveOutcome::REFUSED:
      moveRequested_ = false;
      sendMoveRefused(result.reason);
      return true;
    case MoveOutcome::DONE: break;
  }
  sink.flush();
  {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::ToDeputy>().setMoveImageEnd(sink.total());
    channel_.send(message);
  }
  auto verdict =
      awaitMessage([](proto::ToRemote::Reader m) { return m.isMoveCommit() || m.isMoveAbort(); });
  KJ_IF_MAYBE (v, verdict) {
    auto root = (*v)->getRoot<proto::ToRemote>();
    if (root.isMoveAbort()) {
      spdlog::info("job {}: the move did not happen: {}; the guest runs on",
                   start_.getIds().getPid(), root.getMoveAbort().cStr());
      forkHost_->moveFinish(guest_, false);
      moveRequested_ = false;
      return true;
    }
    forkHost_->moveFinish(guest_, true);
    guest_ = -1;
    spdlog::info("job {}: moved {} ({} pages, {} bytes)", start_.getIds().getPid(),
                 moveTarget_ == 0 ? std::string("home") : "to node " + std::to_string(moveTarget_),
                 result.pages, sink.total());
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::ToDeputy>().setMoved();
    channel_.send(message);
  } else {
    // The deputy is gone: so is the job.
    forkHost_->moveFinish(guest_, true);
    guest_ = -1;
  }
  endJob(0);
}

}  // namespace mos::remote
