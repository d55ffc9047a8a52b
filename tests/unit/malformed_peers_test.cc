// Peers that send garbage (issue 5). mosd gets 10,000 malformed inputs: handshakes (random
// bytes, wrong hellos, truncated hellos and proofs, bad proofs, non-members) and, after a valid
// handshake, Cap'n Proto frames on the RPC service (random bytes, truncated and oversized frames,
// RPC messages with wrong fields, mutated messages) and on the job channel, where the real
// mos-supervisor reads them as its JobStart. The deputy's reader gets frames that do not parse
// and ToDeputy messages with wrong fields. A message that does not parse closes that connection
// (or ends that one job in a defined way), never the daemon: afterwards mosd still answers,
// nothing died of a signal, and memory and descriptors did not grow.

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <capnp/message.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize.h>
#include <kj/debug.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "channel.h"
#include "checkpoint.h"
#include "cluster_auth.h"
#include "deputy.h"
#include "job.capnp.h"
#include "node.capnp.h"
#include "node_client.h"
#include "migrate.h"
#include "signals.h"

#ifndef MOSD_PATH
#error "MOSD_PATH must name the mosd executable"
#endif
#ifndef MOS_SUPERVISOR_PATH
#error "MOS_SUPERVISOR_PATH must name the mos-supervisor executable"
#endif

namespace {

using namespace std::chrono_literals;

constexpr uint32_t LOCALHOST = 0x7f000001;
constexpr uint32_t NOT_A_MEMBER = 0x7f000002;
constexpr uint8_t KEY_FILL = 0x5a;

// Inputs mosd gets, by family (they add up to 10,000).
constexpr int HANDSHAKE_INPUTS = 5000;
constexpr int RPC_INPUTS = 4800;
constexpr int JOB_INPUTS = 200;
// Inputs the deputy's reader gets: frames that end the job, and wrong fields it must survive.
constexpr int DEPUTY_FRAME_INPUTS = 300;
constexpr int DEPUTY_FIELD_INPUTS = 1500;

std::mt19937_64 rng(20261128);

size_t below(size_t n) { return n == 0 ? 0 : rng() % n; }

std::string randomBytes(size_t n) {
  std::string s(n, '\0');
  for (auto& c : s) {
    c = static_cast<char>(rng());
  }
  return s;
}

kj::ArrayPtr<const kj::byte> bytesOf(const std::string& s) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}

// One framed message (standard stream framing), as bytes.
std::string frameOf(capnp::MessageBuilder& message) {
  auto words = capnp::messageToFlatArray(message);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

// `frame` with 1..4 random bytes of its segments replaced (the segment table is kept, so the
// frame still has a valid shape and the damage is in pointers and fields).
std::string mutate(std::string frame) {
  uint32_t segments = 0;
  memcpy(&segments, frame.data(), 4);
  size_t table = (((segments + 1) / 2) + 1) * 8;
  if (frame.size() <= table) {
    return frame;
  }
  int n = 1 + below(4);
  for (int i = 0; i < n; i++) {
    frame[table + below(frame.size() - table)] = static_cast<char>(rng());
  }
  return frame;
}

// A frame header that announces more than any reader accepts or than will ever come, followed
// by a few bytes.
std::string oversizedFrame() {
  uint32_t header[2];
  switch (below(4)) {
    case 3:  // 2^32 segments: the count wraps to 0 in 32 bits
      header[0] = 0xffffffffu;
      header[1] = uint32_t(below(2) ? below(16) : rng());
      break;
    case 0:  // billions of segments
      header[0] = 0x10000000u + uint32_t(below(0xe0000000u));
      header[1] = uint32_t(rng());
      break;
    case 1:  // one segment larger than the traversal limits
      header[0] = 0;
      header[1] = 0x20000000u + uint32_t(below(0xdfffffffu));
      break;
    default:  // within limits, but the peer leaves after a few bytes
      header[0] = 0;
      header[1] = 1024 + uint32_t(below(1u << 20));
      break;
  }
  std::string s(reinterpret_cast<const char*>(header), sizeof(header));
  return s + randomBytes(below(64));
}

std::string truncated(const std::string& frame) {
  return frame.substr(0, frame.size() <= 1 ? 0 : 1 + below(frame.size() - 1));
}

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

size_t countOf(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) {
    n++;
  }
  return n;
}

// The lines of `text` that contain `what`.
std::string linesWith(const std::string& text, const std::string& what) {
  std::istringstream in(text);
  std::string line, out;
  while (std::getline(in, line)) {
    if (line.find(what) != std::string::npos) {
      out += line + "\n";
    }
  }
  return out;
}

// Resident memory of `pid` in KiB (VmRSS), 0 when it is gone.
long rssKib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      return std::stol(line.substr(6));
    }
  }
  return 0;
}

int openFds(pid_t pid) {
  std::string path = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(path.c_str());
  if (d == nullptr) {
    return -1;
  }
  int n = 0;
  while (readdir(d) != nullptr) {
    n++;
  }
  closedir(d);
  return n - 2;
}

uint16_t freePort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(LOCALHOST);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&sin), sizeof(sin)) == 0);
  socklen_t len = sizeof(sin);
  getsockname(fd, reinterpret_cast<sockaddr*>(&sin), &len);
  close(fd);
  return ntohs(sin.sin_port);
}

mos::ClusterKey keyOf(uint8_t fill) {
  std::string bytes(32, char(fill));
  return mos::ClusterKey::fromBytes(
      kj::arrayPtr(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), "test");
}

