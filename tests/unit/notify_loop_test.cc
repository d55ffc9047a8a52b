// The supervisor's notification loop without a kernel: fakes of the listener (SeccompUnotify) and
// of the guest (GuestProcess), and a scripted deputy on the other end of the job channel, in a
// thread of its own. The loop runs in the test's thread (Supervisor::turn). What is checked is
// what the guest would see (the answer, the bytes written into its memory, the signals queued on
// it and their order against the answer), what reached home, and whether a call was repeated.

#include "supervisor.h"

#include <fcntl.h>
#include <linux/audit.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "deputy.h"
#include "fake_guest_memory.h"
#include "signals.h"

using namespace mos;
using namespace mos::remote;
using mos::testing::FakeMemory;

namespace {

constexpr int32_t HOME_PID = 4242;
constexpr pid_t GUEST_PID = 31337;  // the fake guest's pid here; no process of that pid is touched
constexpr uint64_t BUF = 0x10000;   // a guest buffer of 64 bytes, filled with 0xee
constexpr auto DEADLINE = std::chrono::seconds(10);

uint64_t bit(int sig) { return uint64_t{1} << (sig - 1); }

// Thrown by the loop's exit action: the job ended with `status`.
struct JobEnded {
  int status;
};

kj::AutoCloseFd newEventFd() {
  int fd;
  KJ_SYSCALL(fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  return kj::AutoCloseFd(fd);
}

void raise(int fd) {
  uint64_t one = 1;
  KJ_SYSCALL(write(fd, &one, sizeof one));
}

void drain(int fd) {
  uint64_t value;
  while (read(fd, &value, sizeof value) == sizeof value) {
  }
}

// The kernel as both fakes see it. The deputy's thread may cancel a notification or end the
// guest (a kernel event while a call is at home), so it is guarded.
struct FakeKernel {
  std::mutex mutex;
  // What the loop did to the guest, in order: "answer ID VALUE", "continue ID", "send ID ENOENT",
  // "signal SIG", "addfd ID NEWFD", "kill".
  std::vector<std::string> log;
  std::set<uint64_t> waiting;  // received, not answered, target still in the call
  uint64_t pending = 0;        // the guest's pending signals (thread and process together)
  uint64_t blocked = 0;        // its signal mask
  std::deque<int> statuses;    // its changes of state not yet reaped, as waitpid(2) statuses
  kj::AutoCloseFd guestEvents = newEventFd();  // readable while `statuses` is not empty

  void note(std::string event) {
    std::lock_guard<std::mutex> lock(mutex);
    log.push_back(std::move(event));
  }
  std::vector<std::string> events() {
    std::lock_guard<std::mutex> lock(mutex);
    return log;
  }
  // Notification `id` is gone: its target was killed, or a signal handler interrupted it.
  void cancel(uint64_t id) {
    std::lock_guard<std::mutex> lock(mutex);
    waiting.erase(id);
  }
  // The guest changes state: `status` as waitpid(2) reports it (SIGCHLD).
  void guestChanged(int status) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      statuses.push_back(status);
    }
    raise(guestEvents.get());
  }
  void setSignals(uint64_t pendingMask, uint64_t blockedMask) {
    std::lock_guard<std::mutex> lock(mutex);
    pending = pendingMask;
    blocked = blockedMask;
  }
};

class FakeUnotify final : public SeccompUnotify {
 public:
  explicit FakeUnotify(FakeKernel& kernel) : kernel_(kernel), ready_(newEventFd()) {}

  // The guest traps into syscall `nr` with `args`. Returns the notification's id.
  uint64_t trap(int nr, std::vector<uint64_t> args) {
    seccomp_notif notif = {};
    notif.id = nextId_;
    nextId_ += 7;  // cookies are opaque, not consecutive
    notif.pid = GUEST_PID;
    notif.data.nr = nr;
    notif.data.arch = AUDIT_ARCH_X86_64;
    for (size_t i = 0; i < args.size(); i++) {
      notif.data.args[i] = args[i];
    }
    queue_.push_back(notif);
    raise(ready_.get());
    return notif.id;
  }

  int fd() const override { return ready_.get(); }

  int receive(seccomp_notif& notif) override {
    drain(ready_.get());
    if (queue_.empty()) {
      return ENOENT;
    }
    notif = queue_.front();
    queue_.pop_front();
    if (!queue_.empty()) {
      raise(ready_.get());
    }
    {
      std::lock_guard<std::mutex> lock(kernel_.mutex);
      kernel_.waiting.insert(notif.id);
    }
    received++;
    if (onReceive) {
      onReceive(notif.id);
    }
    return 0;
  }

  int send(const seccomp_notif_resp& resp) override {
    std::lock_guard<std::mutex> lock(kernel_.mutex);
    if (kernel_.waiting.erase(resp.id) == 0) {
      kernel_.log.push_back(fmt::format("send {} ENOENT", resp.id));
      return ENOENT;
    }
    if (resp.flags & SECCOMP_USER_NOTIF_FLAG_CONTINUE) {
      KJ_REQUIRE(resp.val == 0 && resp.error == 0, "CONTINUE with a value: EINVAL");
      kernel_.log.push_back(fmt::format("continue {}", resp.id));
    } else {
      kernel_.log.push_back(
          fmt::format("answer {} {}", resp.id, resp.error != 0 ? int64_t{resp.error} : resp.val));
    }
    return 0;
  }

