// Starts the real mosd on 127.0.0.1 with a map of nodes 1 (127.0.0.1) and 3 (127.0.0.3), a cluster
// key and a fake mos-supervisor, and talks to it as mps, mosrun and a deputy would.

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <kj/debug.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>

#include "channel.h"
#include "cluster_auth.h"
#include "job_registry.h"
#include "map_file.h"
#include "node_client.h"

#ifndef MOSD_PATH
#error "MOSD_PATH must name the mosd executable"
#endif

namespace {

using namespace std::chrono_literals;

constexpr uint32_t LOCALHOST = 0x7f000001;

// A fake mos-supervisor: reports what it got over fd 3 (one line), then waits for the peer to
// close and exits with status 3 (so mosd has an abnormal end to log).
constexpr const char* FAKE_SUPERVISOR = R"(#!/usr/bin/python3 -S
import os, signal, sys
fds = []
for fd in range(0, 256):
    try:
        os.fstat(fd)
        fds.append(str(fd))
    except OSError:
        pass
import socket
kind = socket.socket(fileno=os.dup(3)).type == socket.SOCK_STREAM
blocked = sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))
report = "pid=%d ppid=%d fds=%s blocking=%s stream=%s blocked=%s argv=%s\n" % (
    os.getpid(), os.getppid(), ",".join(fds), os.get_blocking(3), kind, len(blocked),
    " ".join(sys.argv[1:]))
os.write(3, report.encode())
while os.read(3, 4096):
    pass
sys.exit(3)
)";

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

// A blocking TCP connection to mosd, optionally from another loopback source address. Reads
// time out after 60 s so a broken daemon fails the test instead of hanging it.
kj::AutoCloseFd connectRaw(uint16_t port, uint32_t source = 0) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  kj::AutoCloseFd owned(fd);
  if (source != 0) {
    sockaddr_in src{};
    src.sin_family = AF_INET;
    src.sin_addr.s_addr = htonl(source);
    REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&src), sizeof(src)) == 0);
  }
  timeval tv{60, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(LOCALHOST);
  sin.sin_port = htons(port);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&sin), sizeof(sin)) == 0);
  return owned;
}

void sendAll(int fd, const void* data, size_t size) {
  REQUIRE(send(fd, data, size, MSG_NOSIGNAL) == ssize_t(size));
}

// Reads until end of stream (true) or until the 60 s receive timeout (false). A reset counts
// as an end.
bool readsToEnd(int fd) {
  char buf[256];
  for (;;) {
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n == 0 || (n < 0 && errno == ECONNRESET)) {
      return true;
    }
    if (n < 0) {
      return false;
    }
  }
}

std::string readLine(int fd) {
  std::string line;
  char c;
  while (recv(fd, &c, 1, 0) == 1 && c != '\n') {
    line += c;
  }
  return line;
}

// Writes a key file of 32 bytes equal to `fill` with `mode`.
void writeKey(const std::string& path, uint8_t fill, mode_t mode = 0600) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << std::string(32, char(fill));
  }
  REQUIRE(chmod(path.c_str(), mode) == 0);
}

mos::ClusterKey keyOf(uint8_t fill) {
  std::string bytes(32, char(fill));
  return mos::ClusterKey::fromBytes(
      kj::arrayPtr(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), "test");
}

// The client half of the handshake on a raw connection: hello, nonce, proof for (key, nodeId).
// Returns whether mosd accepted (sent AUTH_ACCEPTED) rather than closing.
bool handshake(int fd, const char* hello, const mos::ClusterKey& key, uint32_t nodeId) {
  sendAll(fd, hello, 8);
  mos::AuthNonce nonce;
  REQUIRE(recv(fd, nonce.data(), nonce.size(), MSG_WAITALL) == ssize_t(nonce.size()));
  mos::AuthProof proof = key.prove(kj::arrayPtr(hello, 8), nonce, nodeId);
  sendAll(fd, proof.data(), proof.size());
  uint8_t accepted = 0;
  ssize_t n = recv(fd, &accepted, 1, 0);
  if (n == 1) {
    CHECK(accepted == mos::AUTH_ACCEPTED);
    return true;
  }
  CHECK((n == 0 || errno == ECONNRESET));  // closed, not timed out
  return false;
}

constexpr uint8_t KEY_FILL = 0x5a;

