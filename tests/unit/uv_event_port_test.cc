#include "uv_event_port.h"

#include <capnp/rpc-twoparty.h>
#include <kj/debug.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <thread>

#include "node.capnp.h"

namespace {

// A libuv loop with the KJ adapter on it; checks that nothing is left on the loop at the end.
struct LoopFixture {
  uv_loop_t loop;
  kj::Own<mos::UvEventPort> port;
  kj::Own<kj::WaitScope> waitScope;

  LoopFixture() {
    REQUIRE(uv_loop_init(&loop) == 0);
    port = kj::heap<mos::UvEventPort>(&loop);
    waitScope = kj::heap<kj::WaitScope>(port->kjLoop());
  }
  ~LoopFixture() {
    waitScope = nullptr;
    port = nullptr;
    uv_run(&loop, UV_RUN_NOWAIT);
    CHECK(uv_loop_close(&loop) == 0);  // UV_EBUSY: a handle was leaked
  }
};

// Counts the libuv loop's iterations: a prepare callback runs once per iteration, right before
// libuv computes its poll timeout and blocks (or not). Unreferenced, so it keeps nothing alive.
struct IterationCounter {
  uv_prepare_t handle;
  uint64_t count = 0;

  explicit IterationCounter(uv_loop_t* loop) {
    REQUIRE(uv_prepare_init(loop, &handle) == 0);
    handle.data = this;
    REQUIRE(uv_prepare_start(&handle, [](uv_prepare_t* h) {
              static_cast<IterationCounter*>(h->data)->count++;
            }) == 0);
    uv_unref(reinterpret_cast<uv_handle_t*>(&handle));
  }
  ~IterationCounter() {
    uv_close(reinterpret_cast<uv_handle_t*>(&handle), nullptr);
    uv_run(handle.loop, UV_RUN_NOWAIT);
  }
};

// CPU time (user + system) of the whole process so far, in milliseconds.
double processCpuMs() {
  timespec ts;
  KJ_SYSCALL(clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts));
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

double elapsedMs(std::chrono::steady_clock::time_point since) {
  auto elapsed = std::chrono::steady_clock::now() - since;
  return std::chrono::duration<double, std::milli>(elapsed).count();
}

std::pair<kj::AutoCloseFd, kj::AutoCloseFd> socketPair() {
  int fds[2];
  KJ_SYSCALL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds));
  return {kj::AutoCloseFd(fds[0]), kj::AutoCloseFd(fds[1])};
}

class TestNode final : public mos::proto::Node::Server {
 public:
  int calls = 0;

 protected:
  kj::Promise<void> status(StatusContext context) override {
    calls++;
    auto s = context.getResults().initStatus();
    s.setNodeId(42);
    s.setVersion("test");
    s.setCpus(3);
    s.setLoad(1.5);
    return kj::READY_NOW;
  }
  kj::Promise<void> listJobs(ListJobsContext context) override {
    calls++;
    auto jobs = context.getResults().initJobs(2);
    jobs[0].setHomePid(100);
    jobs[0].setCommand("sleep");
    jobs[1].setHomePid(200);
    jobs[1].setCommand(std::string(100000, 'x'));  // bigger than a socket buffer
    return kj::READY_NOW;
  }
};

}  // namespace

TEST_CASE("capnp RPC round trip over a socketpair with the uv adapter on both ends", "[node][uv]") {
  LoopFixture f;
  auto [a, b] = socketPair();
  auto serverStream = kj::heap<mos::UvFdStream>(*f.port, kj::mv(a));
  auto clientStream = kj::heap<mos::UvFdStream>(*f.port, kj::mv(b));

  auto impl = kj::heap<TestNode>();
  TestNode& node = *impl;
  capnp::TwoPartyServer server(kj::mv(impl));
  auto served = server.accept(*serverStream);

  {
    capnp::TwoPartyClient client(*clientStream);
    auto cap = client.bootstrap().castAs<mos::proto::Node>();
    auto status = cap.statusRequest().send().wait(*f.waitScope);
    CHECK(status.getStatus().getNodeId() == 42);
    CHECK(status.getStatus().getVersion() == "test");
    CHECK(status.getStatus().getCpus() == 3);
    CHECK(status.getStatus().getLoad() == 1.5);

    auto jobs = cap.listJobsRequest().send().wait(*f.waitScope);
    REQUIRE(jobs.getJobs().size() == 2);
    CHECK(jobs.getJobs()[0].getHomePid() == 100);
    CHECK(jobs.getJobs()[0].getCommand() == "sleep");
    CHECK(jobs.getJobs()[1].getCommand().size() == 100000);
    CHECK(node.calls == 2);
  }
  // The client's end is gone (its RpcSystem shut down the stream): the server side sees the
  // disconnect and its accept() promise resolves.
  clientStream = nullptr;
  served.wait(*f.waitScope);
}