  bool idValid(uint64_t id) override {
    std::lock_guard<std::mutex> lock(kernel_.mutex);
    return kernel_.waiting.count(id) > 0;
  }

  int addFd(const seccomp_notif_addfd& addfd) override {
    {
      std::lock_guard<std::mutex> lock(kernel_.mutex);
      if (kernel_.waiting.count(addfd.id) == 0) {
        return -ENOENT;
      }
    }
    kernel_.note(fmt::format("addfd {} {}", addfd.id, addfd.newfd));
    added = addfd;
    char bytes[256];
    ssize_t n = pread(addfd.srcfd, bytes, sizeof bytes, 0);
    addedContent = n > 0 ? std::string(bytes, n) : std::string();
    if (addFdError != 0) {
      return -addFdError;
    }
    return static_cast<int>(addfd.newfd);
  }

  size_t received = 0;
  std::function<void(uint64_t id)> onReceive;  // runs as the notification is received
  int addFdError = 0;                          // the errno ADDFD fails with; 0: it works
  seccomp_notif_addfd added = {};              // the last ADDFD
  std::string addedContent;                    // what its srcfd held

 private:
  FakeKernel& kernel_;
  kj::AutoCloseFd ready_;
  std::deque<seccomp_notif> queue_;
  uint64_t nextId_ = 0x5eed0000;
};

class FakeGuest final : public GuestProcess {
 public:
  explicit FakeGuest(FakeKernel& kernel) : kernel_(kernel) {
    space.map(BUF, std::vector<uint8_t>(64, 0xee));
  }

  pid_t pid() const override { return GUEST_PID; }
  GuestMemory& memory() override { return space; }

  void queueSignal(int sig, const siginfo_t* info) override {
    kernel_.note(fmt::format("signal {}", sig));
    std::lock_guard<std::mutex> lock(kernel_.mutex);
    kernel_.pending |= bit(sig);
  }

  // Only "status" is asked for by these tests: the signal lines the loop reads.
  std::string procFile(const std::string& name) override {
    if (name != "status") {
      return "";
    }
    if (onStatusRead) {
      onStatusRead();
    }
    std::lock_guard<std::mutex> lock(kernel_.mutex);
    return fmt::format(
        "Name:\tjob\nPid:\t{}\nSigQ:\t0/63229\nSigPnd:\t{:016x}\nShdPnd:\t{:016x}\n"
        "SigBlk:\t{:016x}\nSigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\n",
        GUEST_PID, uint64_t{0}, kernel_.pending, kernel_.blocked);
  }

  int eventFd() const override { return kernel_.guestEvents.get(); }

  kj::Maybe<int> nextEvent() override {
    drain(kernel_.guestEvents.get());
    std::lock_guard<std::mutex> lock(kernel_.mutex);
    if (kernel_.statuses.empty()) {
      return nullptr;
    }
    int status = kernel_.statuses.front();
    kernel_.statuses.pop_front();
    return status;
  }

  void kill() override { kernel_.note("kill"); }

  FakeMemory space;                    // its address space: 64 bytes at BUF
  std::function<void()> onStatusRead;  // runs when the loop looks at the guest's signals

 private:
  FakeKernel& kernel_;
};

// The home side of the job channel, played by a script in a thread of its own: `onMessage` runs
// for every message the supervisor sends, `onUrgent` when it sends TCP urgent data (the cancel
// byte). Every message is kept for the test to look at.
class ScriptedDeputy {
 public:
  using OnMessage = std::function<void(proto::ToDeputy::Reader, ScriptedDeputy&)>;
  using OnUrgent = std::function<void(ScriptedDeputy&)>;

  ScriptedDeputy(int fd, OnMessage onMessage, OnUrgent onUrgent)
      : channel_(kj::AutoCloseFd(fd)),
        onMessage_(kj::mv(onMessage)),
        onUrgent_(kj::mv(onUrgent)),
        thread_([this]() { loop(); }) {}

  ~ScriptedDeputy() {
    stop_ = true;
    shutdown(channel_.fd(), SHUT_RDWR);  // a script stuck in a read (a failed test) returns
    thread_.join();
  }