// A temp dir with map, key, run dir, cache dir and fake libexec, and mosd running on it.
class MosdFixture {
 public:
  std::string dir;
  std::string runDir, cacheDir, log;
  uint16_t port;
  pid_t pid = -1;
  mos::ClusterCredentials node1{1, keyOf(KEY_FILL)};  // what mps or a deputy of node 1 shows

  MosdFixture() {
    char tmpl[] = "/tmp/umosix-mosd-test-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    dir = tmpl;
    runDir = dir + "/run";
    cacheDir = dir + "/cache";
    log = dir + "/mosd.log";
    REQUIRE(mkdir((dir + "/libexec").c_str(), 0755) == 0);
    {
      std::ofstream map(dir + "/map");
      map << "# test cluster\n1 127.0.0.1 1\n3 127.0.0.3 1\n";
      std::ofstream fake(dir + "/libexec/mos-supervisor");
      fake << FAKE_SUPERVISOR;
    }
    REQUIRE(chmod((dir + "/libexec/mos-supervisor").c_str(), 0755) == 0);
    writeKey(dir + "/cluster.key", KEY_FILL);
    port = freePort();
    start();
  }

  ~MosdFixture() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    std::string cmd = "rm -rf '" + dir + "'";
    CHECK(system(cmd.c_str()) == 0);
  }

  void start() {
    std::string portText = std::to_string(port);
    std::string map = dir + "/map";
    std::string libexec = dir + "/libexec";
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      int devnull = open("/dev/null", O_RDONLY);
      dup2(devnull, 0);
      int out = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      dup2(out, 1);
      dup2(out, 2);
      setenv("UMOSIX_LIBEXEC", libexec.c_str(), 1);
      setenv("UMOSIX_LOG", "debug", 1);
      setenv("UMOSIX_KEY", (dir + "/cluster.key").c_str(), 1);
      execl(MOSD_PATH, "mosd", "--map", map.c_str(), "--node", "1", "--port", portText.c_str(),
            "--run-dir", runDir.c_str(), "--cache-dir", cacheDir.c_str(), nullptr);
      _exit(127);
    }
    // Ready when it answers.
    auto deadline = std::chrono::steady_clock::now() + 60s;
    for (;;) {
      auto error = kj::runCatchingExceptions(
          [&]() { mos::queryStatus(node1, mos::Ipv4{LOCALHOST}, port, 1000); });
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

  // SIGTERM, then the exit status (as from waitpid).
  int stop() {
    REQUIRE(kill(pid, SIGTERM) == 0);
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    pid = -1;
    return status;
  }

  mos::NodeStatus status() { return mos::queryStatus(node1, mos::Ipv4{LOCALHOST}, port, 30000); }

  // Waits up to 60 s for `text` to appear in the log.
  bool logShows(const std::string& text) {
    auto deadline = std::chrono::steady_clock::now() + 60s;
    while (std::chrono::steady_clock::now() < deadline) {
      if (readFile(log).find(text) != std::string::npos) {
        return true;
      }
      std::this_thread::sleep_for(20ms);
    }
    return false;
  }
};

bool processGone(pid_t pid) { return kill(pid, 0) < 0 && errno == ESRCH; }

}  // namespace