// mosd on 127.0.0.1 with a map of nodes 1 (127.0.0.1) and 3 (127.0.0.3), the cluster key and the
// real mos-supervisor.
struct Mosd {
  std::string dir, log;
  uint16_t port = 0;
  pid_t pid = -1;
  mos::ClusterCredentials node1{1, keyOf(KEY_FILL)};

  Mosd() {
    char tmpl[] = "/tmp/umosix-fuzz-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    dir = tmpl;
    log = dir + "/mosd.log";
    REQUIRE(mkdir((dir + "/libexec").c_str(), 0755) == 0);
    REQUIRE(symlink(MOS_SUPERVISOR_PATH, (dir + "/libexec/mos-supervisor").c_str()) == 0);
    {
      std::ofstream map(dir + "/map");
      map << "1 127.0.0.1 1\n3 127.0.0.3 1\n";
      std::ofstream key(dir + "/cluster.key", std::ios::binary);
      key << std::string(32, char(KEY_FILL));
    }
    REQUIRE(chmod((dir + "/cluster.key").c_str(), 0600) == 0);
    port = freePort();
    std::string portText = std::to_string(port);
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      int out = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      dup2(out, 1);
      dup2(out, 2);
      int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
      dup2(devnull, 0);
      setenv("UMOSIX_LIBEXEC", (dir + "/libexec").c_str(), 1);
      setenv("UMOSIX_LOG", "info", 1);
      setenv("UMOSIX_KEY", (dir + "/cluster.key").c_str(), 1);
      // Large blocks always mmapped and the heap trimmed early, so that RSS measures live
      // memory rather than the allocator's high-water mark (glibc raises its mmap threshold
      // after every large free, and then keeps freed large frames resident in the heap).
      setenv("GLIBC_TUNABLES",
             "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072", 1);
      execl(MOSD_PATH, "mosd", "--map", (dir + "/map").c_str(), "--node", "1", "--port",
            portText.c_str(), "--run-dir", (dir + "/run").c_str(), "--cache-dir",
            (dir + "/cache").c_str(), nullptr);
      _exit(127);
    }
    auto deadline = std::chrono::steady_clock::now() + 60s;
    for (;;) {
      auto error = kj::runCatchingExceptions(
          [&]() { mos::queryStatus(node1, mos::Ipv4{LOCALHOST}, port, 5000); });
      if (error == nullptr) {
        break;
      }
      int status;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        FAIL("mosd exited early: " << readFile(log));
      }
      if (std::chrono::steady_clock::now() > deadline) {
        FAIL("mosd did not answer within 60 s: " << readFile(log));
      }
      std::this_thread::sleep_for(20ms);
    }
  }

  ~Mosd() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    if (getenv("UMOSIX_KEEP_FUZZ_DIR") == nullptr) {  // kept for a post mortem
      std::string cmd = "rm -rf '" + dir + "'";
      CHECK(system(cmd.c_str()) == 0);
    }
  }

  bool alive() {
    int status;
    return pid > 0 && waitpid(pid, &status, WNOHANG) == 0;
  }
};

// A raw TCP connection to mosd. Reads time out after 60 s (a daemon that neither answers nor
// closes fails the test instead of hanging it); closing resets, so that ten thousand
// connections leave no TIME_WAIT behind.
class Conn {
 public:
  Conn(uint16_t port, uint32_t source = 0) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd >= 0);
    fd_ = kj::AutoCloseFd(fd);
    if (source != 0) {
      sockaddr_in src{};
      src.sin_family = AF_INET;
      src.sin_addr.s_addr = htonl(source);
      REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&src), sizeof(src)) == 0);
    }
    timeval tv{60, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    struct linger reset = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(LOCALHOST);
    sin.sin_port = htons(port);
    REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&sin), sizeof(sin)) == 0);
  }

  // Sends what it can: mosd may have closed already, which is fine.
  void send(const std::string& bytes) {
    size_t done = 0;
    while (done < bytes.size()) {
      ssize_t n = ::send(fd_.get(), bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
      if (n <= 0) {
        return;
      }
      done += n;
    }
  }

  bool receive(void* into, size_t n) { return recv(fd_.get(), into, n, MSG_WAITALL) == ssize_t(n); }

  // The client half of a valid handshake for `hello`; true when mosd accepted.
  bool handshake(const char* hello, const mos::ClusterKey& key, uint32_t node) {
    send(std::string(hello, 8));
    mos::AuthNonce nonce;
    if (!receive(nonce.data(), nonce.size())) {
      return false;
    }
    auto proof = key.prove(kj::arrayPtr(hello, 8), nonce, node);
    send(std::string(reinterpret_cast<const char*>(proof.data()), proof.size()));
    uint8_t accepted = 0;
    return receive(&accepted, 1) && accepted == mos::AUTH_ACCEPTED;
  }

  // The connection, for use as a job channel.
  kj::AutoCloseFd release() { return kj::mv(fd_); }

  // Half-closes and reads until the peer closes (true; a reset counts) or 60 s pass (false).
  bool finish() {
    shutdown(fd_.get(), SHUT_WR);
    char buf[4096];
    for (;;) {
      ssize_t n = recv(fd_.get(), buf, sizeof(buf), 0);
      if (n == 0 || (n < 0 && errno == ECONNRESET)) {
        return true;
      }
      if (n < 0) {
        return false;
      }
    }
  }

 private:
  kj::AutoCloseFd fd_;
};

// --- Handshakes -----------------------------------------------------------------------------