  // --- for the script (the deputy's thread)
  void reply(uint64_t seq, int64_t ret, std::vector<std::string> out = {}, bool interrupted = false,
             uint64_t homeNs = 0) {
    capnp::MallocMessageBuilder message;
    auto r = message.initRoot<proto::ToRemote>().initReply();
    r.setSeq(seq);
    r.setRet(ret);
    r.setInterrupted(interrupted);
    r.setHomeNs(homeNs);
    auto list = r.initOut(out.size());
    for (size_t i = 0; i < out.size(); i++) {
      list.set(i, kj::arrayPtr(reinterpret_cast<const kj::byte*>(out[i].data()), out[i].size()));
    }
    channel_.send(message);
  }
  void signal(int sig) {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::ToRemote>().setSignal(sig);
    channel_.send(message);
  }
  void fileInfo(uint64_t id, const std::string& content) {
    capnp::MallocMessageBuilder message;
    auto info = message.initRoot<proto::ToRemote>().initFileInfo();
    info.setId(id);
    auto ref = info.initRef();
    ref.setPath(kj::StringPtr("/srv/lib/libjob.so").asBytes());
    ref.setDev(0x803);
    ref.setIno(4711);
    ref.setSize(content.size());
    ref.setMtimeNs(1700000000000000000);
    ref.setMode(S_IFREG | 0644);
    channel_.send(message);
  }
  void fileData(uint64_t id, const std::string& content) {
    capnp::MallocMessageBuilder message;
    auto data = message.initRoot<proto::ToRemote>().initFileData();
    data.setId(id);
    data.setOffset(0);
    data.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(content.data()), content.size()));
    data.setLast(true);
    channel_.send(message);
  }
  // The deputy is gone (P was SIGKILLed): the connection closes.
  void hangUp() { shutdown(channel_.fd(), SHUT_RDWR); }

  // --- for the test
  // The messages received so far, waiting up to DEADLINE for at least `count` of them.
  std::vector<kj::Array<capnp::word>> received(size_t count = 0) {
    auto until = std::chrono::steady_clock::now() + DEADLINE;
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait_until(lock, until, [&] { return messages_.size() >= count; });
    std::vector<kj::Array<capnp::word>> copies;
    for (auto& m : messages_) {
      copies.push_back(kj::heapArray<capnp::word>(m.asPtr()));
    }
    return copies;
  }
  int urgent() {
    std::lock_guard<std::mutex> lock(mutex_);
    return urgent_;
  }

 private:
  void loop() {
    try {
      while (!stop_) {
        if (!channel_.hasBuffered()) {
          struct pollfd pfd = {channel_.fd(), POLLIN | POLLPRI, 0};
          if (poll(&pfd, 1, 20) <= 0) {
            continue;
          }
          // Regular bytes first: the request that the urgent byte cancels came before it.
          char byte;
          ssize_t n = recv(channel_.fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
          if (n == 0) {
            return;  // the supervisor closed the channel
          }
          if (n < 0) {
            if ((pfd.revents & POLLPRI) &&
                recv(channel_.fd(), &byte, 1, MSG_OOB | MSG_DONTWAIT) == 1) {
              {
                std::lock_guard<std::mutex> lock(mutex_);
                urgent_++;
              }
              if (onUrgent_) {
                onUrgent_(*this);
              }
            }
            continue;
          }
        }
        KJ_IF_MAYBE (message, channel_.receive()) {
          capnp::MallocMessageBuilder copy;
          copy.setRoot((*message)->getRoot<proto::ToDeputy>());
          auto words = capnp::messageToFlatArray(copy);
          {
            std::lock_guard<std::mutex> lock(mutex_);
            messages_.push_back(kj::mv(words));
          }
          changed_.notify_all();
          if (onMessage_) {
            onMessage_((*message)->getRoot<proto::ToDeputy>(), *this);
          }
        } else {
          return;
        }
      }
    } catch (kj::Exception& e) {
      KJ_LOG(WARNING, "scripted deputy stopped", e);
    }
  }

  Channel channel_;
  OnMessage onMessage_;
  OnUrgent onUrgent_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<kj::Array<capnp::word>> messages_;
  int urgent_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: starts once everything else exists
};

proto::ToDeputy::Reader rootOf(const kj::Array<capnp::word>& words,
                               kj::Own<capnp::FlatArrayMessageReader>& keep) {
  keep = kj::heap<capnp::FlatArrayMessageReader>(words.asPtr());
  return keep->getRoot<proto::ToDeputy>();
}

// The deputy side is mos-deputy's own loop (Deputy::run) in a forked child, executing the
// forwarded calls in its process, with its signal handlers.
struct WithRealDeputy {};

// The trace stream the next Loop's supervisor publishes to (nullptr: untraced).
TracePublisher* loopTrace = nullptr;

// One job's supervisor loop over the fakes, with the deputy played by a script or the real one.
struct Loop {
  FakeKernel& kernel;
  FakeUnotify* unotify = nullptr;  // owned by the supervisor
  FakeGuest* guest = nullptr;      // owned by the supervisor
  std::string cacheDir;
  kj::Own<Supervisor> supervisor;
  kj::Own<ScriptedDeputy> deputy;
  pid_t deputyPid = -1;  // WithRealDeputy

  Loop(FakeKernel& kernel, ScriptedDeputy::OnMessage onMessage,
       ScriptedDeputy::OnUrgent onUrgent = nullptr)
      : kernel(kernel) {
    int home = start();
    deputy = kj::heap<ScriptedDeputy>(home, kj::mv(onMessage), kj::mv(onUrgent));
  }

