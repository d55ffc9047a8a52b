#include "trace_channel.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <fcntl.h>
#include <kj/debug.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <iterator>
#include <deque>
#include <filesystem>
#include <set>

#include "job_registry.h"
#include "log.h"
#include "syscall_table.h"

namespace mos {

namespace {

constexpr size_t CONTROL_BYTES = 64;
static_assert(sizeof(TraceControl) <= CONTROL_BYTES);
constexpr uint32_t DEFAULT_PAYLOAD_BYTES = 32;
constexpr uint32_t MAX_PAYLOAD_BYTES = 16 << 10;  // six of them fit a message (wmem_max)
constexpr size_t STRUCT_KEPT_BYTES = 256;
constexpr size_t PATH_KEPT_BYTES = 4096;  // PATH_MAX
constexpr size_t MAX_DATAGRAM = 512 << 10;
constexpr size_t MAX_QUEUED = 4096;  // events per subscriber before the oldest are dropped
constexpr size_t MAX_BATCH = 256;    // events per TraceSink.events call

// getdents64's buffer: kept whole up to MAX_PAYLOAD_BYTES, so the entries can be counted.
bool isDirents(int nr, unsigned arg) {
  return (nr == __NR_getdents64 || nr == __NR_getdents) && arg == 1;
}
// getcwd's buffer: a path, which strace never cuts.
bool isCwd(int nr, unsigned arg) { return nr == __NR_getcwd && arg == 0; }
// execve's and execveat's argv strings.
bool isExecArgv(int nr, unsigned arg) {
  return (nr == __NR_execve && arg == 1) || (nr == __NR_execveat && arg == 2);
}
// connect's and bind's address.
bool isSockaddr(int nr, unsigned arg) {
  return (nr == __NR_connect || nr == __NR_bind) && arg == 1;
}

sockaddr_un unixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  KJ_REQUIRE(path.size() < sizeof(addr.sun_path), "socket path too long", path);
  memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

}  // namespace

std::string traceControlPath(const std::string& runDir, uint32_t homeNode, int32_t homePid) {
  return runDir + "/trace/" + std::to_string(homeNode) + "-" + std::to_string(homePid);
}

std::string traceSocketPath(const std::string& runDir) { return runDir + "/trace.sock"; }

TraceControl* mapTraceControl(const std::string& runDir, uint32_t homeNode, int32_t homePid) {
  makeDirectories(runDir + "/trace");
  std::string path = traceControlPath(runDir, homeNode, homePid);
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    KJ_FAIL_REQUIRE("cannot open the trace control file", path, strerror(errno));
  }
  kj::AutoCloseFd owned(fd);
  struct stat st;
  KJ_SYSCALL(fstat(fd, &st), path);
  if (st.st_size < off_t(CONTROL_BYTES)) {
    KJ_SYSCALL(ftruncate(fd, CONTROL_BYTES), path);
  }
  void* at = mmap(nullptr, CONTROL_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (at == MAP_FAILED) {
    KJ_FAIL_REQUIRE("cannot map the trace control file", path, strerror(errno));
  }
  auto* control = static_cast<TraceControl*>(at);
  // Both sides may create it: a zero-filled record is a valid one with no listeners.
  control->magic = TraceControl::MAGIC;
  control->version = 1;
  return control;
}

void unmapTraceControl(TraceControl* control) {
  if (control != nullptr) {
    munmap(control, CONTROL_BYTES);
  }
}

void toProto(const TraceRecord& r, uint32_t payloadBytes, proto::TraceEvent::Builder out) {
  out.setHomePid(r.pid);
  out.setTid(r.tid);
  out.setNode(r.node);
  out.setHomeNode(r.homeNode);
  auto stack = out.initStack(r.stack.size());  // -k
  for (size_t i = 0; i < r.stack.size(); i++) {
    const TraceFrame& f = r.stack[i];
    stack[i].setIp(f.ip);
    stack[i].setModule(
        kj::arrayPtr(reinterpret_cast<const kj::byte*>(f.module.data()), f.module.size()));
    stack[i].setSymbol(f.symbol);
    stack[i].setOffset(f.offset);
  }
  out.setNr(r.nr);
  auto args = out.initArgs(6);
  for (unsigned i = 0; i < 6; i++) {
    args.set(i, r.args[i]);
  }
  unsigned count = 0;
  for (const TracePayload& p : r.payloads) {
    count += p.present ? 1 : 0;
  }
  auto payloads = out.initPayloads(count);
  const SyscallEntry* row = findSyscall(r.nr);
  unsigned at = 0;
  for (unsigned i = 0; i < 6; i++) {
    const TracePayload& p = r.payloads[i];
    if (!p.present) {
      continue;
    }
    ArgKind kind = row ? row->args[i].kind : ArgKind::NONE;
    bool isStruct =
        kind == ArgKind::IN_STRUCT || kind == ArgKind::OUT_STRUCT || kind == ArgKind::INOUT_STRUCT;
    bool isPath = kind == ArgKind::PATH || kind == ArgKind::PATH_OR_NULL || isCwd(r.nr, i);
    size_t wanted = isPath                ? PATH_KEPT_BYTES  // strace never cuts a path
                    : isStruct            ? std::max<size_t>(payloadBytes, STRUCT_KEPT_BYTES)
                    : isDirents(r.nr, i)  ? MAX_PAYLOAD_BYTES  // strace counts the entries
                    : isSockaddr(r.nr, i) ? STRUCT_KEPT_BYTES  // decoded like a struct
                    : isExecArgv(r.nr, i) ? PATH_KEPT_BYTES    // each string cut when shown
                                          : payloadBytes;
    size_t keep = std::min<size_t>(p.data.size(), wanted);
    auto payload = payloads[at++];
    payload.setArg(uint8_t(i));
    payload.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(p.data.data()), keep));
    payload.setLength(std::max<uint64_t>(p.length, p.data.size()));
  }
  out.setResult(r.result);
  out.setRoute(static_cast<proto::TraceRoute>(r.route));
  out.setStartNs(r.startNs);
  out.setTotalUs(r.totalUs);
  out.setHomeUs(r.homeUs);
  out.setTransitUs(r.transitUs);
  out.setResultUnknown(r.resultUnknown);
}