// One malformed handshake of kind `kind`; returns whether mosd closed the connection.
bool badHandshake(uint16_t port, int kind) {
  static const auto good = keyOf(KEY_FILL);
  static const auto wrong = keyOf(0x33);
  const char* hello = below(2) ? mos::HELLO_RPC : mos::HELLO_JOB;
  Conn c(port, kind == 7 ? NOT_A_MEMBER : 0);
  auto nonceThen = [&](auto makeProof) {
    c.send(std::string(hello, 8));
    mos::AuthNonce nonce;
    if (!c.receive(nonce.data(), nonce.size())) {
      return;
    }
    c.send(makeProof(nonce));
  };
  auto proofText = [](const mos::AuthProof& p) {
    return std::string(reinterpret_cast<const char*>(p.data()), p.size());
  };
  switch (kind) {
    case 0:  // random bytes
      c.send(randomBytes(below(80)));
      break;
    case 1: {  // a hello with one byte wrong, maybe followed by a proof-sized tail
      std::string h(hello, 8);
      size_t at = below(8);
      h[at] = static_cast<char>(h[at] ^ (1 + below(255)));
      c.send(h + (below(2) ? randomBytes(36) : ""));
      break;
    }
    case 2:  // a hello cut short
      c.send(std::string(hello, below(8)));
      break;
    case 3:  // a proof cut short
      nonceThen([&](const mos::AuthNonce& nonce) {
        return proofText(good.prove(kj::arrayPtr(hello, 8), nonce, 1)).substr(0, below(36));
      });
      break;
    case 4:  // random proof
      nonceThen([&](const mos::AuthNonce&) { return randomBytes(36 + below(2) * below(64)); });
      break;
    case 5:  // one bit of a good proof flipped (the MAC or the node id)
      nonceThen([&](const mos::AuthNonce& nonce) {
        auto p = good.prove(kj::arrayPtr(hello, 8), nonce, 1);
        p[below(p.size())] ^= uint8_t(1u << below(8));
        return proofText(p);
      });
      break;
    case 6:  // a proof for another hello, another node, another key or another nonce
      nonceThen([&](const mos::AuthNonce& nonce) {
        switch (below(4)) {
          case 0: {
            const char* other = hello == mos::HELLO_RPC ? mos::HELLO_JOB : mos::HELLO_RPC;
            return proofText(good.prove(kj::arrayPtr(other, 8), nonce, 1));
          }
          case 1:
            return proofText(
                good.prove(kj::arrayPtr(hello, 8), nonce, below(2) ? 3 : uint32_t(rng())));
          case 2: return proofText(wrong.prove(kj::arrayPtr(hello, 8), nonce, 1));
          default: {
            mos::AuthNonce other = nonce;
            other[below(other.size())] ^= 1;
            return proofText(good.prove(kj::arrayPtr(hello, 8), other, 1));
          }
        }
      });
      break;
    default:  // from an address outside the map
      c.send(below(2) ? std::string(hello, 8) : randomBytes(below(64)));
      break;
  }
  return c.finish();
}

// --- RPC frames -----------------------------------------------------------------------------

void randomTarget(capnp::rpc::MessageTarget::Builder target) {
  if (below(2)) {
    target.setImportedCap(below(3) ? uint32_t(below(4)) : uint32_t(rng()));
  } else {
    auto promised = target.initPromisedAnswer();
    promised.setQuestionId(below(2) ? 0 : uint32_t(rng()));
    auto ops = promised.initTransform(below(3));
    for (auto op : ops) {
      if (below(2)) {
        op.setGetPointerField(uint16_t(rng()));
      } else {
        op.setNoop();
      }
    }
  }
}

void randomPayload(capnp::rpc::Payload::Builder payload) {
  switch (below(3)) {
    case 0: break;  // null content
    case 1: payload.getContent().setAs<capnp::Text>(randomBytes(below(40)).c_str()); break;
    default: {
      auto list = payload.getContent().initAs<capnp::List<uint64_t>>(below(8));
      for (uint i = 0; i < list.size(); i++) {
        list.set(i, rng());
      }
    }
  }
  auto caps = payload.initCapTable(below(3));
  for (auto cap : caps) {
    switch (below(4)) {
      case 0: cap.setNone(); break;
      case 1: cap.setSenderHosted(uint32_t(rng())); break;
      case 2: cap.setReceiverHosted(below(2) ? 0 : uint32_t(rng())); break;
      default: cap.setSenderPromise(uint32_t(rng())); break;
    }
  }
}

// An RPC message that is a valid Cap'n Proto message with fields that make no sense here
// (unknown questions, imports, interfaces and methods, stray returns and releases...).
std::string rpcMessage() {
  capnp::MallocMessageBuilder message;
  auto m = message.initRoot<capnp::rpc::Message>();
  switch (below(9)) {
    case 0: m.initBootstrap().setQuestionId(below(2) ? 0 : uint32_t(rng())); break;
    case 1:
    case 2: {
      auto call = m.initCall();
      call.setQuestionId(uint32_t(below(2) ? below(4) : rng()));
      randomTarget(call.initTarget());
      call.setInterfaceId(below(2) ? capnp::typeId<mos::proto::Node>() : rng());
      call.setMethodId(uint16_t(below(2) ? below(6) : rng()));
      randomPayload(call.initParams());
      break;
    }
    case 3: {
      auto ret = m.initReturn();
      ret.setAnswerId(uint32_t(below(2) ? below(4) : rng()));
      if (below(2)) {
        randomPayload(ret.initResults());
      } else {
        ret.initException().setReason(randomBytes(below(20)).c_str());
      }
      break;
    }
    case 4: m.initFinish().setQuestionId(uint32_t(below(2) ? below(4) : rng())); break;
    case 5: {
      auto resolve = m.initResolve();
      resolve.setPromiseId(uint32_t(rng()));
      resolve.initCap().setSenderHosted(uint32_t(rng()));
      break;
    }
    case 6: {
      auto release = m.initRelease();
      release.setId(uint32_t(below(2) ? below(4) : rng()));
      release.setReferenceCount(uint32_t(rng()));
      break;
    }
    case 7: {
      auto disembargo = m.initDisembargo();
      randomTarget(disembargo.initTarget());
      disembargo.initContext().setSenderLoopback(uint32_t(rng()));
      break;
    }
    default: m.initAbort().setReason(randomBytes(below(20)).c_str()); break;
  }
  return frameOf(message);
}