  Loop(FakeKernel& kernel, WithRealDeputy) : kernel(kernel) {
    int home = start();
    deputyPid = fork();
    REQUIRE(deputyPid >= 0);
    if (deputyPid == 0) {
      deputy::blockAllSignals();
      deputy::installSignalHandlers();
      static deputy::ReservedFds fds;
      int high = fds.moveHigh(home);
      deputy::DeputyOptions options;
      options.node = 2;
      options.homeNode = 1;
      options.jobExe = "/bin/true";
      deputy::Deputy real(options, fds, kj::heap<Channel>(kj::AutoCloseFd(high)));
      real.run();
    }
    close(home);
  }

  // Creates the supervisor over the fakes; returns the deputy's end of the job channel.
  int start() {
    signal(SIGPIPE, SIG_IGN);
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    // A script that never answers makes the supervisor's read fail after this long (the test
    // then fails), instead of hanging.
    struct timeval timeout = {10, 0};
    REQUIRE(setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) == 0);
    char dir[] = "/tmp/notify-loop-cache-XXXXXX";
    REQUIRE(mkdtemp(dir) != nullptr);
    cacheDir = dir;

    capnp::MallocMessageBuilder start;
    auto job = start.initRoot<proto::JobStart>();
    job.setHomeNode(1);
    job.setCommand("job");
    auto ids = job.initIds();
    ids.setPid(HOME_PID);
    ids.setTid(HOME_PID);
    ids.setUid(1000);
    ids.setEuid(1000);
    ids.setGid(100);
    ids.setEgid(100);
    auto words = capnp::messageToFlatArray(start);
    auto reader = kj::heap<capnp::FlatArrayMessageReader>(words.asPtr()).attach(kj::mv(words));

    SupervisorOptions options;
    options.fd = sv[0];
    options.node = 2;
    options.peerNode = 1;
    options.cacheDir = cacheDir;
    options.trace = loopTrace;
    auto fakeUnotify = kj::heap<FakeUnotify>(kernel);
    auto fakeGuest = kj::heap<FakeGuest>(kernel);
    unotify = fakeUnotify.get();
    guest = fakeGuest.get();
    auto exit = [](int status) { throw JobEnded{status}; };
    supervisor = kj::heap<Supervisor>(kj::mv(options), kj::mv(reader), kj::mv(fakeUnotify),
                                      kj::mv(fakeGuest), kj::mv(exit));
    return sv[1];
  }

  ~Loop() {
    deputy = nullptr;
    if (deputyPid > 0) {
      kill(deputyPid, SIGKILL);
      waitpid(deputyPid, nullptr, 0);
    }
    supervisor = nullptr;
    std::filesystem::remove_all(cacheDir);
  }

  // Runs the loop until it has received and handled the next notification.
  void serve() {
    size_t before = unotify->received;
    auto until = std::chrono::steady_clock::now() + DEADLINE;
    while (unotify->received == before) {
      REQUIRE(std::chrono::steady_clock::now() < until);
      supervisor->turn(100);
    }
  }

  // Runs the loop until it ends the job; returns the status it ended with.
  int serveUntilTheEnd() {
    auto until = std::chrono::steady_clock::now() + DEADLINE;
    try {
      while (std::chrono::steady_clock::now() < until) {
        supervisor->turn(100);
      }
    } catch (JobEnded& end) {
      return end.status;
    }
    FAIL("the job did not end");
    return -1;
  }

  // Runs the loop until `event` is in the kernel's log.
  void serveUntil(const std::string& event) {
    auto until = std::chrono::steady_clock::now() + DEADLINE;
    for (;;) {
      auto log = kernel.events();
      if (std::find(log.begin(), log.end(), event) != log.end()) {
        return;
      }
      REQUIRE(std::chrono::steady_clock::now() < until);
      supervisor->turn(100);
    }
  }

  std::string memoryAt(uint64_t addr, size_t n) {
    auto& bytes = guest->space.at(BUF);
    return std::string(bytes.begin() + (addr - BUF), bytes.begin() + (addr - BUF) + n);
  }
};

std::string answer(uint64_t id, int64_t value) { return fmt::format("answer {} {}", id, value); }

// A deputy that answers every syscall with `ret` and, for calls with out-buffers, `bytes`.
ScriptedDeputy::OnMessage answering(int64_t ret, std::string bytes = "") {
  return [ret, bytes](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
    if (m.isSyscall()) {
      auto call = m.getSyscall();
      d.reply(
          call.getSeq(), ret,
          call.getOut().size() > 0 ? std::vector<std::string>{bytes} : std::vector<std::string>{});
    }
  };
}

}  // namespace

TEST_CASE("a forwarded read answers the deputy's result and writes its bytes into the guest",
          "[remote][notify]") {
  FakeKernel kernel;
  Loop loop(kernel, answering(5, "hello"));
  uint64_t id = loop.unotify->trap(__NR_read, {3, BUF, 16});
  loop.serve();
  CHECK(kernel.events() == std::vector<std::string>{answer(id, 5)});
  CHECK(loop.memoryAt(BUF, 6) == "hello\xee");

  auto got = loop.deputy->received(1);
  REQUIRE(got.size() == 1);
  kj::Own<capnp::FlatArrayMessageReader> keep;
  auto m = rootOf(got[0], keep);
  REQUIRE(m.isSyscall());
  CHECK(m.getSyscall().getSeq() == id);
  CHECK(m.getSyscall().getNr() == __NR_read);
  CHECK(m.getSyscall().getArgs()[0] == 3);
  REQUIRE(m.getSyscall().getOut().size() == 1);
  CHECK(m.getSyscall().getOut()[0].getSize() == 16);
}

