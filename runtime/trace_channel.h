#pragma once
// How trace events get from the supervisor that routes a guest's calls to the subscribers of
// mosd's Node.traceJob (protocol/trace.capnp; docs/design.md "Tracing").
//
//   supervisor (any thread)                         mosd
//   TracePublisher::active()  ── reads ──►  RUN_DIR/trace/<homeNode>-<homePid>   (TraceControl,
//     one relaxed load: the                     shared-mapped; mosd keeps `listeners` up to date)
//     only cost while nobody listens
//   TracePublisher::publish() ── message ──► RUN_DIR/trace.sock ── TraceHub ── TraceSink.events
//     (a flat Cap'n Proto TraceEvent,          (SOCK_SEQPACKET, one connection per publisher,
//      MSG_DONTWAIT)                            non-blocking: a full socket buffer drops the
//                                               event and counts it in TraceEvent.lost)
//
// A control file is created by whichever side comes first, so a subscription made before the
// job's guest arrives (mosrun --trace) takes effect from its first call.

#include <kj/async.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "trace.capnp.h"
#include "trace_format.h"
#include "uv_event_port.h"

namespace mos {

// The shared control record of one job on one node. Fixed layout (version 1), 64 bytes on disk.
struct TraceControl {
  static constexpr uint32_t MAGIC = 0x54534f4d;  // "MOST"
  uint32_t magic;
  uint32_t version;
  std::atomic<uint32_t> listeners;       // subscriptions mosd holds for the job now
  std::atomic<uint32_t> payloadBytes;    // largest -s among them: bytes of each payload to keep
  std::atomic<uint32_t> stackListeners;  // how many of them want stacks (-k)
};

// RUN_DIR/trace/<homeNode>-<homePid> and RUN_DIR/trace.sock.
std::string traceControlPath(const std::string& runDir, uint32_t homeNode, int32_t homePid);
std::string traceSocketPath(const std::string& runDir);

// Maps (creating if needed) the control record of a job. Throws kj::Exception (FAILED) naming
// the file on I/O errors. The mapping stays until process exit or unmapTraceControl.
TraceControl* mapTraceControl(const std::string& runDir, uint32_t homeNode, int32_t homePid);
void unmapTraceControl(TraceControl* control);

// TraceRecord <-> the wire. Payloads are cut to `payloadBytes`, except paths (kept up to PATH_MAX:
// strace never cuts them) and structs (256 bytes, so stat is decoded with any -s).
void toProto(const TraceRecord& record, uint32_t payloadBytes, proto::TraceEvent::Builder out);
TraceRecord fromProto(proto::TraceEvent::Reader event);

// The supervisor's side: one per job process it serves; publish() is safe from any thread.
//
// The hook on the forwarded path:
//   if (KJ_UNLIKELY(publisher.active())) { publisher.publish(record); }
class TracePublisher {
 public:
  // A disabled publisher: active() is false forever.
  TracePublisher() = default;
  // Publishes for job `homePid` of `homeNode` to the mosd of RUN_DIR. Throws kj::Exception
  // (FAILED) when the control record cannot be made.
  TracePublisher(const std::string& runDir, uint32_t homeNode, int32_t homePid);
  ~TracePublisher();
  KJ_DISALLOW_COPY(TracePublisher);

  // True while at least one subscriber listens: one relaxed load.
  bool active() const {
    return control_ != nullptr && control_->listeners.load(std::memory_order_relaxed) != 0;
  }
  // Bytes of each payload worth capturing now (the subscribers' largest -s; at least 32).
  uint32_t payloadBytes() const;
  // True while a subscriber wants the guest's stack at each call (mostrace -k).
  bool wantsStacks() const {
    return control_ != nullptr && control_->stackListeners.load(std::memory_order_relaxed) != 0;
  }

  // Sends one event (seq and lost are filled here). Never blocks: when mosd's socket is full or
  // missing the event is dropped and counted. Returns false when it was dropped.
  bool publish(const TraceRecord& record);