TEST_CASE("mosd reports its status and the jobs of its run dir", "[node][mosd]") {
  MosdFixture mosd;
  auto status = mosd.status();
  CHECK(status.nodeId == 1);
  CHECK(status.version == UMOSIX_VERSION);
  CHECK(status.cpus == uint32_t(sysconf(_SC_NPROCESSORS_ONLN)));
  CHECK(status.guests == 0);
  CHECK(status.load >= 0);

  CHECK(mos::listJobs(mosd.node1, mos::Ipv4{LOCALHOST}, mosd.port, 30000).empty());
  auto map = mos::MapFile::fromPath(mosd.dir + "/map");
  CHECK(mos::queryStatus(mosd.node1, map, 1, mosd.port, 30000).nodeId == 1);
  CHECK_THROWS_WITH(mos::queryStatus(mosd.node1, map, 2, mosd.port, 30000),
                    Catch::Contains("node 2 is not in the cluster map"));

  auto job = mos::OwnedJobRecord::create(mosd.runDir, "jobs", 4242, 4242, 1, "sleep 100");
  job.get()->node = 2;
  job.get()->state = uint32_t(mos::JobState::REMOTE);
  job.get()->syscalls = 17;
  job.get()->remotePid = 999;
  auto home = mos::OwnedJobRecord::create(mosd.runDir, "jobs", 77, 77, 1, "make");
  auto guest = mos::OwnedJobRecord::create(mosd.runDir, "guests", 555, 31, 3, "cc1");
  guest.get()->node = 1;
  guest.get()->state = uint32_t(mos::JobState::REMOTE);

  auto jobs = mos::listJobs(mosd.node1, mos::Ipv4{LOCALHOST}, mosd.port, 30000);
  REQUIRE(jobs.size() == 2);
  CHECK(jobs[0].homePid == 77);  // sorted by home pid
  CHECK(jobs[0].state == "home");
  CHECK(jobs[0].node == 1);
  CHECK(jobs[0].command == "make");
  CHECK(jobs[1].homePid == 4242);
  CHECK(jobs[1].command == "sleep 100");
  CHECK(jobs[1].node == 2);
  CHECK(jobs[1].homeNode == 1);
  CHECK(jobs[1].state == "remote");
  CHECK(jobs[1].syscalls == 17);
  CHECK(jobs[1].remotePid == 999);

  auto guests = mos::listGuests(mosd.node1, mos::Ipv4{LOCALHOST}, mosd.port, 30000);
  REQUIRE(guests.size() == 1);
  CHECK(guests[0].homePid == 31);
  CHECK(guests[0].homeNode == 3);
  CHECK(mosd.status().guests == 1);

  int exit = mosd.stop();
  CHECK(WIFEXITED(exit));
  CHECK(WEXITSTATUS(exit) == 0);
  CHECK(access((mosd.runDir + "/mosd.pid").c_str(), F_OK) != 0);  // pid file removed
}

TEST_CASE("mosd closes bad connections and keeps serving", "[node][mosd]") {
  MosdFixture mosd;

  SECTION("a garbage hello") {
    auto fd = connectRaw(mosd.port);
    sendAll(fd.get(), "GARBAGE!", 8);
    CHECK(readsToEnd(fd.get()));
    CHECK(mosd.logShows("bad hello from node 1"));
  }
  SECTION("a connection closed in the middle of its hello") {
    auto fd = connectRaw(mosd.port);
    sendAll(fd.get(), "UMOS", 4);
    fd = nullptr;
  }
  SECTION("an authenticated RPC connection followed by bytes that are no Cap'n Proto message") {
    auto fd = connectRaw(mosd.port);
    REQUIRE(handshake(fd.get(), "UMOSRPC1", keyOf(KEY_FILL), 1));
    unsigned char junk[64];
    memset(junk, 0xff, sizeof(junk));  // segment count 2^32: rejected by the reader
    sendAll(fd.get(), junk, sizeof(junk));
    CHECK(readsToEnd(fd.get()));
  }
  SECTION("a peer that is not in the map, twice") {
    for (int i = 0; i < 2; i++) {
      auto fd = connectRaw(mosd.port, 0x7f000002);
      sendAll(fd.get(), "UMOSRPC1", 8);
      CHECK(readsToEnd(fd.get()));
    }
    CHECK(mosd.logShows("refusing connections from 127.0.0.2"));
    CHECK(countOf(readFile(mosd.log), "refusing connections from 127.0.0.2") == 1);
  }
  SECTION("a peer that never says hello is dropped after 5 s") {
    auto fd = connectRaw(mosd.port);
    auto begin = std::chrono::steady_clock::now();
    CHECK(readsToEnd(fd.get()));
    auto waited = std::chrono::steady_clock::now() - begin;
    CHECK(waited >= 4500ms);
    CHECK(waited < 8000ms);
  }

  // The daemon is still there and answers.
  CHECK(mosd.status().nodeId == 1);
  int exit = mosd.stop();
  CHECK(WIFEXITED(exit));
  CHECK(WEXITSTATUS(exit) == 0);
}