TEST_CASE("ids are answered from the JobStart cache without a round trip", "[remote][notify]") {
  FakeKernel kernel;
  Loop loop(kernel, answering(777));
  uint64_t pid = loop.unotify->trap(__NR_getpid, {});
  loop.serve();
  uint64_t uid = loop.unotify->trap(__NR_getuid, {});
  loop.serve();
  uint64_t ppid = loop.unotify->trap(__NR_getppid, {});
  loop.serve();
  CHECK(kernel.events() ==
        std::vector<std::string>{answer(pid, HOME_PID), answer(uid, 1000), answer(ppid, 777)});
  auto got = loop.deputy->received(1);
  REQUIRE(got.size() == 1);  // the getppid, and nothing before it
  kj::Own<capnp::FlatArrayMessageReader> keep;
  CHECK(rootOf(got[0], keep).getSyscall().getNr() == __NR_getppid);
}

TEST_CASE("a notification cancelled while its request is at home gets no answer and no bytes",
          "[remote][notify]") {
  FakeKernel kernel;
  Loop loop(kernel, [&kernel](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
    auto call = m.getSyscall();
    if (call.getNr() == __NR_read) {
      // The guest is killed while its read runs at home: the kernel forgets the notification.
      kernel.cancel(call.getSeq());
      d.reply(call.getSeq(), 5, {"hello"});
    } else {
      d.reply(call.getSeq(), 777);
    }
  });
  uint64_t read = loop.unotify->trap(__NR_read, {3, BUF, 16});
  loop.serve();
  CHECK(kernel.events().empty());           // no SEND: ID_VALID said the target is gone
  CHECK(loop.guest->space.writes.empty());  // and nothing was written into its memory

  // The loop goes on with the next notification.
  uint64_t next = loop.unotify->trap(__NR_getppid, {});
  loop.serve();
  CHECK(kernel.events() == std::vector<std::string>{answer(next, 777)});
  auto got = loop.deputy->received(2);
  REQUIRE(got.size() == 2);
  kj::Own<capnp::FlatArrayMessageReader> keep;
  CHECK(rootOf(got[0], keep).getSyscall().getSeq() == read);
  CHECK(rootOf(got[1], keep).getSyscall().getNr() == __NR_getppid);
}

TEST_CASE("a notification cancelled after its arguments were read sends nothing home",
          "[remote][notify]") {
  FakeKernel kernel;
  Loop loop(kernel, answering(777));
  memcpy(loop.guest->space.at(BUF).data(), "hello", 5);
  // The target dies right after trapping: what was read from "its" memory may be another
  // task's, so the write must not run at home.
  loop.unotify->onReceive = [&kernel](uint64_t id) { kernel.cancel(id); };
  loop.unotify->trap(__NR_write, {1, BUF, 5});
  loop.serve();
  CHECK(kernel.events().empty());

  loop.unotify->onReceive = nullptr;
  uint64_t next = loop.unotify->trap(__NR_getppid, {});
  loop.serve();
  CHECK(kernel.events() == std::vector<std::string>{answer(next, 777)});
  auto got = loop.deputy->received(1);
  REQUIRE(got.size() == 1);  // the getppid, and nothing before it
  kj::Own<capnp::FlatArrayMessageReader> keep;
  CHECK(rootOf(got[0], keep).getSyscall().getNr() == __NR_getppid);
}

TEST_CASE("a guest that dies mid-call: its answer finds no notification, the deputy gets its exit",
          "[remote][notify]") {
  FakeKernel kernel;
  Loop loop(kernel, [&kernel](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
    if (m.isSyscall()) {
      // SIGKILL (the OOM killer, say) while fsync runs at home.
      kernel.cancel(m.getSyscall().getSeq());
      kernel.guestChanged(SIGKILL);  // waitpid status: killed by SIGKILL, no core
      d.reply(m.getSyscall().getSeq(), 0);
    } else if (m.isExit()) {
      d.hangUp();  // the deputy ends the same way, closing the channel
    }
  });
  uint64_t id = loop.unotify->trap(__NR_fsync, {3});
  CHECK(loop.serveUntilTheEnd() == 0);
  // The answer found no notification, and the guest, already dead, was not killed again.
  CHECK(kernel.events() == std::vector<std::string>{fmt::format("send {} ENOENT", id)});

  auto got = loop.deputy->received(2);
  REQUIRE(got.size() == 2);
  kj::Own<capnp::FlatArrayMessageReader> keep;
  CHECK(rootOf(got[0], keep).getSyscall().getNr() == __NR_fsync);
  auto exit = rootOf(got[1], keep);
  REQUIRE(exit.isExit());
  CHECK(exit.getExit().getSignal() == SIGKILL);
  CHECK_FALSE(exit.getExit().getCoreDumped());
}