TraceRecord fromProto(proto::TraceEvent::Reader e) {
  TraceRecord r;
  r.pid = e.getHomePid();
  r.tid = e.getTid();
  r.node = e.getNode();
  r.homeNode = e.getHomeNode();
  for (auto f : e.getStack()) {  // -k
    auto module = f.getModule();
    r.stack.push_back(TraceFrame{
        f.getIp(), std::string(reinterpret_cast<const char*>(module.begin()), module.size()),
        f.getSymbol(), f.getOffset()});
  }
  r.nr = e.getNr();
  auto args = e.getArgs();
  for (unsigned i = 0; i < 6 && i < args.size(); i++) {
    r.args[i] = args[i];
  }
  for (auto p : e.getPayloads()) {
    if (p.getArg() < 6) {
      TracePayload& out = r.payloads[p.getArg()];
      auto data = p.getData();
      out.present = true;
      out.data.assign(reinterpret_cast<const char*>(data.begin()), data.size());
      out.length = std::max<uint64_t>(p.getLength(), data.size());
    }
  }
  r.result = e.getResult();
  r.route = static_cast<TraceRoute>(uint16_t(e.getRoute()));
  r.startNs = e.getStartNs();
  r.totalUs = e.getTotalUs();
  r.homeUs = e.getHomeUs();
  r.transitUs = e.getTransitUs();
  r.resultUnknown = e.getResultUnknown();
  return r;
}

// ---- TracePublisher

TracePublisher::TracePublisher(const std::string& runDir, uint32_t homeNode, int32_t homePid)
    : control_(mapTraceControl(runDir, homeNode, homePid)),
      socketPath_(traceSocketPath(runDir)),
      jobPid_(homePid) {}

TracePublisher::~TracePublisher() {
  int fd = socket_.load();
  if (fd >= 0) {
    close(fd);
  }
  for (int old : retired_) {
    close(old);
  }
  unmapTraceControl(control_);
}

uint32_t TracePublisher::payloadBytes() const {
  uint32_t n = control_ ? control_->payloadBytes.load(std::memory_order_relaxed) : 0;
  return std::clamp(n, DEFAULT_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES);
}

int TracePublisher::connection() {
  int fd = socket_.load(std::memory_order_acquire);
  if (fd >= 0) {
    return fd;
  }
  std::lock_guard<std::mutex> lock(connectMutex_);
  fd = socket_.load();
  if (fd >= 0) {
    return fd;
  }
  fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    return -1;
  }
  int size = 1 << 20;  // bursts (capped by net.core.wmem_max)
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
  sockaddr_un addr = unixAddress(socketPath_);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
    close(fd);
    return -1;
  }
  socket_.store(fd, std::memory_order_release);
  return fd;
}