// A bootstrap and a call of the Node interface with a wrong method or wrong parameters.
std::string bootstrapThenWrongCall() {
  std::string bytes;
  {
    capnp::MallocMessageBuilder message;
    message.initRoot<capnp::rpc::Message>().initBootstrap().setQuestionId(0);
    bytes += frameOf(message);
  }
  capnp::MallocMessageBuilder message;
  auto call = message.initRoot<capnp::rpc::Message>().initCall();
  call.setQuestionId(1);
  call.initTarget().initPromisedAnswer().setQuestionId(0);
  call.setInterfaceId(capnp::typeId<mos::proto::Node>());
  call.setMethodId(uint16_t(below(8)));
  randomPayload(call.initParams());
  return bytes + frameOf(message);
}

// One malformed input on an authenticated RPC connection; returns whether mosd closed it.
bool badRpc(uint16_t port, int kind) {
  Conn c(port);
  if (!c.handshake("UMOSRPC1", keyOf(KEY_FILL), 1)) {
    FAIL("a good RPC handshake was refused");
  }
  switch (kind) {
    case 0: c.send(randomBytes(1 + below(2048))); break;
    case 1: c.send(truncated(below(2) ? rpcMessage() : bootstrapThenWrongCall())); break;
    case 2: c.send(oversizedFrame()); break;
    case 3: {
      int n = 1 + below(4);
      for (int i = 0; i < n; i++) {
        c.send(rpcMessage());
      }
      break;
    }
    case 4: c.send(bootstrapThenWrongCall()); break;
    default: c.send(mutate(below(2) ? rpcMessage() : bootstrapThenWrongCall())); break;
  }
  return c.finish();
}

// --- Job channel frames (read by the real mos-supervisor) ---------------------------------------

std::string jobStart(bool plausible) {
  capnp::MallocMessageBuilder message;
  auto start = message.initRoot<mos::proto::JobStart>();
  start.setHomeNode(plausible || below(2) ? 1 : uint32_t(rng()));
  auto ids = start.initIds();
  ids.setPid(int32_t(rng()));
  ids.setTid(int32_t(rng()));
  ids.setUid(65534);
  ids.setGid(65534);
  start.setCommand(randomBytes(below(16)).c_str());
  start.setImageStreamed(plausible || below(2));
  // The migration stream's start, or garbage in its place.
  std::string after = below(2) ? std::string("UMOSIMG\n", 8) : std::string();
  return frameOf(message) + after + randomBytes(below(64));
}

bool badJob(uint16_t port, int kind) {
  Conn c(port);
  if (!c.handshake("UMOSJOB1", keyOf(KEY_FILL), 1)) {
    FAIL("a good job handshake was refused");
  }
  switch (kind) {
    case 0: c.send(randomBytes(1 + below(512))); break;
    case 1: c.send(truncated(jobStart(true))); break;
    case 2: c.send(oversizedFrame()); break;
    case 3: c.send(jobStart(below(2))); break;
    default: c.send(mutate(jobStart(true))); break;
  }
  return c.finish();  // the supervisor closes it when it gives up on the job
}

}  // namespace