TEST_CASE("a reply for a call the kernel already dropped changes nothing", "[remote][notify]") {
  FakeKernel kernel;
  SECTION("the notification vanished while its call was at home") {
    Loop loop(kernel, [&kernel](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
      auto call = m.getSyscall();
      if (call.getNr() == __NR_fsync) {
        kernel.cancel(call.getSeq());
        d.reply(call.getSeq(), 0);
      } else {
        d.reply(call.getSeq(), 777);
      }
    });
    uint64_t dropped = loop.unotify->trap(__NR_fsync, {3});
    loop.serve();
    uint64_t next = loop.unotify->trap(__NR_getppid, {});
    loop.serve();
    CHECK(kernel.events() ==
          std::vector<std::string>{fmt::format("send {} ENOENT", dropped), answer(next, 777)});
  }

  SECTION("replies to calls the loop no longer waits for, during a call and between calls") {
    Loop loop(kernel, [](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
      auto seq = m.getSyscall().getSeq();
      d.reply(seq - 1, 99);
      d.reply(seq, 777);
      d.reply(seq - 2, 98);
    });
    uint64_t first = loop.unotify->trap(__NR_getppid, {});
    loop.serve();
    uint64_t second = loop.unotify->trap(__NR_getppid, {});
    loop.serve();
    CHECK(kernel.events() == std::vector<std::string>{answer(first, 777), answer(second, 777)});
    CHECK(loop.deputy->received(2).size() == 2);  // neither call was sent twice
  }
}

TEST_CASE("a file-backed mmap places the cached file at the guest's fd, or fails as ADDFD does",
          "[remote][notify][mmap]") {
  const std::string content =
      "\x7f"
      "ELF and the rest of the library";
  FakeKernel kernel;
  std::atomic<uint64_t> dies{0};  // a notification whose target dies while the file is fetched
  Loop loop(kernel, [&](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
    if (!m.isFetchFile()) {
      return;
    }
    auto fetch = m.getFetchFile();
    d.fileInfo(fetch.getId(), content);
    if (fetch.getWantData()) {
      if (dies != 0) {
        kernel.cancel(dies);
      }
      d.fileData(fetch.getId(), content);
    }
  });
  const std::vector<uint64_t> args = {0, 4096, PROT_READ, MAP_PRIVATE, 5, 0};

  SECTION("ADDFD works: the kernel runs the guest's own mmap") {
    uint64_t id = loop.unotify->trap(__NR_mmap, args);
    loop.serve();
    CHECK(kernel.events() ==
          std::vector<std::string>{fmt::format("addfd {} 5", id), fmt::format("continue {}", id)});
    CHECK(loop.unotify->added.flags == SECCOMP_ADDFD_FLAG_SETFD);
    CHECK(loop.unotify->added.newfd_flags == O_CLOEXEC);
    CHECK(loop.unotify->addedContent == content);
    // Identity first, then the bytes (a miss in an empty cache).
    auto got = loop.deputy->received(2);
    REQUIRE(got.size() == 2);
    kj::Own<capnp::FlatArrayMessageReader> keep;
    CHECK(rootOf(got[0], keep).getFetchFile().getFd() == 5);
    CHECK_FALSE(rootOf(got[0], keep).getFetchFile().getWantData());
    CHECK(rootOf(got[1], keep).getFetchFile().getWantData());

    // A second mmap of the same file costs one identity round trip, no data.
    uint64_t again = loop.unotify->trap(__NR_mmap, args);
    loop.serve();
    CHECK(kernel.events().back() == fmt::format("continue {}", again));
    got = loop.deputy->received(3);
    REQUIRE(got.size() == 3);
    CHECK_FALSE(rootOf(got[2], keep).getFetchFile().getWantData());
  }

  SECTION("ADDFD fails (the guest's fd limit): the guest's mmap fails, it is not continued") {
    loop.unotify->addFdError = EMFILE;
    uint64_t id = loop.unotify->trap(__NR_mmap, args);
    loop.serve();
    CHECK(kernel.events() ==
          std::vector<std::string>{fmt::format("addfd {} 5", id), answer(id, -EMFILE)});
  }

  SECTION("the guest dies while the file is fetched: ADDFD finds no notification, no answer") {
    dies = loop.unotify->trap(__NR_mmap, args);
    loop.serve();
    CHECK(kernel.events().empty());
    CHECK(loop.deputy->received(2).size() == 2);
  }
}

TEST_CASE("a signal that interrupts the call at home reaches the guest before the restart answer",
          "[remote][notify][signal]") {
  // The deputy's blocking call was cut short by SIGINT (Ctrl-C at home): the signal travels
  // first, then the interrupted reply.
  FakeKernel kernel;
  Loop loop(kernel, [](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
    d.signal(SIGINT);
    d.reply(m.getSyscall().getSeq(), -EINTR, {""}, true);
  });
  SECTION("read restarts or fails EINTR as SA_RESTART says: -ERESTARTSYS") {
    uint64_t id = loop.unotify->trap(__NR_read, {0, BUF, 16});
    loop.serve();
    CHECK(kernel.events() == std::vector<std::string>{"signal 2", answer(id, -ERESTARTSYS)});
    CHECK(loop.guest->space.writes.empty());
  }
  SECTION("poll never restarts after a handler: -ERESTARTNOHAND") {
    uint64_t id = loop.unotify->trap(__NR_poll, {BUF, 1, static_cast<uint64_t>(-1)});
    loop.serve();
    CHECK(kernel.events() == std::vector<std::string>{"signal 2", answer(id, -ERESTARTNOHAND)});
  }
  CHECK(loop.deputy->received(1).size() == 1);  // not run again
}