bool TracePublisher::publish(const TraceRecord& record) {
  int fd = connection();
  if (fd < 0) {
    lost_.fetch_add(1, std::memory_order_relaxed);  // no mosd to talk to
    return false;
  }
  capnp::MallocMessageBuilder message;
  auto event = message.initRoot<proto::TraceEvent>();
  toProto(record, payloadBytes(), event);
  event.setJobPid(jobPid_);
  event.setSeq(seq_.fetch_add(1, std::memory_order_relaxed) + 1);
  event.setLost(lost_.load(std::memory_order_relaxed));
  auto words = capnp::messageToFlatArray(message);
  auto bytes = words.asBytes();
  ssize_t n = send(fd, bytes.begin(), bytes.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  if (n == ssize_t(bytes.size())) {
    return true;
  }
  lost_.fetch_add(1, std::memory_order_relaxed);  // tracing never blocks the job
  if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
    // mosd restarted: connect again next time. Another thread may still be sending on `fd`, so
    // it is closed only with the publisher.
    std::lock_guard<std::mutex> lock(connectMutex_);
    if (socket_.load() == fd) {
      socket_.store(-1);
      retired_.push_back(fd);
    }
  }
  return false;
}

// ---- TraceCall

namespace {
uint64_t clockNs(clockid_t clock) {
  timespec ts;
  clock_gettime(clock, &ts);
  return uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec);
}
}  // namespace

void TraceCall::begin(TracePublisher& publisher, int32_t pid, int32_t tid, uint32_t node,
                      uint32_t homeNode, int nr, const uint64_t (&args)[6]) {
  publisher_ = &publisher;
  record_.pid = pid;
  record_.tid = tid;
  record_.node = node;
  record_.homeNode = homeNode;
  record_.nr = nr;
  std::copy(std::begin(args), std::end(args), record_.args);
  record_.startNs = clockNs(CLOCK_REALTIME);
  startMonotonicNs_ = clockNs(CLOCK_MONOTONIC);
}

void TraceCall::setPayload(int arg, kj::ArrayPtr<const kj::byte> data, uint64_t length) {
  if (arg < 0 || arg >= 6) {
    return;
  }
  // Keep what toProto will send at most; it cuts again by kind.
  size_t cap = isDirents(record_.nr, unsigned(arg))
                   ? MAX_PAYLOAD_BYTES
                   : std::max<size_t>(publisher_->payloadBytes(), PATH_KEPT_BYTES);
  size_t keep = std::min<size_t>(data.size(), cap);
  TracePayload& p = record_.payloads[arg];
  p.present = true;
  p.data.assign(reinterpret_cast<const char*>(data.begin()), keep);
  p.length = std::max<uint64_t>(length, data.size());
}

void TraceCall::begin(TracePublisher& publisher, int32_t pid, int32_t tid, uint32_t node,
                      uint32_t homeNode, int nr, const unsigned long long (&args)[6]) {
  uint64_t copy[6];
  std::copy(std::begin(args), std::end(args), copy);
  begin(publisher, pid, tid, node, homeNode, nr, copy);
}

void TraceCall::publish(int64_t result, TraceRoute route) {
  record_.result = result;
  record_.route = route;
  uint64_t us = (clockNs(CLOCK_MONOTONIC) - startMonotonicNs_) / 1000;
  record_.totalUs = uint32_t(std::min<uint64_t>(us, UINT32_MAX));
  if (homeNs_ != 0) {
    record_.homeUs = uint32_t(std::min<uint64_t>(homeNs_ / 1000, UINT32_MAX));
  }
  record_.transitUs = record_.totalUs > record_.homeUs ? record_.totalUs - record_.homeUs : 0;
  publisher_->publish(record_);
  publisher_ = nullptr;
}

// ---- CallbackTraceSink

kj::Promise<void> CallbackTraceSink::events(EventsContext context) {
  auto params = context.getParams();
  dropped_ += params.getDropped();
  for (auto event : params.getEvents()) {
    onEvent_(fromProto(event));
  }
  if (onBatch_) {
    onBatch_();
  }
  return kj::READY_NOW;
}

kj::Promise<void> CallbackTraceSink::ended(EndedContext context) {
  onEnd_(context.getParams().getReason());
  return kj::READY_NOW;
}

// ---- TraceHub