TEST_CASE("mosd hands a job connection to mos-supervisor as fd 3 and reaps it", "[node][mosd]") {
  MosdFixture mosd;
  auto fd = connectRaw(mosd.port);
  REQUIRE(handshake(fd.get(), "UMOSJOB1", keyOf(KEY_FILL), 1));
  std::string report = readLine(fd.get());
  INFO(report << "\nlog:\n" << readFile(mosd.log));
  std::string argv = report.substr(report.find("argv=") + 5);
  CHECK(argv ==
        "--fd 3 --node 1 --peer-node 1 --run-dir " + mosd.runDir + " --cache-dir " + mosd.cacheDir);
  CHECK(report.find("ppid=" + std::to_string(mosd.pid) + " ") != std::string::npos);
  CHECK(report.find(" fds=0,1,2,3 ") != std::string::npos);  // nothing of mosd's leaked
  CHECK(report.find(" blocking=True ") != std::string::npos);
  CHECK(report.find(" stream=True ") != std::string::npos);
  CHECK(report.find(" blocked=0 ") != std::string::npos);
  pid_t supervisor = std::stoi(report.substr(4));
  CHECK(!processGone(supervisor));

  // The connection is the supervisor's now: it sees our bytes, then our end of stream.
  sendAll(fd.get(), "JobStart", 8);
  fd = nullptr;
  CHECK(mosd.logShows(fmt::format("supervisor {} (job from node 1 at 127.0.0.1", supervisor)));
  CHECK(mosd.logShows("exited with status 3"));
  CHECK(processGone(supervisor));  // reaped, not a zombie

  CHECK(mosd.status().nodeId == 1);
}

TEST_CASE("stopping mosd kills its supervisors", "[node][mosd]") {
  MosdFixture mosd;
  auto first = connectRaw(mosd.port);
  auto second = connectRaw(mosd.port);
  REQUIRE(handshake(first.get(), "UMOSJOB1", keyOf(KEY_FILL), 1));
  REQUIRE(handshake(second.get(), "UMOSJOB1", keyOf(KEY_FILL), 1));
  std::string a = readLine(first.get());
  std::string b = readLine(second.get());
  REQUIRE(a.rfind("pid=", 0) == 0);
  REQUIRE(b.rfind("pid=", 0) == 0);
  pid_t pidA = std::stoi(a.substr(4));
  pid_t pidB = std::stoi(b.substr(4));
  CHECK(!processGone(pidA));

  int exit = mosd.stop();
  CHECK(WIFEXITED(exit));
  CHECK(WEXITSTATUS(exit) == 0);
  CHECK(processGone(pidA));
  CHECK(processGone(pidB));
  CHECK(readsToEnd(first.get()));  // the job connection died with its supervisor
  CHECK(access((mosd.runDir + "/mosd.pid").c_str(), F_OK) != 0);
}