TEST_CASE("a signal the guest blocks does not interrupt its call: the call runs again at home",
          "[remote][notify][signal]") {
  FakeKernel kernel;
  std::atomic<int> calls{0};
  Loop loop(kernel, [&calls](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
    auto seq = m.getSyscall().getSeq();
    if (calls++ == 0) {
      d.signal(SIGUSR1);
      d.reply(seq, -EINTR, {""}, true);
    } else {
      d.reply(seq, 5, {"hello"});
    }
  });
  kernel.setSignals(0, bit(SIGUSR1));
  uint64_t id = loop.unotify->trap(__NR_read, {0, BUF, 16});
  loop.serve();
  CHECK(kernel.events() == std::vector<std::string>{"signal 10", answer(id, 5)});
  CHECK(loop.memoryAt(BUF, 5) == "hello");

  auto got = loop.deputy->received(2);
  REQUIRE(got.size() == 2);
  kj::Own<capnp::FlatArrayMessageReader> a, b;
  auto first = rootOf(got[0], a).getSyscall();
  auto second = rootOf(got[1], b).getSyscall();
  CHECK(second.getSeq() == id);
  CHECK(first.getSeq() == id);
  CHECK(second.getNr() == __NR_read);
  CHECK(first.getNr() == __NR_read);
  CHECK(second.getArgs()[0] == first.getArgs()[0]);
  CHECK(second.getArgs()[2] == first.getArgs()[2]);
}

TEST_CASE("a signal that arrives after the reply reaches the guest after the answer",
          "[remote][notify][signal]") {
  FakeKernel kernel;
  Loop loop(kernel, [](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
    d.reply(m.getSyscall().getSeq(), 5, {"hello"});
    d.signal(SIGTERM);
  });
  uint64_t id = loop.unotify->trap(__NR_read, {0, BUF, 16});
  loop.serve();
  loop.serveUntil("signal 15");
  CHECK(kernel.events() == std::vector<std::string>{answer(id, 5), "signal 15"});
  CHECK(loop.memoryAt(BUF, 5) == "hello");
}

TEST_CASE("a signal raised on this node while the call blocks at home cancels the call there",
          "[remote][notify][signal]") {
  // alarm(2) fired in the guest while its read waits at home: the supervisor notices within
  // CANCEL_CHECK_MS and sends the urgent byte; the deputy's call returns EINTR.
  FakeKernel kernel;
  std::atomic<uint64_t> seq{0};
  Loop loop(
      kernel, [&seq](proto::ToDeputy::Reader m, ScriptedDeputy&) { seq = m.getSyscall().getSeq(); },
      [&seq](ScriptedDeputy& d) { d.reply(seq, -EINTR, {""}, true); });
  kernel.setSignals(bit(SIGALRM), 0);
  uint64_t id = loop.unotify->trap(__NR_read, {0, BUF, 16});
  loop.serve();
  CHECK(kernel.events() == std::vector<std::string>{answer(id, -ERESTARTSYS)});
  CHECK(loop.deputy->urgent() == 1);
  CHECK(loop.deputy->received(1).size() == 1);
}

TEST_CASE("the deputy going away mid-call ends the job and kills the guest", "[remote][notify]") {
  FakeKernel kernel;
  Loop loop(kernel, [](proto::ToDeputy::Reader, ScriptedDeputy& d) { d.hangUp(); });
  loop.unotify->trap(__NR_read, {0, BUF, 16});
  CHECK(loop.serveUntilTheEnd() == 0);
  CHECK(kernel.events() == std::vector<std::string>{"kill"});
}

TEST_CASE("with the real deputy: a read gets the pipe's bytes; a signal at home interrupts it",
          "[remote][notify][signal][deputy]") {
  int p[2];
  REQUIRE(pipe2(p, 0) == 0);  // inherited by the deputy: a descriptor of the job
  REQUIRE(write(p[1], "hello", 5) == 5);
  FakeKernel kernel;
  Loop loop(kernel, WithRealDeputy{});
  uint64_t first = loop.unotify->trap(__NR_read, {static_cast<uint64_t>(p[0]), BUF, 16});
  loop.serve();
  CHECK(kernel.events() == std::vector<std::string>{answer(first, 5)});
  CHECK(loop.memoryAt(BUF, 6) == "hello\xee");

  // The pipe is empty now: the deputy blocks in read(2) until SIGUSR1 reaches P. It is sent
  // once the loop waits for the reply (its first look at the guest's signals).
  bool sent = false;
  loop.guest->onStatusRead = [&] {
    if (!sent) {
      sent = true;
      kill(loop.deputyPid, SIGUSR1);
    }
  };
  uint64_t second = loop.unotify->trap(__NR_read, {static_cast<uint64_t>(p[0]), BUF, 16});
  loop.serve();
  CHECK(sent);
  CHECK(kernel.events() ==
        std::vector<std::string>{answer(first, 5), "signal 10", answer(second, -ERESTARTSYS)});
  close(p[0]);
  close(p[1]);
}