TEST_CASE("mosd survives 10,000 malformed handshakes and frames and keeps serving",
          "[node][mosd][fuzz]") {
  Mosd mosd;
  auto begin = std::chrono::steady_clock::now();
  int handshakes = 0, rpcs = 0, jobs = 0, notClosed = 0;

  // A first round warms up the allocator and the log before memory is measured.
  for (; handshakes < 500; handshakes++) {
    notClosed += !badHandshake(mosd.port, handshakes % 8);
  }
  for (; rpcs < 300; rpcs++) {
    notClosed += !badRpc(mosd.port, rpcs % 6);
  }
  REQUIRE(mosd.alive());
  int fdsBefore = openFds(mosd.pid);
  long rssBefore = rssKib(mosd.pid);

  for (; handshakes < HANDSHAKE_INPUTS; handshakes++) {
    notClosed += !badHandshake(mosd.port, handshakes % 8);
  }
  REQUIRE(mosd.alive());
  for (; rpcs < RPC_INPUTS; rpcs++) {
    notClosed += !badRpc(mosd.port, rpcs % 6);
  }
  REQUIRE(mosd.alive());
  for (; jobs < JOB_INPUTS; jobs++) {
    notClosed += !badJob(mosd.port, jobs % 5);
  }
  REQUIRE(mosd.alive());
  CHECK(handshakes + rpcs + jobs == 10000);
  CHECK(notClosed == 0);

  // Every supervisor gave up on its job with an exit status; none died of a signal.
  auto reaped = [&]() {
    std::string log = readFile(mosd.log);
    return countOf(log, " exited") + countOf(log, "killed by signal") ==
           countOf(log, " started for a job");
  };
  auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!reaped() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  std::string log = readFile(mosd.log);
  CHECK(countOf(log, " started for a job") == size_t(JOB_INPUTS));
  CHECK(reaped());
  INFO("supervisors that died of a signal:\n" << linesWith(log, "killed by signal"));
  CHECK(countOf(log, "killed by signal") == 0);

  // Connections are gone (descriptors back to what they were) and memory did not grow.
  deadline = std::chrono::steady_clock::now() + 60s;
  while (openFds(mosd.pid) > fdsBefore && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  CHECK(openFds(mosd.pid) <= fdsBefore);
  long rssAfter = rssKib(mosd.pid);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  WARN("mosd fuzz: " << handshakes << " handshakes, " << rpcs << " RPC inputs, " << jobs
                     << " job-channel inputs in " << seconds << " s; RSS " << rssBefore
                     << " KiB before, " << rssAfter << " KiB after");
  CHECK(rssAfter <= rssBefore + 1024);

  // And it still serves: status and the job list, as mps asks for them.
  CHECK(mos::queryStatus(mosd.node1, mos::Ipv4{LOCALHOST}, mosd.port, 30000).nodeId == 1);
  CHECK(mos::listJobs(mosd.node1, mos::Ipv4{LOCALHOST}, mosd.port, 30000).empty());
  REQUIRE(kill(mosd.pid, SIGTERM) == 0);
  int status = 0;
  REQUIRE(waitpid(mosd.pid, &status, 0) == mosd.pid);
  mosd.pid = -1;
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

// --- The deputy's reader ---------------------------------------------------------------------

namespace {

// A deputy running its loop in a forked child, its log thrown away; this process plays the
// supervisor. The job's stdin is `stdinFd` when given.
struct Deputy {
  pid_t pid = -1;
  kj::AutoCloseFd peer;

  explicit Deputy(int stdinFd = -1) {
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      close(sv[1]);
      int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
      dup2(devnull, STDOUT_FILENO);
      dup2(devnull, STDERR_FILENO);
      if (stdinFd >= 0) {
        dup2(stdinFd, STDIN_FILENO);
      }
      mos::deputy::blockAllSignals();
      mos::deputy::installSignalHandlers();
      static mos::deputy::ReservedFds fds;
      int high = fds.moveHigh(sv[0]);
      mos::deputy::DeputyOptions options;
      options.node = 2;
      options.homeNode = 1;
      options.jobExe = "/bin/true";
      mos::deputy::Deputy deputy(options, fds, kj::heap<mos::Channel>(kj::AutoCloseFd(high)));
      deputy.run();
      _exit(99);
    }
    close(sv[0]);
    peer = kj::AutoCloseFd(sv[1]);
  }

  ~Deputy() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }

  void send(const std::string& bytes) {
    size_t done = 0;
    while (done < bytes.size()) {
      ssize_t n = ::send(peer.get(), bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
      if (n <= 0) {
        return;
      }
      done += n;
    }
  }

  // Waits up to 30 s for the child's end; the raw status, or -1 when it still runs.
  int waitEnd() {
    for (int i = 0; i < 30000; i++) {
      int status;
      if (waitpid(pid, &status, WNOHANG | WUNTRACED) == pid) {
        if (WIFSTOPPED(status)) {
          kill(pid, SIGKILL);
          continue;
        }
        pid = -1;
        return status;
      }
      usleep(1000);
    }
    return -1;
  }
};

std::string toDeputy(const std::function<void(mos::proto::ToDeputy::Builder)>& fill) {
  capnp::MallocMessageBuilder message;
  fill(message.initRoot<mos::proto::ToDeputy>());
  return frameOf(message);
}

// Syscall numbers that are harmless whatever their arguments: getppid, numbers no kernel has,
// an x32 number. (Real numbers with random arguments would run for real at home.)
int64_t harmlessNr() {
  static const int64_t NRS[] = {
      __NR_getppid, -1, -100000, 1 << 20, 0x40000000 | __NR_getppid, 400, INT32_MAX, INT32_MIN};
  return NRS[below(sizeof(NRS) / sizeof(NRS[0]))];
}

uint32_t randomSize() {
  switch (below(4)) {
    case 0: return 0;
    case 1: return (64u << 20) + 1 + uint32_t(below(1u << 30));  // more than the deputy allocates
    default: return uint32_t(below(4096));
  }
}

// A ToDeputy that is a valid message with wrong fields, none of which may end the job.
std::string wrongFields() {
  switch (below(8)) {
    case 0:
    case 1:
    case 2:
      return toDeputy([](mos::proto::ToDeputy::Builder m) {
        auto r = m.initSyscall();
        r.setSeq(rng());
        bool readOrWrite = below(3) == 0;
        r.setNr(readOrWrite ? (below(2) ? __NR_read : __NR_write) : int32_t(harmlessNr()));
        auto args = r.initArgs(below(13));
        for (uint i = 0; i < args.size(); i++) {
          args.set(i, rng());
        }
        if (readOrWrite && args.size() > 0) {
          args.set(0, below(2) ? uint64_t(-1) : 1000000);  // no such descriptor
        }
        auto in = r.initIn(below(4));
        for (auto b : in) {
          b.setArg(uint8_t(below(2) ? below(16) : rng()));
          b.setData(bytesOf(randomBytes(below(64))));
        }
        auto out = r.initOut(below(4));
        for (auto o : out) {
          o.setArg(uint8_t(below(2) ? below(16) : rng()));
          o.setSize(randomSize());
          o.setTrimToRet(below(2));
        }
        auto pointers = r.initPointers(below(4));
        for (auto p : pointers) {
          p.setInto(uint8_t(below(2) ? below(16) : rng()));
          p.setTarget(uint8_t(below(2) ? below(16) : rng()));
          p.setOffset(below(2) ? uint32_t(below(64)) : uint32_t(rng()));
        }
      });
    case 3:
      return toDeputy([](mos::proto::ToDeputy::Builder m) {
        auto f = m.initFetchFile();
        f.setId(rng());
        if (below(2)) {
          f.setFd(below(2) ? 1000000 : -int32_t(below(100)) - 2);
        } else {
          f.setFd(-1);
          std::string path = below(4) == 0 ? "" : "/nonexistent/" + randomBytes(below(32));
          f.setPath(bytesOf(path));
        }
        f.setWantData(below(2));
      });
    case 4:
      return toDeputy([](mos::proto::ToDeputy::Builder m) {
        auto e = m.initExec();
        e.setSeq(rng());
        e.setDirfd(below(2) ? AT_FDCWD : (below(2) ? 1000000 : -int32_t(below(50)) - 2));
        e.setPath(bytesOf("/nonexistent/" + randomBytes(below(32))));
        auto argv = e.initArgv(below(20));
        for (uint i = 0; i < argv.size(); i++) {
          argv.set(i, bytesOf(randomBytes(below(32))));
        }
        auto envp = e.initEnvp(below(20));
        for (uint i = 0; i < envp.size(); i++) {
          envp.set(i, bytesOf(randomBytes(below(32))));
        }
        e.setFlags(int32_t(rng()));
        e.setSigIgnored(rng());
        e.setSigBlocked(rng());
      });
    case 5: return toDeputy([](mos::proto::ToDeputy::Builder m) { m.setStarted(int32_t(rng())); });
    case 6: return toDeputy([](mos::proto::ToDeputy::Builder m) { m.setContinued(); });
    default: {
      // A union tag this deputy does not know (a newer supervisor's message).
      std::string a = toDeputy([](mos::proto::ToDeputy::Builder m) { m.setContinued(); });
      std::string b = toDeputy([](mos::proto::ToDeputy::Builder m) { m.setStopped(0); });
      REQUIRE(a.size() == b.size());
      size_t at = 0;
      while (at < a.size() && a[at] == b[at]) {
        at++;
      }
      REQUIRE(at + 1 < a.size());
      uint16_t tag = uint16_t(8 + below(65528));
      memcpy(&a[at], &tag, sizeof(tag));
      return a;
    }
  }
}

// Reads ToRemote messages from `channel` until the reply to `seq`; returns its ret, or
// INT64_MIN when the channel ended or 30 s passed.
int64_t replyTo(mos::Channel& channel, uint64_t seq) {
  for (;;) {
    if (!channel.hasBuffered()) {
      struct pollfd pfd = {channel.fd(), POLLIN, 0};
      if (poll(&pfd, 1, 30000) != 1) {
        return INT64_MIN;
      }
    }
    KJ_IF_MAYBE (m, channel.receive()) {
      auto root = (*m)->getRoot<mos::proto::ToRemote>();
      if (root.isReply() && root.getReply().getSeq() == seq) {
        return root.getReply().getRet();
      }
    } else {
      return INT64_MIN;
    }
  }
}

}  // namespace

TEST_CASE("the deputy ends the job with status 112 on frames that do not parse", "[deputy][fuzz]") {
  int crashed = 0, hung = 0, other = 0;
  for (int i = 0; i < DEPUTY_FRAME_INPUTS; i++) {
    Deputy d;
    std::string seed = toDeputy([](mos::proto::ToDeputy::Builder m) {
      auto f = m.initFetchFile();
      f.setId(1);
      f.setFd(-1);
      f.setPath(bytesOf("/nonexistent/x"));
    });
    switch (i % 4) {
      case 0: d.send(randomBytes(1 + below(1024))); break;
      case 1: d.send(truncated(seed)); break;
      case 2: d.send(oversizedFrame()); break;
      default: {
        // Segment table claiming more segments than the frame has words for.
        uint32_t header[2] = {uint32_t(513 + below(1u << 20)), 1};
        d.send(std::string(reinterpret_cast<const char*>(header), sizeof(header)));
        break;
      }
    }
    d.peer = nullptr;  // the supervisor leaves: an incomplete frame ends there
    int status = d.waitEnd();
    if (status == -1) {
      hung++;
    } else if (WIFSIGNALED(status)) {
      crashed++;
      UNSCOPED_INFO("input " << i << ": the deputy died of signal " << WTERMSIG(status));
    } else if (WEXITSTATUS(status) != 112) {
      other++;
      UNSCOPED_INFO("input " << i << ": the deputy exited " << WEXITSTATUS(status));
    }
  }
  WARN("deputy reader: " << DEPUTY_FRAME_INPUTS << " frames that do not parse");
  CHECK(crashed == 0);
  CHECK(hung == 0);
  CHECK(other == 0);
}

TEST_CASE("the deputy answers or ignores ToDeputy messages with wrong fields and goes on",
          "[deputy][fuzz]") {
  Deputy d;
  mos::Channel channel{kj::AutoCloseFd(dup(d.peer.get()))};
  uint64_t probe = uint64_t(1) << 62;
  auto alive = [&]() {
    capnp::MallocMessageBuilder message;
    auto r = message.initRoot<mos::proto::ToDeputy>().initSyscall();
    r.setSeq(++probe);
    r.setNr(__NR_getppid);
    r.initArgs(6);
    channel.send(message);
    return replyTo(channel, probe) == getpid();
  };
  // Replies to the inputs pile up in the socket until the next probe's reader drains them (a
  // few at a time, so that neither side blocks on a full socket).
  for (int i = 0; i < 100; i++) {
    d.send(wrongFields());
    if (i % 5 == 4) {
      REQUIRE(alive());
    }
  }
  long rssBefore = rssKib(d.pid);
  int failures = 0;
  for (int i = 100; i < DEPUTY_FIELD_INPUTS; i++) {
    d.send(wrongFields());
    if (i % 5 == 4 && !alive()) {
      failures++;
      break;
    }
  }
  REQUIRE(failures == 0);
  REQUIRE(alive());
  long rssAfter = rssKib(d.pid);
  WARN("deputy reader: " << DEPUTY_FIELD_INPUTS << " messages with wrong fields; RSS " << rssBefore
                         << " KiB before, " << rssAfter << " KiB after");
  CHECK(rssAfter <= rssBefore + 4096);
  int status;
  CHECK(waitpid(d.pid, &status, WNOHANG) == 0);  // still running
}

// --- The supervisor's reader, in a running job ----------------------------------------------

namespace {

constexpr int SUPERVISOR_INPUTS = 60;

// /bin/cat captured at its exec stop: the migration stream mosrun's agent writes.
std::string catImage() {
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ptrace(PTRACE_TRACEME, 0, 0, 0);
    execl("/bin/cat", "cat", nullptr);
    _exit(127);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSTOPPED(status));
  kj::VectorOutputStream stream;
  auto error = kj::runCatchingExceptions([&]() {
    KJ_SYSCALL(ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD));
    mos::migrate::captureImage(pid, stream);
  });
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  REQUIRE(error == nullptr);
  auto bytes = stream.getArray();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

// Bytes of MAGIC and the header at the start of a migration stream (capnp framing).
size_t streamHeaderEnd(const std::string& stream) {
  uint32_t segments;
  memcpy(&segments, stream.data() + 8, 4);
  segments += 1;
  size_t table = ((segments + 2) & ~uint32_t(1)) * 4;
  size_t words = 0;
  for (uint32_t i = 0; i < segments; i++) {
    uint32_t size;
    memcpy(&size, stream.data() + 12 + 4 * i, 4);
    words += size;
  }
  return 8 + table + words * 8;
}

template <typename T>
void forward(capnp::MessageReader& from, mos::Channel& to) {
  capnp::MallocMessageBuilder copy;
  copy.setRoot(from.getRoot<T>());
  to.send(copy);
}

// Waits until `a` or `b` has a message; 0 for a, 1 for b, -1 after 60 s.
int nextReadable(mos::Channel& a, mos::Channel& b) {
  if (a.hasBuffered()) {
    return 0;
  }
  if (b.hasBuffered()) {
    return 1;
  }
  struct pollfd fds[2] = {{a.fd(), POLLIN, 0}, {b.fd(), POLLIN, 0}};
  if (poll(fds, 2, 60000) <= 0) {
    return -1;
  }
  return (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) ? 0 : 1;
}

// Relays between the supervisor and the deputy until the guest waits in read(0) at home; true
// then (the request went to the deputy), false when either side ended first.
// `imageRest`: what follows the stream's header, sent (in the deputy's place) when the
// supervisor asks for it with sendImage.
bool relayUntilGuestReadsStdin(mos::Channel& supervisor, mos::Channel& deputy, uint64_t& seq,
                               const std::string& imageRest = std::string()) {
  for (;;) {
    int side = nextReadable(supervisor, deputy);
    if (side < 0) {
      return false;
    }
    if (side == 0) {
      KJ_IF_MAYBE (m, supervisor.receive()) {
        auto root = (*m)->getRoot<mos::proto::ToDeputy>();
        if (root.isSendImage()) {
          supervisor.sendBytes(imageRest.data(), imageRest.size());
          continue;
        }
        forward<mos::proto::ToDeputy>(**m, deputy);
        if (root.isSyscall() && root.getSyscall().getNr() == __NR_read &&
            root.getSyscall().getArgs().size() > 0 && root.getSyscall().getArgs()[0] == 0) {
          seq = root.getSyscall().getSeq();
          return true;
        }
      } else {
        return false;
      }
    } else {
      KJ_IF_MAYBE (m, deputy.receive()) {
        forward<mos::proto::ToRemote>(**m, supervisor);
      } else {
        return false;
      }
    }
  }
}

std::string toRemote(const std::function<void(mos::proto::ToRemote::Builder)>& fill) {
  capnp::MallocMessageBuilder message;
  fill(message.initRoot<mos::proto::ToRemote>());
  return frameOf(message);
}

// A ToRemote that parses but answers nothing the supervisor asked for.
std::string strayToRemote(uint64_t pendingSeq) {
  switch (below(5)) {
    case 0:
      return toRemote([&](mos::proto::ToRemote::Builder m) {
        auto r = m.initReply();
        r.setSeq(pendingSeq + 1 + below(1000));
        r.setRet(int64_t(rng()));
        auto out = r.initOut(below(3));
        for (uint i = 0; i < out.size(); i++) {
          out.set(i, bytesOf(randomBytes(below(64))));
        }
      });
    case 1:
      return toRemote([](mos::proto::ToRemote::Builder m) {
        m.setSignal(below(2) ? -int32_t(below(100)) : 65 + int32_t(below(100000)));
      });
    case 2:
      return toRemote([](mos::proto::ToRemote::Builder m) {
        auto f = m.initFileInfo();
        f.setId(rng());
        f.setErr(uint16_t(rng()));
      });
    case 3:
      return toRemote([](mos::proto::ToRemote::Builder m) {
        auto f = m.initFileData();
        f.setId(rng());
        f.setOffset(rng());
        f.setData(bytesOf(randomBytes(below(256))));
        f.setLast(below(2));
      });
    default: {
      std::string a = toRemote([](mos::proto::ToRemote::Builder m) { m.setSignal(0); });
      std::string b = toRemote([](mos::proto::ToRemote::Builder m) { m.initReply().setSeq(0); });
      // The tag sits where the two differ first... unless the pointer differs first; then a
      // signal with an unknown tag is simply one more stray message.
      size_t at = 8;
      while (at < a.size() && at < b.size() && a[at] == b[at]) {
        at++;
      }
      if (at + 1 < a.size() && a.size() == b.size()) {
        uint16_t tag = uint16_t(4 + below(65530));
        memcpy(&a[at & ~size_t(1)], &tag, sizeof(tag));
      }
      return a;
    }
  }
}

}  // namespace