TEST_CASE("uv stream moves a large buffer both ways and sees end of stream", "[node][uv]") {
  LoopFixture f;
  auto [a, b] = socketPair();
  mos::UvFdStream left(*f.port, kj::mv(a));
  mos::UvFdStream right(*f.port, kj::mv(b));

  constexpr size_t SIZE = 4 << 20;  // far beyond the socket buffers: many EAGAINs
  auto out = kj::heapArray<kj::byte>(SIZE);
  for (size_t i = 0; i < SIZE; i++) {
    out[i] = kj::byte(i * 7 + 3);
  }
  auto in = kj::heapArray<kj::byte>(SIZE);
  kj::ArrayPtr<const kj::byte> pieces[] = {out.slice(0, 1000), out.slice(1000, SIZE)};
  auto written = left.write(kj::arrayPtr(pieces, 2)).then([&]() { left.shutdownWrite(); });
  auto read = right.read(in.begin(), SIZE);
  read.wait(*f.waitScope);
  written.wait(*f.waitScope);
  CHECK(memcmp(in.begin(), out.begin(), SIZE) == 0);

  kj::byte extra;
  CHECK(right.tryRead(&extra, 1, 1).wait(*f.waitScope) == 0);  // end of stream
}

TEST_CASE("uv stream reports a closed peer to whenWriteDisconnected and to write", "[node][uv]") {
  LoopFixture f;
  auto [a, b] = socketPair();
  mos::UvFdStream stream(*f.port, kj::mv(a));
  auto disconnected = stream.whenWriteDisconnected();
  auto second = stream.whenWriteDisconnected();
  CHECK(!disconnected.poll(*f.waitScope));
  b = nullptr;  // close the peer
  disconnected.wait(*f.waitScope);
  second.wait(*f.waitScope);

  auto result = stream.write("x", 1).then(
      []() { return false; },
      [](kj::Exception&& e) { return e.getType() == kj::Exception::Type::DISCONNECTED; });
  CHECK(result.wait(*f.waitScope));
}

TEST_CASE("uv timers resolve in order and cancel cleanly", "[node][uv]") {
  LoopFixture f;
  uint64_t start = uv_now(&f.loop);
  std::vector<int> order;
  // eagerlyEvaluate: a join runs lazy continuations in array order, not in firing order.
  auto later = f.port->afterDelay(60).then([&]() { order.push_back(60); }).eagerlyEvaluate(nullptr);
  auto sooner =
      f.port->afterDelay(20).then([&]() { order.push_back(20); }).eagerlyEvaluate(nullptr);
  auto cancelled = f.port->afterDelay(10).then([&]() { order.push_back(10); });
  cancelled = nullptr;
  kj::joinPromises(kj::arr(kj::mv(later), kj::mv(sooner))).wait(*f.waitScope);
  uv_update_time(&f.loop);
  CHECK(uv_now(&f.loop) - start >= 60);
  CHECK(order == std::vector<int>{20, 60});

  auto never = kj::Promise<int>(kj::NEVER_DONE);
  auto timedOut = f.port->timeoutAfter(10, kj::str("too slow"), kj::mv(never))
                      .then([](int) { return kj::str("value"); },
                            [](kj::Exception&& e) { return kj::str(e.getDescription()); });
  CHECK(timedOut.wait(*f.waitScope) == "too slow");
}

TEST_CASE("KJ continuations run under a plain uv_run", "[node][uv]") {
  LoopFixture f;
  int steps = 0;
  // Queued on the KJ loop; nobody calls Promise::wait(): only uv_run() drives it.
  auto task = kj::evalLater([&]() { steps++; })
                  .then([&]() { return f.port->afterDelay(5); })
                  .then([&]() {
                    steps++;
                    uv_stop(&f.loop);
                  })
                  .eagerlyEvaluate(nullptr);
  uv_timer_t guard;  // keeps uv_run from returning early for want of handles
  uv_timer_init(&f.loop, &guard);
  uv_timer_start(
      &guard, [](uv_timer_t* t) { uv_stop(t->loop); }, 60000, 0);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  uv_close(reinterpret_cast<uv_handle_t*>(&guard), nullptr);
  uv_run(&f.loop, UV_RUN_NOWAIT);
  CHECK(steps == 2);
}