class TraceHub::Subscription final : public proto::TraceSubscription::Server,
                                     private kj::TaskSet::ErrorHandler {
 public:
  Subscription(TraceHub& hub, Key key, proto::TraceFilter::Reader filter,
               proto::TraceSink::Client sink)
      : hub_(&hub), key_(key), sink_(kj::mv(sink)), tasks_(*this) {
    for (int32_t nr : filter.getSyscalls()) {
      syscalls_.insert(nr);
    }
    failedOnly_ = filter.getFailedOnly();
    payloadBytes_ = filter.getPayloadBytes();
    stacks_ = filter.getStacks();
  }
  ~Subscription() {
    if (hub_ != nullptr) {
      hub_->detach(this);
    }
  }

  uint32_t payloadBytes() const { return payloadBytes_; }
  bool stacks() const { return stacks_; }
  void hubGone() { hub_ = nullptr; }

  // Queues one event if the filter wants it; starts a call to the sink when none is in flight.
  void offer(proto::TraceEvent::Reader event, kj::ArrayPtr<const capnp::word> flat) {
    if (dead_ || (!syscalls_.empty() && !syscalls_.contains(event.getNr()))) {
      return;
    }
    int64_t result = event.getResult();
    if (failedOnly_ && !(result < 0 && result >= -4095)) {
      return;
    }
    if (queue_.size() >= MAX_QUEUED) {
      queue_.pop_front();
      dropped_++;
      droppedTotal_++;
    }
    queue_.push_back(kj::heapArray(flat));
    if (!inFlight_) {
      sendBatch();
    }
  }

 protected:
  kj::Promise<void> stats(StatsContext context) override {
    if (hub_ != nullptr) {
      hub_->drain();
    }
    context.getResults().setDelivered(delivered_);
    context.getResults().setQueued(queue_.size() + inFlightCount_);
    context.getResults().setDropped(droppedTotal_);
    return kj::READY_NOW;
  }

 private:
  void sendBatch() {
    if (queue_.empty() || dead_) {
      return;
    }
    size_t n = std::min(queue_.size(), MAX_BATCH);
    auto request = sink_.eventsRequest();
    auto events = request.initEvents(n);
    for (size_t i = 0; i < n; i++) {
      capnp::FlatArrayMessageReader reader(queue_[i]);
      events.setWithCaveats(i, reader.getRoot<proto::TraceEvent>());
    }
    request.setDropped(dropped_);
    dropped_ = 0;
    queue_.erase(queue_.begin(), queue_.begin() + n);
    inFlight_ = true;
    inFlightCount_ = n;
    tasks_.add(request.send().then([this, n](auto&&) {
      delivered_ += n;
      inFlight_ = false;
      inFlightCount_ = 0;
      sendBatch();
    }));
  }

  void taskFailed(kj::Exception&& exception) override {
    // The subscriber is gone or broken: stop sending; the subscription ends when it is dropped.
    spdlog::debug("trace subscriber failed: {}", exception.getDescription().cStr());
    dead_ = true;
    queue_.clear();
  }

  TraceHub* hub_;
  Key key_;
  proto::TraceSink::Client sink_;
  std::set<int32_t> syscalls_;
  bool failedOnly_ = false;
  uint32_t payloadBytes_ = 0;
  bool stacks_ = false;
  std::deque<kj::Array<capnp::word>> queue_;
  bool inFlight_ = false;
  size_t inFlightCount_ = 0;
  bool dead_ = false;
  uint64_t delivered_ = 0;
  uint64_t dropped_ = 0;  // since the last call
  uint64_t droppedTotal_ = 0;
  kj::TaskSet tasks_;

  friend class TraceHub;
};

struct TraceHub::Connection {
  kj::AutoCloseFd fd;
  kj::Own<UvFdWatcher> watcher;
};

TraceHub::TraceHub(UvEventPort& port, std::string runDir)
    : port_(port), runDir_(kj::mv(runDir)), socketPath_(traceSocketPath(runDir_)), tasks_(*this) {
  makeDirectories(runDir_);
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  KJ_REQUIRE(fd >= 0, "cannot make the trace socket", strerror(errno));
  socket_ = kj::AutoCloseFd(fd);
  unlink(socketPath_.c_str());
  sockaddr_un addr = unixAddress(socketPath_);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0 || listen(fd, 64) < 0) {
    KJ_FAIL_REQUIRE("cannot listen on the trace socket", socketPath_, strerror(errno));
  }
  watcher_ = kj::heap<UvFdWatcher>(port_, fd);
  resetControls();
}

void TraceHub::resetControls() {
  // A mosd that was killed left its listener counts up: publishers would keep sending to nobody.
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(runDir_ + "/trace", ec)) {
    int fd = open(entry.path().c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
      continue;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size >= off_t(CONTROL_BYTES)) {
      void* at = mmap(nullptr, CONTROL_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (at != MAP_FAILED) {
        static_cast<TraceControl*>(at)->listeners.store(0);
        static_cast<TraceControl*>(at)->stackListeners.store(0);
        munmap(at, CONTROL_BYTES);
      }
    }
    close(fd);
  }
}