TEST_CASE("mosd accepts only members that prove the cluster key from their own address",
          "[node][mosd][auth]") {
  MosdFixture mosd;
  const auto good = keyOf(KEY_FILL);
  const auto wrong = keyOf(0x33);

  SECTION("the wrong key, on both services, twice: refused, logged once") {
    for (const char* hello : {"UMOSRPC1", "UMOSJOB1"}) {
      auto fd = connectRaw(mosd.port);
      CHECK_FALSE(handshake(fd.get(), hello, wrong, 1));
    }
    CHECK(mosd.logShows("refused again: a connection from 127.0.0.1"));
    std::string log = readFile(mosd.log);
    CHECK(countOf(log, "refusing a connection from 127.0.0.1") == 1);
    CHECK(countOf(log, "claiming node 1: wrong proof (its cluster key differs from " + mosd.dir +
                           "/cluster.key)") == 2);
    CHECK(log.find("supervisor") == std::string::npos);  // no job got through
    try {
      mos::queryStatus({1, keyOf(0x33)}, mos::Ipv4{LOCALHOST}, mosd.port, 30000);
      FAIL("no exception");
    } catch (kj::Exception& e) {
      CHECK(e.getType() == kj::Exception::Type::DISCONNECTED);
      CHECK(std::string(e.getDescription().cStr()) ==
            fmt::format("mosd at 127.0.0.1:{} refused node 1 (is test the cluster's key?)",
                        mosd.port));
    }
  }
  SECTION("the right key, claiming the id of another member: refused") {
    auto fd = connectRaw(mosd.port);
    CHECK_FALSE(handshake(fd.get(), "UMOSJOB1", good, 3));
    CHECK(
        mosd.logShows("claiming node 3: node 3 has the address 127.0.0.3 in " + mosd.dir + "/map"));
  }
  SECTION("the right key, claiming a node that is not in the map: refused") {
    auto fd = connectRaw(mosd.port);
    CHECK_FALSE(handshake(fd.get(), "UMOSRPC1", good, 9));
    CHECK(mosd.logShows("claiming node 9: node 9 is not in " + mosd.dir + "/map"));
  }
  SECTION("a proof made for another hello or nonce: refused") {
    auto fd = connectRaw(mosd.port);
    sendAll(fd.get(), "UMOSJOB1", 8);
    mos::AuthNonce nonce;
    REQUIRE(recv(fd.get(), nonce.data(), nonce.size(), MSG_WAITALL) == 32);
    auto proof = good.prove(kj::arrayPtr(mos::HELLO_RPC, 8), nonce, 1);  // for the other service
    sendAll(fd.get(), proof.data(), proof.size());
    CHECK(readsToEnd(fd.get()));
    auto second = connectRaw(mosd.port);
    sendAll(second.get(), "UMOSJOB1", 8);
    mos::AuthNonce other;
    REQUIRE(recv(second.get(), other.data(), other.size(), MSG_WAITALL) == 32);
    CHECK(other != nonce);  // fresh per connection: a replayed proof cannot match
    sendAll(second.get(), proof.data(), proof.size());
    CHECK(readsToEnd(second.get()));
    CHECK(mosd.logShows("refused again: a connection from 127.0.0.1"));
  }
  SECTION("a hello and no proof: dropped after 5 s") {
    auto fd = connectRaw(mosd.port);
    sendAll(fd.get(), "UMOSRPC1", 8);
    auto begin = std::chrono::steady_clock::now();
    CHECK(readsToEnd(fd.get()));
    auto waited = std::chrono::steady_clock::now() - begin;
    CHECK(waited >= 4500ms);
    CHECK(waited < 8000ms);
  }
  SECTION("node 3 from its own address: accepted, its job goes to a supervisor") {
    auto fd = connectRaw(mosd.port, 0x7f000003);
    REQUIRE(handshake(fd.get(), "UMOSJOB1", good, 3));
    std::string report = readLine(fd.get());
    CHECK(report.find("--peer-node 3 ") != std::string::npos);
  }

  // mosd keeps serving the members that prove themselves.
  CHECK(mosd.status().nodeId == 1);
  int exit = mosd.stop();
  CHECK(WIFEXITED(exit));
  CHECK(WEXITSTATUS(exit) == 0);
}

TEST_CASE("mosd exits 2 naming a cluster key it cannot use", "[node][mosd][auth]") {
  char tmpl[] = "/tmp/umosix-mosd-key-XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  std::string dir = tmpl;
  {
    std::ofstream map(dir + "/map");
    map << "1 127.0.0.1 1\n";
  }
  auto run = [&](const std::string& key) {
    std::string cmd = std::string(MOSD_PATH) + " --map " + dir + "/map --node 1 --port 1 --key " +
                      key + " 2>" + dir + "/err";
    int status = system(cmd.c_str());
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 2);
    std::string err = readFile(dir + "/err");
    CHECK(countOf(err, "\n") == 1);  // one message
    return err;
  };
  CHECK(run(dir + "/none").find("cluster key " + dir + "/none: missing") != std::string::npos);
  writeKey(dir + "/open.key", 1, 0604);
  CHECK(
      run(dir + "/open.key").find("cluster key " + dir + "/open.key: accessible to other users") !=
      std::string::npos);
  {
    std::ofstream out(dir + "/short.key");
    out << "0123456789";
  }
  chmod((dir + "/short.key").c_str(), 0600);
  CHECK(run(dir + "/short.key").find("cluster key " + dir + "/short.key: too short (10 bytes") !=
        std::string::npos);
  system(("rm -rf '" + dir + "'").c_str());
}

TEST_CASE("mosd exits 2 naming the line of a bad map", "[node][mosd]") {
  char tmpl[] = "/tmp/umosix-mosd-map-XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  std::string dir = tmpl;
  {
    std::ofstream map(dir + "/map");
    map << "1 127.0.0.1 1\n2 127.0.0.x\n";
  }
  std::string cmd = std::string(MOSD_PATH) + " --map " + dir + "/map --port 1 2>" + dir + "/err";
  int status = system(cmd.c_str());
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 2);
  std::string err = readFile(dir + "/err");
  CHECK(err.find(dir + "/map:2: bad address \"127.0.0.x\"") != std::string::npos);
  CHECK(countOf(err, "\n") == 1);  // one message
  system(("rm -rf '" + dir + "'").c_str());
}