  uint64_t published() const { return seq_.load(std::memory_order_relaxed); }
  uint64_t lost() const { return lost_.load(std::memory_order_relaxed); }

 private:
  // The connection to mosd, made on first use and again after mosd restarted; -1 without one.
  int connection();

  TraceControl* control_ = nullptr;
  std::string socketPath_;
  std::atomic<int> socket_{-1};
  std::mutex connectMutex_;   // connecting and retiring only
  std::vector<int> retired_;  // broken connections, closed with the publisher
  std::atomic<uint64_t> seq_{0};
  std::atomic<uint64_t> lost_{0};
  int32_t jobPid_ = 0;  // the job's home pid: TraceEvent.jobPid, mosd's key for the subscriptions
};

// One trapped call being traced, for the supervisor: while nobody listens the constructor is one
// predictable branch and every other member returns at once. Usage around the dispatch:
//
//   TraceCall trace(publisher_, homePid, homeTid, node, homeNode, notif.data.nr, notif.data.args);
//   Answer answer = dispatch(notif, trace);   // handlers may call trace.payload(), trace.home()
//   trace.finish(answer.value, route);        // publishes
class TraceCall {
 public:
  // A call nobody traces (every member returns at once).
  TraceCall() = default;
  TraceCall(TracePublisher& publisher, int32_t pid, int32_t tid, uint32_t node, uint32_t homeNode,
            int nr, const uint64_t (&args)[6]) {
    if (KJ_UNLIKELY(publisher.active())) {
      begin(publisher, pid, tid, node, homeNode, nr, args);
    }
  }
  // The same with a seccomp_notif's arguments (__u64 is unsigned long long).
  TraceCall(TracePublisher& publisher, int32_t pid, int32_t tid, uint32_t node, uint32_t homeNode,
            int nr, const unsigned long long (&args)[6]) {
    if (KJ_UNLIKELY(publisher.active())) {
      begin(publisher, pid, tid, node, homeNode, nr, args);
    }
  }
  KJ_DISALLOW_COPY(TraceCall);

  bool active() const { return publisher_ != nullptr; }
  // The bytes argument `arg` points to (a path without its NUL, an in-buffer as sent home, an
  // out-buffer or struct as written back), `length` bytes in full; a prefix is kept.
  void payload(int arg, kj::ArrayPtr<const kj::byte> data, uint64_t length) {
    if (KJ_UNLIKELY(active())) {
      setPayload(arg, data, length);
    }
  }
  // True when the event will be published and a subscriber wants stacks: then the caller
  // unwinds the guest (remote/guest_stack.h, traceGuestStack) and hands the frames to stack().
  bool wantsStack() const { return active() && publisher_->wantsStacks(); }
  void stack(std::vector<TraceFrame> frames) {
    if (KJ_UNLIKELY(active())) {
      record_.stack = kj::mv(frames);
    }
  }
  // Time the call spent executing at home, microseconds (forwarded calls).
  void home(uint32_t us) {
    if (KJ_UNLIKELY(active())) {
      record_.homeUs = us;
    }
  }
  // Adds `ns` nanoseconds at home (SyscallReply.homeNs of each round trip the call made); once
  // any is added, it replaces what home() set.
  void addHomeNs(uint64_t ns) {
    if (KJ_UNLIKELY(active())) {
      homeNs_ += ns;
    }
  }
  // The route finish(result) reports (FORWARDED until set).
  void setRoute(TraceRoute route) {
    if (KJ_UNLIKELY(active())) {
      record_.route = route;
    }
  }
  // Publishes the call with what the guest sees (`result`: >= 0 or -errno) and its route.
  void finish(int64_t result, TraceRoute route) {
    if (KJ_UNLIKELY(active())) {
      publish(result, route);
    }
  }
  void finish(int64_t result) {
    if (KJ_UNLIKELY(active())) {
      publish(result, record_.route);
    }
  }
  // Publishes a call the guest's own kernel ran (SECCOMP_USER_NOTIF_FLAG_CONTINUE): its result
  // is not known here (`= ?`).
  void finishContinued() {
    if (KJ_UNLIKELY(active())) {
      record_.resultUnknown = true;
      publish(0, record_.route);
    }
  }