TraceHub::~TraceHub() {
  watcher_->stop();
  for (auto& [key, job] : jobs_) {
    for (Subscription* s : job.subscriptions) {
      s->hubGone();
    }
    job.control->listeners.store(0);
    job.control->stackListeners.store(0);
    unmapTraceControl(job.control);
  }
  unlink(socketPath_.c_str());
}

void TraceHub::taskFailed(kj::Exception&& exception) {
  spdlog::warn("trace publisher connection: {}", exception.getDescription().cStr());
}

kj::Promise<void> TraceHub::run() {
  return watcher_->whenReadable().then([this]() {
    for (;;) {
      int fd = accept4(socket_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        break;  // EAGAIN: all accepted
      }
      auto connection = kj::heap<Connection>();
      connection->fd = kj::AutoCloseFd(fd);
      connection->watcher = kj::heap<UvFdWatcher>(port_, fd);
      Connection* c = connection.get();
      connections_[c] = kj::mv(connection);
      tasks_.add(receive(c));
    }
    return run();
  });
}

kj::Promise<void> TraceHub::receive(Connection* c) {
  return c->watcher->whenReadable().then([this, c]() -> kj::Promise<void> {
    if (!receiveAll(c->fd.get())) {
      c->watcher->stop();
      connections_.erase(c);  // the publisher went away
      return kj::READY_NOW;
    }
    return receive(c);
  });
}

void TraceHub::drain() {
  for (auto& [c, connection] : connections_) {
    receiveAll(connection->fd.get());  // a closed one is removed by its receive loop
  }
}

bool TraceHub::receiveAll(int fd) {
  if (buffer_.size() == 0) {
    buffer_ = kj::heapArray<capnp::word>(MAX_DATAGRAM / sizeof(capnp::word));
  }
  for (;;) {
    ssize_t n = recv(fd, buffer_.begin(), MAX_DATAGRAM, MSG_DONTWAIT);
    if (n == 0) {
      return false;
    }
    if (n < 0) {
      return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
    }
    received_++;
    auto flat = buffer_.slice(0, size_t(n) / sizeof(capnp::word));
    KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() {
                   capnp::FlatArrayMessageReader reader(flat);
                   auto event = reader.getRoot<proto::TraceEvent>();
                   int32_t job = event.getJobPid() != 0 ? event.getJobPid() : event.getHomePid();
                   auto it = jobs_.find(Key{event.getHomeNode(), job});
                   if (it == jobs_.end()) {
                     return;  // the last subscriber left after the publisher looked
                   }
                   auto subscriptions = it->second.subscriptions;  // offer() may not detach
                   for (Subscription* s : subscriptions) {
                     s->offer(event, flat);
                   }
                 })) {
      spdlog::warn("malformed trace event ({} bytes): {}", n, e->getDescription().cStr());
    }
  }
}

proto::TraceSubscription::Client TraceHub::subscribe(int32_t homePid, uint32_t homeNode,
                                                     proto::TraceFilter::Reader filter,
                                                     proto::TraceSink::Client sink) {
  Key key{homeNode, homePid};
  Job& job = jobs_[key];
  if (job.control == nullptr) {
    job.control = mapTraceControl(runDir_, homeNode, homePid);
  }
  auto subscription = kj::heap<Subscription>(*this, key, filter, kj::mv(sink));
  job.subscriptions.push_back(subscription.get());
  updatePayloadBytes(job);
  job.control->listeners.store(job.subscriptions.size());
  spdlog::info("tracing job {} of node {} ({} subscriber(s))", homePid, homeNode,
               job.subscriptions.size());
  return kj::mv(subscription);
}

void TraceHub::detach(Subscription* subscription) {
  auto it = jobs_.find(subscription->key_);
  if (it == jobs_.end()) {
    return;
  }
  Job& job = it->second;
  job.subscriptions.erase(
      std::remove(job.subscriptions.begin(), job.subscriptions.end(), subscription),
      job.subscriptions.end());
  job.control->listeners.store(job.subscriptions.size());
  spdlog::info("trace subscriber of job {} of node {} left ({} left)", it->first.second,
               it->first.first, job.subscriptions.size());
  if (job.subscriptions.empty()) {
    job.control->stackListeners.store(0);
    unmapTraceControl(job.control);
    jobs_.erase(it);
  } else {
    updatePayloadBytes(job);
  }
}

void TraceHub::updatePayloadBytes(Job& job) {
  uint32_t most = 0;
  uint32_t stacks = 0;
  for (Subscription* s : job.subscriptions) {
    most = std::max(most, s->payloadBytes());
    stacks += s->stacks() ? 1 : 0;
  }
  job.control->payloadBytes.store(most);
  job.control->stackListeners.store(stacks);
}

}  // namespace mos