TEST_CASE("queryStatus reports a node without mosd clearly", "[node][mosd]") {
  uint16_t port = freePort();  // nobody listens there
  try {
    mos::queryStatus({1, keyOf(KEY_FILL)}, mos::Ipv4{LOCALHOST}, port, 1000);
    FAIL("no exception");
  } catch (kj::Exception& e) {
    CHECK(e.getType() == kj::Exception::Type::DISCONNECTED);
    CHECK(std::string(e.getDescription().cStr()) ==
          fmt::format("cannot reach mosd at 127.0.0.1:{}: Connection refused", port));
  }

  // A listener that never answers: the timeout.
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(LOCALHOST);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&sin), sizeof(sin)) == 0);
  REQUIRE(listen(fd, 4) == 0);
  socklen_t len = sizeof(sin);
  getsockname(fd, reinterpret_cast<sockaddr*>(&sin), &len);
  auto begin = std::chrono::steady_clock::now();
  try {
    mos::queryStatus({1, keyOf(KEY_FILL)}, mos::Ipv4{LOCALHOST}, ntohs(sin.sin_port), 300);
    FAIL("no exception");
  } catch (kj::Exception& e) {
    CHECK(e.getType() == kj::Exception::Type::DISCONNECTED);
    CHECK(std::string(e.getDescription().cStr()) ==
          fmt::format("mosd at 127.0.0.1:{} did not answer within 300 ms", ntohs(sin.sin_port)));
  }
  CHECK(std::chrono::steady_clock::now() - begin < 2s);
  close(fd);
}

namespace {
// Runs `command`, returning its exit status and standard output.
std::pair<int, std::string> runCapture(const std::string& command) {
  FILE* p = popen(command.c_str(), "r");
  REQUIRE(p != nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) {
    out.append(buf, n);
  }
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}
}  // namespace

TEST_CASE("mps prints every process of the local mosd's jobs as a table and as JSON",
          "[node][mosd][mps]") {
  MosdFixture mosd;
  // A job whose process is this test (its parent and threads are read from /proc) and one whose
  // process is gone (a pid just reaped: nothing to read).
  pid_t gone = fork();
  if (gone == 0) {
    _exit(0);
  }
  REQUIRE(waitpid(gone, nullptr, 0) == gone);
  pid_t self = getpid();
  auto job = mos::OwnedJobRecord::create(mosd.runDir, "jobs", self, self, 1, "sleep 100");
  job.get()->node = 2;
  job.get()->state = uint32_t(mos::JobState::REMOTE);
  job.get()->syscalls = 10523;
  job.get()->remotePid = 31337;
  mos::noteArrival(job.get(), 2);
  auto home = mos::OwnedJobRecord::create(mosd.runDir, "jobs", gone, gone, 1, "make -j4");

  std::string base = std::string(MPS_PATH) + " --map " + mosd.dir + "/map --key " + mosd.dir +
                     "/cluster.key --node 1 --port " + std::to_string(mosd.port) +
                     " --timeout 3000";
  auto [status, table] = runCapture(base + " 2>/dev/null");
  CHECK(status == 0);
  auto threads = [] {
    std::ifstream in("/proc/self/status");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("Threads:", 0) == 0) {
        return std::stoi(line.substr(8));
      }
    }
    return 0;
  }();
  std::vector<std::string> lines;
  lines.push_back("    PID     PPID  WHERE   STATE      THR  MOVES   SYSCALLS  COMMAND");
  lines.push_back(
      fmt::format("{:>7}  {:>7}  home    home         -      0          0  make -j4", gone, "-"));
  lines.push_back(fmt::format("{:>7}  {:>7}  2       remote     {:>3}      1      10523  sleep 100",
                              self, getppid(), threads));
  if (gone > self) {
    std::swap(lines[1], lines[2]);
  }
  CHECK(table == lines[0] + "\n" + lines[1] + "\n" + lines[2] + "\n");

  // Node 2 is not in the map: its guests' details are missing, nothing else.
  auto [jsonStatus, json] = runCapture(base + " --json 2>/dev/null");
  CHECK(jsonStatus == 0);
  auto parsed = nlohmann::json::parse(json);
  REQUIRE(parsed.is_array());
  REQUIRE(parsed.size() == 2);
  auto mine = parsed[gone > self ? 0 : 1];
  CHECK(mine == nlohmann::json({{"pid", self},
                                {"ppid", getppid()},
                                {"job", self},
                                {"node", 2},
                                {"state", "remote"},
                                {"threads", threads},
                                {"syscalls", 10523},
                                {"remotePid", 31337},
                                {"stay", ""},
                                {"moves", 1},
                                {"trail", {1, 2}},
                                {"command", "sleep 100"}}));
  CHECK(parsed[gone > self ? 1 : 0]["node"] == 1);

  // Another key: refused, one clear line, exit 1; mosd keeps serving.
  writeKey(mosd.dir + "/other.key", 0x33);
  std::string otherKey = base;
  otherKey.replace(otherKey.find("/cluster.key"), 12, "/other.key");
  auto [refusedStatus, refusedOut] = runCapture(otherKey + " 2>&1");
  CHECK(refusedStatus == 1);
  CHECK(refusedOut == fmt::format("mps: mosd at 127.0.0.1:{} refused node 1 (is {}/other.key the "
                                  "cluster's key?)\n",
                                  mosd.port, mosd.dir));
  // A key file others can read: refused before any connection, exit 2.
  REQUIRE(chmod((mosd.dir + "/other.key").c_str(), 0644) == 0);
  auto [modeStatus, modeOut] = runCapture(otherKey + " 2>&1");
  CHECK(modeStatus == 2);
  CHECK(modeOut == fmt::format("mps: cluster key {0}/other.key: accessible to other users (mode "
                               "0644); chmod 600 {0}/other.key\n",
                               mosd.dir));
  CHECK(runCapture(base).first == 0);

  // mosd gone: one clear line, exit 1.
  mosd.stop();
  auto [downStatus, downOut] = runCapture(base + " 2>&1");
  CHECK(downStatus == 1);
  CHECK(downOut ==
        fmt::format("mps: cannot reach mosd at 127.0.0.1:{}: Connection refused\n", mosd.port));
}