TEST_CASE("a wait on a timer after queued work sleeps instead of spinning", "[node][uv]") {
  LoopFixture f;
  IterationCounter iterations(&f.loop);
  int ran = 0;
  auto start = std::chrono::steady_clock::now();
  double cpuBefore = processCpuMs();
  // The queued event makes KJ call setRunnable(true) inside this one wait(); the queue then
  // drains while the timer runs, with no setRunnable(false) until the wait() returns.
  kj::evalLater([&]() {
    ran++;
    return f.port->afterDelay(300);
  }).wait(*f.waitScope);
  double cpuMs = processCpuMs() - cpuBefore;
  double wallMs = elapsedMs(start);
  CHECK(ran == 1);
  CHECK(wallMs >= 299);
  INFO("CPU used while waiting: " << cpuMs << " ms in " << wallMs << " ms; loop iterations: "
                                  << iterations.count);
  CHECK(cpuMs <= 20);
  CHECK(iterations.count <= 10);
}

TEST_CASE("a plain uv_run waiting on a KJ timer sleeps instead of spinning", "[node][uv]") {
  LoopFixture f;
  IterationCounter iterations(&f.loop);
  auto start = std::chrono::steady_clock::now();
  double cpuBefore = processCpuMs();
  auto task = kj::evalLater([&]() { return f.port->afterDelay(300); })
                  .then([&]() { uv_stop(&f.loop); })
                  .eagerlyEvaluate(nullptr);
  uv_timer_t guard;  // keeps uv_run from returning early for want of handles
  uv_timer_init(&f.loop, &guard);
  uv_timer_start(
      &guard, [](uv_timer_t* t) { uv_stop(t->loop); }, 5000, 0);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  double cpuMs = processCpuMs() - cpuBefore;
  double wallMs = elapsedMs(start);
  uv_close(reinterpret_cast<uv_handle_t*>(&guard), nullptr);
  uv_run(&f.loop, UV_RUN_NOWAIT);
  CHECK(wallMs >= 299);
  CHECK(wallMs < 4000);  // stopped by the KJ timer, not the guard
  INFO("CPU used while waiting: " << cpuMs << " ms; loop iterations: " << iterations.count);
  CHECK(cpuMs <= 20);
  CHECK(iterations.count <= 10);
}

TEST_CASE("a timer that falls due while KJ is busy resolves without another event", "[node][uv]") {
  LoopFixture f;
  uv_timer_t guard;  // would end libuv's block after 5 s if the port blocked with work queued
  uv_timer_init(&f.loop, &guard);
  uv_timer_start(
      &guard, [](uv_timer_t*) {}, 5000, 0);
  auto start = std::chrono::steady_clock::now();
  auto timer = f.port->afterDelay(1);
  // Busy past the timer's deadline, so libuv fires it at the top of the next wait()'s uv_run,
  // queueing KJ work just before it would block.
  kj::evalLater([]() { usleep(20000); })
      .then([&]() { return kj::mv(timer); })
      .wait(*f.waitScope);
  CHECK(elapsedMs(start) < 2000);
  uv_close(reinterpret_cast<uv_handle_t*>(&guard), nullptr);
  uv_run(&f.loop, UV_RUN_NOWAIT);
}

TEST_CASE("another thread wakes the loop through the executor", "[node][uv]") {
  LoopFixture f;
  auto paf = kj::newPromiseAndFulfiller<int>();
  const kj::Executor& executor = kj::getCurrentThreadExecutor();
  std::thread other([&]() {
    usleep(20000);
    executor.executeSync([&]() { paf.fulfiller->fulfill(7); });
  });
  CHECK(paf.promise.wait(*f.waitScope) == 7);
  other.join();
}

TEST_CASE("uv listener accepts TCP connections on 127.0.0.1", "[node][uv]") {
  LoopFixture f;
  mos::UvTcpListener listener(*f.port, mos::makeSockaddr(0x7f000001, 0));
  REQUIRE(listener.port() != 0);
  auto accepted = listener.accept();
  auto source = mos::makeSockaddr(0x7f000002, 0);
  auto client = mos::connectTcp(*f.port, mos::makeSockaddr(0x7f000001, listener.port()), &source)
                    .wait(*f.waitScope);
  auto conn = accepted.wait(*f.waitScope);
  CHECK(ntohl(conn.peer.sin_addr.s_addr) == 0x7f000002);
  mos::UvFdStream server(*f.port, kj::mv(conn.fd));
  client->write("hello", 5).wait(*f.waitScope);
  char buf[5];
  server.read(buf, 5).wait(*f.waitScope);
  CHECK(std::string(buf, 5) == "hello");

  // Nobody listens on the port anymore after the listener goes: refused, DISCONNECTED.
  uint16_t port = listener.port();
  mos::UvTcpListener other(*f.port, mos::makeSockaddr(0x7f000001, 0));
  (void)other;
  auto refused = mos::connectTcp(*f.port, mos::makeSockaddr(0x7f000001, 1), nullptr)
                     .then([](kj::Own<mos::UvFdStream>) { return kj::Exception::Type::FAILED; },
                           [](kj::Exception&& e) { return e.getType(); });
  CHECK(refused.wait(*f.waitScope) == kj::Exception::Type::DISCONNECTED);
  (void)port;
}