namespace {

// mosd's end of RUN_DIR/trace.sock, played by the test: the events the supervisor publishes.
struct TraceListener {
  std::string runDir;
  kj::AutoCloseFd listening;
  kj::AutoCloseFd connection;
  TraceControl* control = nullptr;

  TraceListener() {
    char dir[] = "/tmp/notify-loop-trace-XXXXXX";
    REQUIRE(mkdtemp(dir) != nullptr);
    runDir = dir;
    listening = kj::AutoCloseFd(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::string path = traceSocketPath(runDir);
    memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    REQUIRE(bind(listening.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(listen(listening.get(), 4) == 0);
    control = mapTraceControl(runDir, 1, HOME_PID);
  }
  ~TraceListener() {
    unmapTraceControl(control);
    std::filesystem::remove_all(runDir);
  }

  // The next event the publisher sent, within DEADLINE.
  TraceRecord next() {
    if (connection.get() < 0) {
      struct pollfd pfd = {listening.get(), POLLIN, 0};
      REQUIRE(poll(&pfd, 1, int(std::chrono::milliseconds(DEADLINE).count())) == 1);
      connection = kj::AutoCloseFd(accept4(listening.get(), nullptr, nullptr, SOCK_CLOEXEC));
      REQUIRE(connection.get() >= 0);
    }
    struct pollfd pfd = {connection.get(), POLLIN, 0};
    REQUIRE(poll(&pfd, 1, int(std::chrono::milliseconds(DEADLINE).count())) == 1);
    auto words = kj::heapArray<capnp::word>(64 << 10);
    ssize_t n = recv(connection.get(), words.begin(), words.asBytes().size(), 0);
    REQUIRE(n > 0);
    capnp::FlatArrayMessageReader reader(words.slice(0, size_t(n) / sizeof(capnp::word)));
    return fromProto(reader.getRoot<proto::TraceEvent>());
  }
};

}  // namespace

TEST_CASE("a traced job's calls are published with their route, payloads and time at home",
          "[remote][notify][trace]") {
  TraceListener listener;
  TracePublisher publisher(listener.runDir, 1, HOME_PID);
  loopTrace = &publisher;
  KJ_DEFER(loopTrace = nullptr);
  FakeKernel kernel;
  Loop loop(kernel, [](proto::ToDeputy::Reader m, ScriptedDeputy& d) {
    if (m.isSyscall()) {
      auto call = m.getSyscall();
      if (call.getNr() == __NR_read) {
        d.reply(call.getSeq(), 5, {"hello"}, false, 7000);  // 7 µs at home
      } else {
        d.reply(call.getSeq(), -EBADF, {}, false, 3000);
      }
    }
  });

  SECTION("while nobody listens nothing is published") {
    loop.unotify->trap(__NR_read, {3, BUF, 16});
    loop.serve();
    CHECK(publisher.published() == 0);
  }

  SECTION("each call is one event, in order, as the guest saw it") {
    listener.control->payloadBytes = 64;
    listener.control->listeners = 1;
    TraceFormatter format({32, false, false, 0, true});

    loop.unotify->trap(__NR_read, {3, BUF, 16});
    loop.serve();
    TraceRecord read = listener.next();
    // strace pads the call to column 39 before " = ".
    CHECK(format.line(read) ==
          "[pid 4242 node 2 forwarded] read(3, \"hello\", 16)                    = 5");
    CHECK(read.pid == HOME_PID);
    CHECK(read.homeNode == 1);
    CHECK(read.homeUs == 7);
    CHECK(read.totalUs >= read.homeUs);
    CHECK(read.transitUs == read.totalUs - read.homeUs);

    memcpy(loop.guest->space.at(BUF).data(), "bye\n", 4);
    loop.unotify->trap(__NR_write, {9, BUF, 4});
    loop.serve();
    TraceRecord write = listener.next();
    CHECK(format.line(write) ==
          "[pid 4242 node 2 forwarded] write(9, \"bye\\n\", 4)                    = -1 EBADF "
          "(Bad file descriptor)");
    CHECK(write.homeUs == 3);

    loop.unotify->trap(__NR_getpid, {});
    loop.serve();
    CHECK(format.line(listener.next()) ==
          "[pid 4242 node 2 emulated] getpid()                                = 4242");

    loop.unotify->trap(__NR_io_uring_setup, {8, BUF});
    loop.serve();
    TraceRecord denied = listener.next();
    CHECK(denied.route == TraceRoute::DENIED);
    CHECK(denied.result == -ENOSYS);

    CHECK(publisher.published() == 4);
    CHECK(publisher.lost() == 0);
    CHECK(loop.deputy->received(2).size() == 2);  // the read and the write went home
  }
}