TEST_CASE("mps -d shows a job process's place, fds, signals, calls in flight and counters",
          "[node][mosd][mps][inspect]") {
  MosdFixture mosd;
  // This test process plays the deputy: its record, its fds, one call in flight at home. Its
  // home is node 3 and its user part runs on node 1, so mps asks this same mosd for the remote
  // numbers too (a guests record of this process).
  pid_t self = getpid();
  auto job = mos::OwnedJobRecord::create(mosd.runDir, "jobs", self, self, 3, "reader --wait");
  job.get()->node = 1;
  job.get()->state = uint32_t(mos::JobState::REMOTE);
  job.get()->remotePid = 31337;
  job.get()->syscalls = 41;
  int pipeFds[2];
  REQUIRE(pipe(pipeFds) == 0);
  kj::AutoCloseFd readEnd(pipeFds[0]), writeEnd(pipeFds[1]);
  int file = open((mosd.dir + "/map").c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(file >= 0);
  kj::AutoCloseFd ownedFile(file);
  REQUIRE(lseek(file, 7, SEEK_SET) == 7);
  auto& stats = job.get()->stats;
  stats.reserved[0] = writeEnd.get();  // as if it were the deputy's own
  mos::countCall(stats.routes[0], 10);
  mos::countCall(stats.routes[0], 30);
  stats.bytesIn = 1000;
  stats.bytesOut = 2000;
  uint64_t args[6] = {uint64_t(readEnd.get()), 0x7000, 100, 0, 0, 0};
  mos::beginCall(stats.inFlight[0], self, 0, args);
  auto guest = mos::OwnedJobRecord::create(mosd.runDir, "guests", self, self, 3, "reader");
  guest.get()->remotePid = 31337;
  mos::countCall(guest.get()->stats.routes[1], 2);  // one emulated call
  guest.get()->stats.cacheHits = 4;
  guest.get()->stats.cacheMisses = 2;
  guest.get()->stats.cacheBytes = 123456;
  mos::setStayReason(guest.get()->stats, "a shared writable file mapping (refused here)");

  std::string base = std::string(MPS_PATH) + " --map " + mosd.dir + "/map --key " + mosd.dir +
                     "/cluster.key --node 1 --port " + std::to_string(mosd.port);
  auto [status, json] = runCapture(base + " -d " + std::to_string(self) + " --json");
  REQUIRE(status == 0);
  auto view = nlohmann::json::parse(json);
  CHECK(view["pid"] == self);
  CHECK(view["homeNode"] == 3);
  CHECK(view["node"] == 1);
  CHECK(view["state"] == "remote");
  CHECK(view["command"] == "reader --wait");
  CHECK(view["remotePid"] == 31337);
  char cwd[PATH_MAX];
  REQUIRE(getcwd(cwd, sizeof(cwd)) != nullptr);
  CHECK(view["cwd"] == cwd);
  CHECK(view["syscalls"] == 41);
  CHECK(view["home"]["calls"] == 2);
  CHECK(view["home"]["totalUs"] == 40);
  CHECK(view["home"]["maxUs"] == 30);
  CHECK(view["bytesIn"] == 1000);
  CHECK(view["bytesOut"] == 2000);
  CHECK(view["stayReason"] == "none");
  REQUIRE(view["inFlight"].size() == 1);
  CHECK(view["inFlight"][0]["syscall"] == "read");
  CHECK(view["inFlight"][0]["call"] == fmt::format("read({}, 0x7000, 100)", readEnd.get()));
  CHECK(view["inFlight"][0]["tid"] == self);
  std::map<int, nlohmann::json> fds;
  for (auto& fd : view["fds"]) {
    fds[fd["fd"].get<int>()] = fd;
  }
  REQUIRE(fds.count(readEnd.get()) == 1);
  CHECK(fds[readEnd.get()]["target"].get<std::string>().rfind("pipe:[", 0) == 0);
  CHECK(fds[readEnd.get()]["deputy"] == false);
  CHECK(fds[writeEnd.get()]["deputy"] == true);
  CHECK(fds[writeEnd.get()]["flagNames"] == "O_WRONLY");
  CHECK(fds[file]["target"] == mosd.dir + "/map");
  CHECK(fds[file]["offset"] == 7);
  CHECK(fds[file]["flagNames"] == "O_RDONLY|O_CLOEXEC");
  auto remote = view["remote"];
  CHECK(remote["found"] == true);
  CHECK(remote["node"] == 1);
  CHECK(remote["routes"][1] ==
        nlohmann::json({{"route", "emulated"}, {"calls", 1}, {"totalUs", 2}, {"maxUs", 2}}));
  CHECK(remote["cacheHits"] == 4);
  CHECK(remote["cacheMisses"] == 2);
  CHECK(remote["cacheBytes"] == 123456);
  CHECK(remote["stayReason"] == "a shared writable file mapping (refused here)");

  // The call's duration grows while it stays in flight; the text view says the same.
  uint64_t first = view["inFlight"][0]["elapsedUs"];
  std::this_thread::sleep_for(50ms);
  auto [textStatus, text] = runCapture(base + " -d " + std::to_string(self));
  CHECK(textStatus == 0);
  CHECK_THAT(text,
             Catch::Contains(fmt::format("job process {} (reader --wait), home node 3\n", self)));
  CHECK_THAT(text,
             Catch::Contains(fmt::format("  in flight     read({}, 0x7000, 100)  tid {}  for ",
                                         readEnd.get(), self)));
  CHECK_THAT(text, Catch::Contains("  content cache 4 hits, 2 misses, 123456 bytes fetched"));
  CHECK_THAT(text, Catch::Contains("(deputy's own)"));
  auto [againStatus, again] = runCapture(base + " -d " + std::to_string(self) + " --json");
  CHECK(againStatus == 0);
  CHECK(nlohmann::json::parse(again)["inFlight"][0]["elapsedUs"].get<uint64_t>() >= first + 50000);
  mos::endCall(stats.inFlight[0]);
  CHECK(nlohmann::json::parse(
            runCapture(base + " -d " + std::to_string(self) + " --json").second)["inFlight"]
            .empty());

  // Not a job process, no such process, not a pid: one clear line each.
  auto [notJob, notJobOut] = runCapture(base + " -d " + std::to_string(mosd.pid) + " 2>&1");
  CHECK(notJob == 1);
  CHECK(notJobOut == fmt::format("mps: process {} is not a umosix job process (no job record on "
                                 "node 1)\n",
                                 mosd.pid));
  auto [gone, goneOut] = runCapture(base + " -d 4194303 2>&1");
  CHECK(gone == 1);
  CHECK(goneOut == "mps: no process with pid 4194303\n");
  auto [bad, badOut] = runCapture(base + " -d x1 2>&1");
  CHECK(bad == 2);
  CHECK(badOut == "mps: -d: 'x1' is not a process id\n");
}