TEST_CASE("the supervisor ends a job, never itself, on ToRemote messages that do not parse",
          "[remote][fuzz]") {
  if (geteuid() != 0) {
    WARN("needs root (the guest runs as nobody)");
    return;
  }
  std::string image = catImage();
  size_t headerEnd = streamHeaderEnd(image);
  std::string imageRest = image.substr(headerEnd);
  Mosd mosd;
  int ended = 0, survived = 0;
  for (int i = 0; i < SUPERVISOR_INPUTS; i++) {
    int kind = i % 6;
    int stdinPipe[2];
    REQUIRE(pipe2(stdinPipe, O_CLOEXEC) == 0);
    kj::AutoCloseFd stdinRead(stdinPipe[0]), stdinWrite(stdinPipe[1]);
    Conn conn(mosd.port);
    REQUIRE(conn.handshake("UMOSJOB1", keyOf(KEY_FILL), 1));
    mos::Channel supervisor(conn.release());
    Deputy d(stdinRead.get());
    {
      capnp::MallocMessageBuilder message;
      auto start = message.initRoot<mos::proto::JobStart>();
      start.setHomeNode(1);
      auto ids = start.initIds();
      ids.setPid(d.pid);
      ids.setTid(d.pid);
      start.setCommand("cat");
      start.setImageStreamed(true);
      supervisor.send(message);
      supervisor.sendBytes(image.data(), headerEnd);
    }
    mos::Channel deputy(kj::AutoCloseFd(dup(d.peer.get())));
    uint64_t seq = 0;
    INFO("input " << i << " (kind " << kind << ")\nmosd log:\n" << readFile(mosd.log));
    REQUIRE(relayUntilGuestReadsStdin(supervisor, deputy, seq, imageRest));

    std::string garbage;
    switch (kind) {
      case 0: garbage = randomBytes(1 + below(512)); break;
      case 1: garbage = oversizedFrame(); break;
      case 2:
        garbage = mutate(toRemote([&](mos::proto::ToRemote::Builder m) {
          auto r = m.initReply();
          r.setSeq(seq);
          r.setRet(2);
          r.initOut(1).set(0, bytesOf("x\n"));
        }));
        break;
      case 3:
        garbage = truncated(
            toRemote([&](mos::proto::ToRemote::Builder m) { m.initReply().setSeq(seq); }));
        break;
      default:
        for (int k = 0; k < 5; k++) {
          garbage += strayToRemote(seq);
        }
        break;
    }
    {
      int fd = supervisor.fd();
      REQUIRE(send(fd, garbage.data(), garbage.size(), MSG_NOSIGNAL) == ssize_t(garbage.size()));
    }
    if (kind >= 4) {
      // Stray messages are ignored: the call goes on. Feed the guest a line; it echoes it and
      // reads stdin again, through the same supervisor.
      REQUIRE(write(stdinWrite.get(), "x\n", 2) == 2);
      uint64_t again = 0;
      if (relayUntilGuestReadsStdin(supervisor, deputy, again)) {
        CHECK(again != seq);
        survived++;
      }
    }
    // The end of this job: the deputy and its channel go away.
    ended++;
  }
  // Every supervisor ended with a status; none died of a signal.
  auto reaped = [&]() {
    std::string log = readFile(mosd.log);
    return countOf(log, " exited") + countOf(log, "killed by signal") ==
           countOf(log, " started for a job");
  };
  auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!reaped() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  std::string log = readFile(mosd.log);
  INFO("supervisors that died of a signal:\n" << linesWith(log, "killed by signal"));
  CHECK(countOf(log, " started for a job") == size_t(SUPERVISOR_INPUTS));
  CHECK(reaped());
  CHECK(countOf(log, "killed by signal") == 0);
  CHECK(survived == SUPERVISOR_INPUTS / 6 * 2);
  WARN("supervisor reader: " << ended << " jobs each sent a malformed or stray ToRemote while a "
                             << "call waited; " << survived << " went on after stray messages");
  CHECK(mos::queryStatus(mosd.node1, mos::Ipv4{LOCALHOST}, mosd.port, 30000).nodeId == 1);
}