 private:
  void begin(TracePublisher& publisher, int32_t pid, int32_t tid, uint32_t node, uint32_t homeNode,
             int nr, const uint64_t (&args)[6]);
  void begin(TracePublisher& publisher, int32_t pid, int32_t tid, uint32_t node, uint32_t homeNode,
             int nr, const unsigned long long (&args)[6]);
  void setPayload(int arg, kj::ArrayPtr<const kj::byte> data, uint64_t length);
  void publish(int64_t result, TraceRoute route);

  TracePublisher* publisher_ = nullptr;
  TraceRecord record_;
  uint64_t startMonotonicNs_ = 0;
  uint64_t homeNs_ = 0;
};

// A subscriber's TraceSink that hands every event to `onEvent` (in order) and the end to `onEnd`.
class CallbackTraceSink final : public proto::TraceSink::Server {
 public:
  // `onBatch` (optional) runs after the events of each TraceSink.events call.
  CallbackTraceSink(std::function<void(TraceRecord&&)> onEvent,
                    std::function<void(const std::string&)> onEnd,
                    std::function<void()> onBatch = nullptr)
      : onEvent_(kj::mv(onEvent)), onEnd_(kj::mv(onEnd)), onBatch_(kj::mv(onBatch)) {}

  // Events mosd dropped for this subscriber (it fell 4096 events behind).
  uint64_t dropped() const { return dropped_; }

 protected:
  kj::Promise<void> events(EventsContext context) override;
  kj::Promise<void> ended(EndedContext context) override;

 private:
  std::function<void(TraceRecord&&)> onEvent_;
  std::function<void(const std::string&)> onEnd_;
  std::function<void()> onBatch_;
  uint64_t dropped_ = 0;
};

// mosd's side: receives events on RUN_DIR/trace.sock and hands each to the subscriptions of its
// job. Runs on mosd's loop; not thread safe.
class TraceHub final : private kj::TaskSet::ErrorHandler {
 public:
  // Binds RUN_DIR/trace.sock (replacing a stale one). Throws kj::Exception (FAILED) on errors.
  TraceHub(UvEventPort& port, std::string runDir);
  ~TraceHub();
  KJ_DISALLOW_COPY(TraceHub);

  // Receives until the hub is destroyed.
  kj::Promise<void> run();

  // A new subscription for Node.traceJob.
  proto::TraceSubscription::Client subscribe(int32_t homePid, uint32_t homeNode,
                                             proto::TraceFilter::Reader filter,
                                             proto::TraceSink::Client sink);

  uint64_t received() const { return received_; }

  // Handles every message the publishers have sent so far (TraceSubscription.stats).
  void drain();

  class Subscription;  // trace_channel.cc

 private:
  friend class Subscription;
  using Key = std::pair<uint32_t, int32_t>;  // (homeNode, homePid)
  struct Job {
    TraceControl* control = nullptr;
    std::vector<Subscription*> subscriptions;
  };
  // Sets the listener count of every control record in RUN_DIR/trace to 0 (mosd restarted).
  void resetControls();
  struct Connection;  // one publisher
  kj::Promise<void> receive(Connection* connection);
  // Handles every message waiting on `fd`; false when the publisher closed it.
  bool receiveAll(int fd);
  void detach(Subscription* subscription);
  void taskFailed(kj::Exception&& exception) override;
  void updatePayloadBytes(Job& job);

  UvEventPort& port_;
  std::string runDir_;
  std::string socketPath_;
  kj::AutoCloseFd socket_;
  kj::Own<UvFdWatcher> watcher_;
  std::map<Key, Job> jobs_;
  std::map<Connection*, kj::Own<Connection>> connections_;
  kj::Array<capnp::word> buffer_;
  uint64_t received_ = 0;
  kj::TaskSet tasks_;  // last: receive loops die before the connections they use
};

}  // namespace mos
