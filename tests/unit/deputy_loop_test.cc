// The deputy's loop in a process of its own (forked): signals, file fetches, the end of the job,
// and mos-deputy's startup against a fake supervisor.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <capnp/message.h>
#include <capnp/serialize.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cluster_auth.h"
#include "deputy.h"
#include "image_stream.h"
#include "signals.h"

using namespace mos;
using namespace mos::deputy;

namespace {

// A deputy running its loop in a forked child; this process plays the supervisor.
struct ForkedDeputy {
  pid_t pid = -1;
  kj::Own<Channel> peer;
  int stderrRead = -1;  // the child's stderr
  uint64_t seq = 100;

  explicit ForkedDeputy(std::function<void()> beforeLoop = nullptr) {
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    int err[2];
    REQUIRE(pipe2(err, O_CLOEXEC) == 0);
    int ready[2];
    REQUIRE(pipe2(ready, O_CLOEXEC) == 0);
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      close(sv[1]);
      dup2(err[1], STDERR_FILENO);
      blockAllSignals();
      installSignalHandlers();
      if (beforeLoop) {
        beforeLoop();
      }
      // From here on a signal is the job's (held until the loop forwards it), never fatal.
      (void)!write(ready[1], "r", 1);
      static ReservedFds fds;
      int high = fds.moveHigh(sv[0]);
      DeputyOptions options;
      options.node = 2;
      options.homeNode = 1;
      options.jobExe = "/bin/true";
      options.address = "127.0.0.1";  // where a forked child deputy connects
      Deputy deputy(options, fds, kj::heap<Channel>(kj::AutoCloseFd(high)));
      deputy.run();
    }
    close(sv[0]);
    close(err[1]);
    stderrRead = err[0];
    peer = kj::heap<Channel>(kj::AutoCloseFd(sv[1]));
    // Tests signal the deputy right away: wait (up to 60 s) until its handlers are in place.
    close(ready[1]);
    struct pollfd pfd = {ready[0], POLLIN, 0};
    char byte = 0;
    bool isReady = poll(&pfd, 1, 60000) == 1 && read(ready[0], &byte, 1) == 1;
    close(ready[0]);
    REQUIRE(isReady);
  }

  ~ForkedDeputy() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    if (stderrRead >= 0) {
      close(stderrRead);
    }
  }

  void send(capnp::MallocMessageBuilder& message) { peer->send(message); }

  // Receives one message within `ms`; nullptr at end of stream or timeout.
  kj::Own<capnp::MessageReader> receive(int ms = 30000) {
    if (!peer->hasBuffered()) {
      struct pollfd pfd = {peer->fd(), POLLIN, 0};
      if (poll(&pfd, 1, ms) <= 0) {
        return {};
      }
    }
    KJ_IF_MAYBE (m, peer->receive()) {
      return kj::mv(*m);
    }
    return {};
  }

  uint64_t sendSyscall(int nr, std::vector<uint64_t> args,
                       std::vector<std::pair<int, uint32_t>> out = {}) {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<proto::ToDeputy>().initSyscall();
    request.setSeq(++seq);
    request.setNr(nr);
    auto list = request.initArgs(6);
    for (size_t i = 0; i < args.size(); i++) {
      list.set(i, args[i]);
    }
    auto o = request.initOut(out.size());
    for (size_t i = 0; i < out.size(); i++) {
      o[i].setArg(out[i].first);
      o[i].setSize(out[i].second);
    }
    send(message);
    return seq;
  }

  // Waits for the child's end; returns the raw wait status.
  int wait() {
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    pid = -1;
    return status;
  }

  std::string stderrText() {
    std::string text;
    char buffer[512];
    ssize_t n;
    while ((n = read(stderrRead, buffer, sizeof(buffer))) > 0) {
      text.append(buffer, n);
    }
    return text;
  }
};

void sendExit(ForkedDeputy& d, int status, int sig) {
  capnp::MallocMessageBuilder message;
  auto exit = message.initRoot<proto::ToDeputy>().initExit();
  exit.setStatus(status);
  exit.setSignal(sig);
  d.send(message);
}

// Waits up to 30 s until `pid` is blocked in syscall `nr` (and, when `arg0` >= 0, with that first
// argument), as /proc/PID/syscall shows it. False on timeout.
bool waitBlockedIn(pid_t pid, long nr, long arg0 = -1) {
  std::string path = "/proc/" + std::to_string(pid) + "/syscall";
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    char text[256] = {};
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ssize_t n = read(fd, text, sizeof(text) - 1);
      close(fd);
      long got = -2;
      unsigned long first = 0;
      if (n > 0 && sscanf(text, "%ld 0x%lx", &got, &first) >= 1 && got == nr &&
          (arg0 < 0 || first == static_cast<unsigned long>(arg0))) {
        return true;
      }
    }
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec - start.tv_sec >= 30) {
      return false;
    }
    usleep(2000);
  }
}

std::string randomBytes(size_t n) {
  std::mt19937_64 rng(42);
  std::string s(n, '\0');
  for (auto& c : s) {
    c = static_cast<char>(rng());
  }
  return s;
}

}  // namespace

TEST_CASE(
    "deputy read on an empty pipe interrupted by a signal sends the signal, then an "
    "interrupted reply",
    "[deputy][signal]") {
  int p[2];
  REQUIRE(pipe2(p, 0) == 0);  // inherited by the deputy: a descriptor of the job
  ForkedDeputy d;
  uint64_t seq = d.sendSyscall(__NR_read, {uint64_t(p[0]), 0, 64}, {{1, 64}});
  REQUIRE(waitBlockedIn(d.pid, __NR_read, p[0]));
  REQUIRE(kill(d.pid, SIGUSR1) == 0);
  auto first = d.receive();
  REQUIRE(first.get() != nullptr);
  auto root = first->getRoot<proto::ToRemote>();
  REQUIRE(root.isSignal());
  CHECK(root.getSignal() == SIGUSR1);
  auto second = d.receive();
  REQUIRE(second.get() != nullptr);
  auto reply = second->getRoot<proto::ToRemote>();
  REQUIRE(reply.isReply());
  CHECK(reply.getReply().getSeq() == seq);
  CHECK(reply.getReply().getRet() == -EINTR);
  CHECK(reply.getReply().getInterrupted());
  close(p[0]);
  close(p[1]);
}

TEST_CASE("deputy signals racing with the start of a forwarded call never leave it blocked",
          "[deputy][signal]") {
  int p[2];
  REQUIRE(pipe2(p, 0) == 0);
  ForkedDeputy d;
  std::mt19937 rng(7);
  for (int round = 0; round < 300; round++) {
    uint64_t seq = d.sendSyscall(__NR_read, {uint64_t(p[0]), 0, 8}, {{1, 8}});
    // From "before the request arrives" to "well inside read(2)".
    struct timespec delay = {0, static_cast<long>(rng() % 200000)};
    nanosleep(&delay, nullptr);
    REQUIRE(kill(d.pid, SIGUSR2) == 0);
    bool sawSignal = false;
    for (;;) {
      auto m = d.receive();
      REQUIRE(m.get() != nullptr);  // a hang here is the race the wrapper closes
      auto root = m->getRoot<proto::ToRemote>();
      if (root.isSignal()) {
        CHECK(root.getSignal() == SIGUSR2);
        sawSignal = true;
        continue;
      }
      REQUIRE(root.isReply());
      CHECK(root.getReply().getSeq() == seq);
      CHECK(root.getReply().getRet() == -EINTR);
      CHECK(root.getReply().getInterrupted());
      break;
    }
    CHECK(sawSignal);
  }
  close(p[0]);
  close(p[1]);
}

TEST_CASE("deputy forwards a signal that arrives while it waits for a request",
          "[deputy][signal]") {
  ForkedDeputy d;
  REQUIRE(waitBlockedIn(d.pid, __NR_ppoll));  // waiting for a request, signals open
  REQUIRE(kill(d.pid, SIGINT) == 0);
  auto m = d.receive();
  REQUIRE(m.get() != nullptr);
  REQUIRE(m->getRoot<proto::ToRemote>().isSignal());
  CHECK(m->getRoot<proto::ToRemote>().getSignal() == SIGINT);
  // The deputy lives on (SIGINT was the job's, not the deputy's).
  uint64_t seq = d.sendSyscall(__NR_getppid, {});
  auto reply = d.receive();
  REQUIRE(reply.get() != nullptr);
  CHECK(reply->getRoot<proto::ToRemote>().getReply().getSeq() == seq);
  CHECK(reply->getRoot<proto::ToRemote>().getReply().getRet() == getpid());
}

TEST_CASE("deputy SIGPIPE of a forwarded write is the job's signal", "[deputy][signal]") {
  int p[2];
  REQUIRE(pipe2(p, 0) == 0);
  close(p[0]);
  ForkedDeputy d;
  capnp::MallocMessageBuilder message;
  auto request = message.initRoot<proto::ToDeputy>().initSyscall();
  request.setSeq(7);
  request.setNr(__NR_write);
  auto args = request.initArgs(6);
  args.set(0, p[1]);
  args.set(2, 3);
  auto in = request.initIn(1);
  in[0].setArg(1);
  in[0].setData(kj::StringPtr("abc").asBytes());
  d.send(message);
  auto first = d.receive();
  REQUIRE(first.get() != nullptr);
  REQUIRE(first->getRoot<proto::ToRemote>().isSignal());
  CHECK(first->getRoot<proto::ToRemote>().getSignal() == SIGPIPE);
  auto second = d.receive();
  REQUIRE(second.get() != nullptr);
  CHECK(second->getRoot<proto::ToRemote>().getReply().getRet() == -EPIPE);
  CHECK(!second->getRoot<proto::ToRemote>().getReply().getInterrupted());
  close(p[1]);
}

TEST_CASE("deputy fetchFile returns the identity and exact bytes of a 3 MiB file in chunks",
          "[deputy][fetch]") {
  std::string content = randomBytes(3 * 1024 * 1024 + 123);
  char path[] = "/tmp/deputy-fetch-XXXXXX";
  int fd = mkstemp(path);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
  struct stat st;
  REQUIRE(fstat(fd, &st) == 0);
  ForkedDeputy d;
  for (bool byFd : {false, true}) {
    capnp::MallocMessageBuilder message;
    auto fetch = message.initRoot<proto::ToDeputy>().initFetchFile();
    fetch.setId(byFd ? 10 : 9);
    fetch.setFd(byFd ? fd : -1);
    if (!byFd) {
      fetch.setPath(kj::StringPtr(path).asBytes());
    }
    fetch.setWantData(true);
    d.send(message);
    auto infoMessage = d.receive();
    REQUIRE(infoMessage.get() != nullptr);
    auto info = infoMessage->getRoot<proto::ToRemote>().getFileInfo();
    CHECK(info.getId() == (byFd ? 10u : 9u));
    REQUIRE(info.getErr() == 0);
    CHECK(info.getRef().getDev() == st.st_dev);
    CHECK(info.getRef().getIno() == st.st_ino);
    CHECK(info.getRef().getSize() == content.size());
    CHECK(info.getRef().getMtimeNs() ==
          int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec);
    CHECK(S_ISREG(info.getRef().getMode()));
    CHECK(std::string(info.getRef().getPath().asChars().begin(), info.getRef().getPath().size()) ==
          path);
    std::string got;
    int chunks = 0;
    for (;;) {
      auto m = d.receive();
      REQUIRE(m.get() != nullptr);
      auto data = m->getRoot<proto::ToRemote>().getFileData();
      CHECK(data.getId() == (byFd ? 10u : 9u));
      CHECK(data.getOffset() == got.size());
      CHECK(data.getData().size() <= 1024 * 1024);
      got.append(reinterpret_cast<const char*>(data.getData().begin()), data.getData().size());
      chunks++;
      if (data.getLast()) {
        break;
      }
    }
    CHECK(chunks == 4);
    CHECK(got == content);
  }
  close(fd);
  unlink(path);
}

TEST_CASE("deputy fetchFile of an empty file sends one empty last chunk; missing: ENOENT",
          "[deputy][fetch]") {
  char path[] = "/tmp/deputy-empty-XXXXXX";
  int fd = mkstemp(path);
  REQUIRE(fd >= 0);
  close(fd);
  ForkedDeputy d;
  {
    capnp::MallocMessageBuilder message;
    auto fetch = message.initRoot<proto::ToDeputy>().initFetchFile();
    fetch.setId(1);
    fetch.setFd(-1);
    fetch.setPath(kj::StringPtr(path).asBytes());
    fetch.setWantData(true);
    d.send(message);
    auto info = d.receive();
    REQUIRE(info.get() != nullptr);
    CHECK(info->getRoot<proto::ToRemote>().getFileInfo().getErr() == 0);
    auto chunk = d.receive();
    REQUIRE(chunk.get() != nullptr);
    auto data = chunk->getRoot<proto::ToRemote>().getFileData();
    CHECK(data.getData().size() == 0);
    CHECK(data.getLast());
  }
  {
    capnp::MallocMessageBuilder message;
    auto fetch = message.initRoot<proto::ToDeputy>().initFetchFile();
    fetch.setId(2);
    fetch.setFd(-1);
    fetch.setPath(kj::StringPtr("/nonexistent/x").asBytes());
    fetch.setWantData(true);
    d.send(message);
    auto info = d.receive();
    REQUIRE(info.get() != nullptr);
    CHECK(info->getRoot<proto::ToRemote>().getFileInfo().getErr() == ENOENT);
  }
  unlink(path);
}

TEST_CASE("deputy GuestExit with status 7 exits 7", "[deputy][exit]") {
  ForkedDeputy d;
  sendExit(d, 7, 0);
  int status = d.wait();
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 7);
}

TEST_CASE("deputy GuestExit with signal 15 dies by SIGTERM", "[deputy][exit]") {
  ForkedDeputy d;
  sendExit(d, 0, SIGTERM);
  int status = d.wait();
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGTERM);
  CHECK(!WCOREDUMP(status));
}

TEST_CASE("deputy channel closed without GuestExit: node died, status 112", "[deputy][exit]") {
  ForkedDeputy d;
  pid_t pid = d.pid;
  d.peer = nullptr;
  int status = d.wait();
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 112);
  CHECK(d.stderrText() == "mosrun: node 2 died; job " + std::to_string(pid) + " lost\n");
}

TEST_CASE("deputy failed from the supervisor prints it and exits 125", "[deputy][exit]") {
  ForkedDeputy d;
  pid_t pid = d.pid;
  capnp::MallocMessageBuilder message;
  message.initRoot<proto::ToDeputy>().setFailed("node 2 could not start the job: no vdso");
  d.send(message);
  int status = d.wait();
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 125);
  CHECK(d.stderrText() == "mosrun: node 2 could not start the job: no vdso\n");
  (void)pid;
}

TEST_CASE("deputy stopped stops the home process; SIGCONT is forwarded", "[deputy][signal]") {
  ForkedDeputy d;
  capnp::MallocMessageBuilder message;
  message.initRoot<proto::ToDeputy>().setStopped(SIGTSTP);
  d.send(message);
  int status = 0;
  REQUIRE(waitpid(d.pid, &status, WUNTRACED) == d.pid);
  REQUIRE(WIFSTOPPED(status));
  CHECK(WSTOPSIG(status) == SIGSTOP);
  REQUIRE(kill(d.pid, SIGCONT) == 0);
  auto m = d.receive();
  REQUIRE(m.get() != nullptr);
  REQUIRE(m->getRoot<proto::ToRemote>().isSignal());
  CHECK(m->getRoot<proto::ToRemote>().getSignal() == SIGCONT);
}

TEST_CASE("deputy a stop the guest left by a SIGCONT already forwarded does not stop it",
          "[deputy][signal]") {
  // fg at home came right after the guest stopped: the deputy forwarded SIGCONT before it read
  // the stop, which the supervisor saw with no SIGCONT received yet (stoppedAfterContinues 0).
  ForkedDeputy d;
  REQUIRE(waitBlockedIn(d.pid, __NR_ppoll));
  REQUIRE(kill(d.pid, SIGCONT) == 0);
  auto m = d.receive();
  REQUIRE(m.get() != nullptr);
  REQUIRE(m->getRoot<proto::ToRemote>().isSignal());
  CHECK(m->getRoot<proto::ToRemote>().getSignal() == SIGCONT);
  capnp::MallocMessageBuilder message;
  auto root = message.initRoot<proto::ToDeputy>();
  root.setStopped(SIGTSTP);
  root.setStoppedAfterContinues(0);
  d.send(message);
  // The request after the stale stop is answered: the deputy did not stop.
  uint64_t seq = d.sendSyscall(__NR_getppid, {});
  auto reply = d.receive();
  REQUIRE(reply.get() != nullptr);
  CHECK(reply->getRoot<proto::ToRemote>().getReply().getSeq() == seq);
  int status = 0;
  CHECK(waitpid(d.pid, &status, WUNTRACED | WNOHANG) == 0);
  // A stop seen after that SIGCONT (count 1) stops it again.
  capnp::MallocMessageBuilder again;
  auto second = again.initRoot<proto::ToDeputy>();
  second.setStopped(SIGTSTP);
  second.setStoppedAfterContinues(1);
  d.send(again);
  REQUIRE(waitpid(d.pid, &status, WUNTRACED) == d.pid);
  CHECK(WIFSTOPPED(status));
  REQUIRE(kill(d.pid, SIGCONT) == 0);
}

TEST_CASE("deputy exec at home: failure answers -errno, success replaces the deputy",
          "[deputy][exec]") {
  ForkedDeputy d;
  auto sendExec = [&](const char* path, std::vector<const char*> argv) {
    capnp::MallocMessageBuilder message;
    auto exec = message.initRoot<proto::ToDeputy>().initExec();
    exec.setSeq(77);
    exec.setDirfd(AT_FDCWD);
    exec.setPath(kj::StringPtr(path).asBytes());
    auto list = exec.initArgv(argv.size());
    for (size_t i = 0; i < argv.size(); i++) {
      list.set(i, kj::StringPtr(argv[i]).asBytes());
    }
    exec.initEnvp(0);
    exec.setSigIgnored(0);
    exec.setSigBlocked(0);
    d.send(message);
  };
  sendExec("/nonexistent/program", {"program"});
  auto reply = d.receive();
  REQUIRE(reply.get() != nullptr);
  CHECK(reply->getRoot<proto::ToRemote>().getReply().getSeq() == 77);
  CHECK(reply->getRoot<proto::ToRemote>().getReply().getRet() == -ENOENT);
  // Still a working deputy, its handlers back.
  uint64_t seq = d.sendSyscall(__NR_getppid, {});
  auto again = d.receive();
  REQUIRE(again.get() != nullptr);
  CHECK(again->getRoot<proto::ToRemote>().getReply().getSeq() == seq);

  sendExec("/bin/sh", {"sh", "-c", "exit 42"});
  CHECK(d.receive().get() == nullptr);  // the channel closed with the exec (close-on-exec)
  int status = d.wait();
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 42);
}

// --- mos-deputy itself, against a fake supervisor on a loopback port.

namespace {

// A migration stream file (protocol/migration.md) with a header and no pages.
std::string writeImage(const char* exe) {
  capnp::MallocMessageBuilder message;
  auto header = message.initRoot<proto::ImageHeader>();
  header.setVersion(proto::MIGRATION_VERSION);
  header.setArch("x86_64");
  header.setCommand("the-job");
  header.initExe().setPath(kj::StringPtr(exe).asBytes());
  auto argv = header.initArgv(2);
  argv.set(0, kj::StringPtr("the-job").asBytes());
  argv.set(1, kj::StringPtr("--flag").asBytes());
  char path[] = "/tmp/deputy-image-XXXXXX";
  int fd = mkstemp(path);
  REQUIRE(fd >= 0);
  {
    kj::FdOutputStream out(fd);
    migrate::ImageWriter writer(out);
    writer.writeHeader(message);
    writer.finish();
  }
  close(fd);
  return path;
}

int listenLoopback(uint16_t& port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  struct sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  socklen_t len = sizeof(addr);
  REQUIRE(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  port = ntohs(addr.sin_port);
  REQUIRE(listen(fd, 1) == 0);
  return fd;
}

// A cluster key file of 32 bytes all equal to `fill`, mode 0600; removed by the destructor.
struct KeyFile {
  std::string path;
  explicit KeyFile(uint8_t fill) {
    char tmpl[] = "/tmp/deputy-key-XXXXXX";
    int fd = mkstemp(tmpl);
    REQUIRE(fd >= 0);
    uint8_t bytes[32];
    memset(bytes, fill, sizeof(bytes));
    REQUIRE(write(fd, bytes, sizeof(bytes)) == 32);
    close(fd);
    path = tmpl;
  }
  ~KeyFile() { unlink(path.c_str()); }
  ClusterKey key() const { return ClusterKey::load(path); }
};

pid_t spawnDeputy(uint16_t port, const std::string& image, const std::string& runDir, int stderrFd,
                  const std::string& keyPath) {
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    dup2(stderrFd, STDERR_FILENO);
    std::string portText = std::to_string(port);
    execl(MOS_DEPUTY_PATH, "mos-deputy", "--node", "2", "--address", "127.0.0.1", "--port",
          portText.c_str(), "--home-node", "1", "--run-dir", runDir.c_str(), "--image",
          image.c_str(), "--key", keyPath.c_str(), nullptr);
    _exit(99);
  }
  return pid;
}

// mosd's half of the handshake (cluster_auth.h) on an accepted connection: reads the hello,
// sends a nonce, reads the proof; accepts (one byte) when it verifies with `key`, else closes
// the descriptor. Returns whether it accepted; `claimed` gets the proof's node id.
bool serveHandshake(int conn, const ClusterKey& key, uint32_t& claimed) {
  char hello[8];
  REQUIRE(recv(conn, hello, 8, MSG_WAITALL) == 8);
  CHECK(memcmp(hello, HELLO_JOB, 8) == 0);
  AuthNonce nonce = makeNonce();
  REQUIRE(send(conn, nonce.data(), nonce.size(), MSG_NOSIGNAL) == 32);
  AuthProof proof;
  REQUIRE(recv(conn, proof.data(), proof.size(), MSG_WAITALL) == 36);
  claimed = proofNodeId(proof);
  if (!key.verify(kj::arrayPtr(hello, 8), nonce, proof)) {
    close(conn);
    return false;
  }
  uint8_t accepted = AUTH_ACCEPTED;
  REQUIRE(send(conn, &accepted, 1, MSG_NOSIGNAL) == 1);
  return true;
}

std::string readAll(int fd) {
  std::string out;
  char buffer[512];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) {
    out.append(buffer, n);
  }
  return out;
}

}  // namespace

TEST_CASE("mos-deputy cannot reach its node: message and status 125", "[deputy][startup]") {
  uint16_t port;
  int listener = listenLoopback(port);
  close(listener);  // nothing listens there now
  std::string image = writeImage("/bin/true");
  KeyFile keyFile(7);
  int err[2];
  REQUIRE(pipe2(err, O_CLOEXEC) == 0);
  pid_t pid = spawnDeputy(port, image, "/tmp", err[1], keyFile.path);
  close(err[1]);
  int status;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 125);
  char buffer[512] = {};
  ssize_t n = read(err[0], buffer, sizeof(buffer) - 1);
  REQUIRE(n > 0);
  // The deputy falls back on running the job at home from its image; this one is not of this
  // process, so it cannot, and says so.
  std::string said(buffer);
  CHECK(said.rfind("mosrun: cannot reach node 2 (127.0.0.1:" + std::to_string(port) +
                       "): Connection refused; the job runs on at home\n",
                   0) == 0);
  CHECK(said.find("\nmosrun: the job is lost: the image cannot be resumed at home: ") !=
        std::string::npos);
  CHECK(access(image.c_str(), F_OK) != 0);  // the image is unlinked once of no use
  close(err[0]);
}

TEST_CASE("mos-deputy refused by mosd (another key): message and status 125",
          "[deputy][startup][auth]") {
  uint16_t port;
  int listener = listenLoopback(port);
  std::string image = writeImage("/bin/true");
  KeyFile ours(7), theirs(8);
  int err[2];
  REQUIRE(pipe2(err, O_CLOEXEC) == 0);
  pid_t pid = spawnDeputy(port, image, "/tmp", err[1], ours.path);
  close(err[1]);
  struct pollfd pfd = {listener, POLLIN, 0};
  if (poll(&pfd, 1, 60000) != 1) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    FAIL("the deputy did not connect: " << readAll(err[0]));
  }
  int conn = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  REQUIRE(conn >= 0);
  close(listener);
  uint32_t claimed = 0;
  CHECK_FALSE(serveHandshake(conn, theirs.key(), claimed));  // closes conn
  int status;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 125);
  CHECK(readAll(err[0]).rfind("mosrun: node 2 (127.0.0.1:" + std::to_string(port) +
                                  ") refused node 1 (is " + ours.path +
                                  " the cluster's key?); the job runs on at home\n",
                              0) == 0);
  close(err[0]);
}

TEST_CASE("mos-deputy without a usable key: message and status 125", "[deputy][startup][auth]") {
  uint16_t port;
  int listener = listenLoopback(port);
  std::string image = writeImage("/bin/true");
  int err[2];
  REQUIRE(pipe2(err, O_CLOEXEC) == 0);
  pid_t pid = spawnDeputy(port, image, "/tmp", err[1], "/nonexistent/cluster.key");
  close(err[1]);
  int status;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 125);
  CHECK(readAll(err[0]).rfind("mosrun: cluster key /nonexistent/cluster.key: missing", 0) == 0);
  CHECK(access(image.c_str(), F_OK) != 0);  // the image was unlinked all the same
  close(err[0]);
  close(listener);
}

TEST_CASE("mos-deputy starts the job: HELLO, JobStart, record, syscalls, exit status",
          "[deputy][startup]") {
  uint16_t port;
  int listener = listenLoopback(port);
  std::string image = writeImage("/usr/bin/the-job");
  char runDir[] = "/tmp/deputy-run-XXXXXX";
  REQUIRE(mkdtemp(runDir) != nullptr);
  KeyFile keyFile(7);
  int err[2];
  REQUIRE(pipe2(err, O_CLOEXEC) == 0);
  pid_t pid = spawnDeputy(port, image, runDir, err[1], keyFile.path);
  close(err[1]);
  int conn = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  REQUIRE(conn >= 0);
  close(listener);
  uint32_t claimed = 0;
  REQUIRE(serveHandshake(conn, keyFile.key(), claimed));
  CHECK(claimed == 1);  // --home-node
  Channel channel{kj::AutoCloseFd(conn)};
  auto startMessage = channel.receive();
  KJ_IF_MAYBE (m, startMessage) {
    auto start = (*m)->getRoot<proto::JobStart>();
    CHECK(start.getHomeNode() == 1);
    CHECK(start.getIds().getPid() == pid);
    CHECK(start.getIds().getTid() == pid);
    CHECK(start.getIds().getUid() == getuid());
    CHECK(start.getCommand() == "the-job --flag");
    CHECK(start.getImageStreamed());
  } else {
    FAIL("no JobStart");
  }
  startMessage = nullptr;
  {
    // The stream's header follows at once; its frames when asked for.
    ChannelInputStream in(channel);
    migrate::ImageReader reader(in);
    CHECK(std::string(reader.header().getExe().getPath().asChars().begin(),
                      reader.header().getExe().getPath().size()) == "/usr/bin/the-job");
    capnp::MallocMessageBuilder ask;
    ask.initRoot<proto::ToDeputy>().setSendImage();
    channel.send(ask);
    CHECK(reader.nextRun() == nullptr);  // the end frame, its digest checked
  }
  {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::ToDeputy>().setStarted(4242);
    channel.send(message);
  }
  // A forwarded call: getpid at home is the job's pid; readlink of /proc/self/exe is the job's.
  {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<proto::ToDeputy>().initSyscall();
    request.setSeq(1);
    request.setNr(__NR_readlink);
    auto args = request.initArgs(6);
    args.set(2, 100);
    auto in = request.initIn(1);
    in[0].setArg(0);
    in[0].setData(kj::StringPtr("/proc/self/exe").asBytes());
    auto out = request.initOut(1);
    out[0].setArg(1);
    out[0].setSize(100);
    channel.send(message);
  }
  KJ_IF_MAYBE (m, channel.receive()) {
    auto reply = (*m)->getRoot<proto::ToRemote>().getReply();
    CHECK(reply.getRet() == 16);
    CHECK(std::string(reply.getOut()[0].asChars().begin(), reply.getOut()[0].size()) ==
          "/usr/bin/the-job");
  } else {
    FAIL("no reply");
  }
  // The job record says where the job runs.
  auto records = readJobRecords(runDir, "jobs");
  REQUIRE(records.size() == 1);
  CHECK(records[0].homePid == pid);
  CHECK(records[0].state == JobState::REMOTE);
  CHECK(records[0].remotePid == 4242);
  CHECK(records[0].node == 2);
  CHECK(records[0].syscalls == 1);
  CHECK(records[0].command == "the-job --flag");
  {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::ToDeputy>().initExit().setStatus(3);
    channel.send(message);
  }
  int status;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 3);
  CHECK(readJobRecords(runDir, "jobs").empty());
  close(err[0]);
  std::string cleanup = std::string("rm -rf ") + runDir;
  REQUIRE(system(cleanup.c_str()) == 0);
}

// --- The race window itself, hit deterministically: a tracer single-steps a deputy-to-be into
// the window between the pending check and the syscall instruction, then delivers the signal
// there. Without the handler's rip rewrite the read would block for ever.

extern "C" {
__attribute__((visibility("hidden"))) extern char deputy_syscall_check[];
__attribute__((visibility("hidden"))) extern char deputy_syscall_insn[];
}

#include <sys/ptrace.h>
#include <sys/user.h>

namespace {

// Runs a child that reads an empty pipe through interruptibleSyscall, stops it at the `nth`
// instruction inside [deputy_syscall_check, deputy_syscall_insn], injects SIGUSR1 there and
// returns the child's exit status (0: the call returned -EINTR), or -1 if it hung.
int signalInsideWindow(int nth) {
  int p[2];
  REQUIRE(pipe2(p, 0) == 0);
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    installSignalHandlers();
    blockAllSignals();
    ptrace(PTRACE_TRACEME, 0, nullptr, nullptr);
    raise(SIGSTOP);
    uint64_t buffer = 0;
    uint64_t args[6] = {uint64_t(p[0]), reinterpret_cast<uint64_t>(&buffer), 8, 0, 0, 0};
    long r = interruptibleSyscall(__NR_read, args);
    _exit(r == -EINTR && takePendingSignals() == std::vector<int>{SIGUSR1} ? 0 : 1);
  }
  int status;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSTOPPED(status));
  auto begin = reinterpret_cast<uint64_t>(deputy_syscall_check);
  auto end = reinterpret_cast<uint64_t>(deputy_syscall_insn);
  int seen = 0;
  uint64_t rip = 0;
  for (int step = 0; step < 200000; step++) {
    REQUIRE(ptrace(PTRACE_SINGLESTEP, pid, nullptr, nullptr) == 0);
    REQUIRE(waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSTOPPED(status));
    struct user_regs_struct regs;
    REQUIRE(ptrace(PTRACE_GETREGS, pid, nullptr, &regs) == 0);
    rip = regs.rip;
    if (rip >= begin && rip <= end && seen++ == nth) {
      break;
    }
  }
  REQUIRE(rip >= begin);
  REQUIRE(rip <= end);
  REQUIRE(ptrace(PTRACE_DETACH, pid, nullptr, reinterpret_cast<void*>(SIGUSR1)) == 0);
  int result = -1;
  // 30 s: a child that is still blocked then hangs for good (the race is not closed).
  for (int i = 0; i < 3000; i++) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      result = WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
      break;
    }
    usleep(10 * 1000);
  }
  if (result == -1) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  close(p[0]);
  close(p[1]);
  return result;
}

}  // namespace

TEST_CASE("deputy a signal between the pending check and the syscall instruction cancels the call",
          "[deputy][signal]") {
  // The window holds three instructions: the check, the branch, and the syscall itself.
  for (int nth = 0; nth < 3; nth++) {
    INFO("instruction " << nth << " of the window");
    CHECK(signalInsideWindow(nth) == 0);
  }
}

TEST_CASE("deputy fork: the parent replies the child's pid, the child opens its own channel",
          "[deputy][fork]") {
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(listener >= 0);
  kj::AutoCloseFd listenerOwner(listener);
  sockaddr_in address = {};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  REQUIRE(listen(listener, 4) == 0);
  socklen_t length = sizeof(address);
  REQUIRE(getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) == 0);

  ForkedDeputy d;
  std::string token(32, 't');
  {
    capnp::MallocMessageBuilder message;
    auto fork = message.initRoot<proto::ToDeputy>().initFork();
    fork.setSeq(5);
    fork.setPort(ntohs(address.sin_port));
    fork.setToken(kj::arrayPtr(reinterpret_cast<const kj::byte*>(token.data()), token.size()));
    d.send(message);
  }
  auto reply = d.receive();
  REQUIRE(reply.get() != nullptr);
  auto r = reply->getRoot<proto::ToRemote>();
  REQUIRE(r.isReply());
  CHECK(r.getReply().getSeq() == 5);
  pid_t child = static_cast<pid_t>(r.getReply().getRet());
  REQUIRE(child > 0);

  struct pollfd pfd = {listener, POLLIN, 0};
  REQUIRE(poll(&pfd, 1, 30000) == 1);
  int fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  REQUIRE(fd >= 0);
  char hello[44];
  REQUIRE(recv(fd, hello, sizeof(hello), MSG_WAITALL) == sizeof(hello));
  CHECK(memcmp(hello, "UMOSCHLD", 8) == 0);
  CHECK(std::string(hello + 8, 32) == token);
  int32_t pid;
  memcpy(&pid, hello + 40, 4);
  CHECK(pid == child);

  // The child serves its own channel: its guest exits 9, so it exits 9, and the parent's SIGCHLD
  // reaches its supervisor with the child's pid and status.
  Channel childChannel{kj::AutoCloseFd(fd)};
  {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::ToDeputy>().initExit().setStatus(9);
    childChannel.send(message);
  }
  auto signal = d.receive();
  REQUIRE(signal.get() != nullptr);
  auto s = signal->getRoot<proto::ToRemote>();
  REQUIRE(s.isSignal());
  CHECK(s.getSignal() == SIGCHLD);
  CHECK(s.getSignalPid() == child);
  CHECK(s.getSignalStatus() == 9);
  sendExit(d, 0, 0);
  int status = d.wait();
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("deputy thread: a ForkRequest with thread starts a deputy thread with its own channel",
          "[deputy][thread]") {
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(listener >= 0);
  kj::AutoCloseFd listenerOwner(listener);
  sockaddr_in address = {};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  REQUIRE(listen(listener, 4) == 0);
  socklen_t length = sizeof(address);
  REQUIRE(getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) == 0);
  // A pipe the deputy inherits: its thread blocks reading it.
  int pipeFds[2];
  REQUIRE(pipe(pipeFds) == 0);

  ForkedDeputy d;
  std::string token(32, 'h');
  {
    capnp::MallocMessageBuilder message;
    auto fork = message.initRoot<proto::ToDeputy>().initFork();
    fork.setSeq(6);
    fork.setPort(ntohs(address.sin_port));
    fork.setToken(kj::arrayPtr(reinterpret_cast<const kj::byte*>(token.data()), token.size()));
    fork.setThread(true);
    d.send(message);
  }
  auto reply = d.receive();
  REQUIRE(reply.get() != nullptr);
  auto r = reply->getRoot<proto::ToRemote>();
  REQUIRE(r.isReply());
  CHECK(r.getReply().getSeq() == 6);
  pid_t tid = static_cast<pid_t>(r.getReply().getRet());
  REQUIRE(tid > 0);
  CHECK(tid != d.pid);
  std::string task = "/proc/" + std::to_string(d.pid) + "/task/" + std::to_string(tid);
  CHECK(access(task.c_str(), F_OK) == 0);  // a thread of the deputy process, not a child

  struct pollfd pfd = {listener, POLLIN, 0};
  REQUIRE(poll(&pfd, 1, 30000) == 1);
  int fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  REQUIRE(fd >= 0);
  char hello[44];
  REQUIRE(recv(fd, hello, sizeof(hello), MSG_WAITALL) == sizeof(hello));
  CHECK(memcmp(hello, "UMOSCHLD", 8) == 0);
  CHECK(std::string(hello + 8, 32) == token);
  int32_t id;
  memcpy(&id, hello + 40, 4);
  CHECK(id == tid);

  // The thread's read blocks in that thread; the leader still serves its own channel.
  Channel threadChannel{kj::AutoCloseFd(fd)};
  {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<proto::ToDeputy>().initSyscall();
    request.setSeq(7);
    request.setNr(__NR_read);
    auto args = request.initArgs(6);
    args.set(0, pipeFds[0]);
    args.set(2, 4);
    auto out = request.initOut(1);
    out[0].setArg(1);
    out[0].setSize(4);
    threadChannel.send(message);
  }
  REQUIRE(waitBlockedIn(tid, __NR_read, pipeFds[0]));
  d.sendSyscall(__NR_getppid, {});
  auto leader = d.receive();
  REQUIRE(leader.get() != nullptr);
  CHECK(leader->getRoot<proto::ToRemote>().getReply().getRet() == getpid());
  REQUIRE(write(pipeFds[1], "abcd", 4) == 4);
  {
    struct pollfd tpfd = {threadChannel.fd(), POLLIN, 0};
    REQUIRE((threadChannel.hasBuffered() || poll(&tpfd, 1, 30000) == 1));
    KJ_IF_MAYBE (m, threadChannel.receive()) {
      auto read = (*m)->getRoot<proto::ToRemote>().getReply();
      CHECK(read.getSeq() == 7);
      CHECK(read.getRet() == 4);
      REQUIRE(read.getOut().size() == 1);
      CHECK(std::string(read.getOut()[0].asChars().begin(), 4) == "abcd");
    } else {
      FAIL("the deputy thread closed its channel");
    }
  }
  // Closing its channel ends the thread (its guest thread ended); the process goes on.
  threadChannel.replaceFd(kj::AutoCloseFd());
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  while (access(task.c_str(), F_OK) == 0) {
    clock_gettime(CLOCK_MONOTONIC, &now);
    REQUIRE(now.tv_sec - start.tv_sec < 30);
    usleep(2000);
  }
  d.sendSyscall(__NR_getppid, {});
  auto after = d.receive();
  REQUIRE(after.get() != nullptr);
  CHECK(after->getRoot<proto::ToRemote>().getReply().getRet() == getpid());
  close(pipeFds[0]);
  close(pipeFds[1]);
  sendExit(d, 0, 0);
  int status = d.wait();
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

// A tgkill of the main deputy thread travels with its siginfo (SI_TKILL, the sender), which the
// guest queues on its own main thread; only other deputy threads' tgkills are marked
// signalThread (deputy_loop's thread cases).
TEST_CASE("deputy a tgkill of its main thread carries its siginfo, a kill is process-wide",
          "[deputy][signal][thread]") {
  ForkedDeputy d;
  REQUIRE(waitBlockedIn(d.pid, __NR_ppoll));
  REQUIRE(syscall(SYS_tgkill, d.pid, d.pid, SIGUSR1) == 0);
  auto m = d.receive();
  REQUIRE(m.get() != nullptr);
  auto first = m->getRoot<proto::ToRemote>();
  REQUIRE(first.isSignal());
  CHECK(first.getSignal() == SIGUSR1);
  CHECK(!first.getSignalThread());
  siginfo_t info = {};
  REQUIRE(first.getSignalInfo().size() == sizeof(info));
  memcpy(&info, first.getSignalInfo().begin(), sizeof(info));
  CHECK(info.si_code == SI_TKILL);
  CHECK(info.si_pid == getpid());
  REQUIRE(waitBlockedIn(d.pid, __NR_ppoll));
  REQUIRE(kill(d.pid, SIGUSR2) == 0);
  auto n = d.receive();
  REQUIRE(n.get() != nullptr);
  auto second = n->getRoot<proto::ToRemote>();
  REQUIRE(second.isSignal());
  CHECK(second.getSignal() == SIGUSR2);
  CHECK(!second.getSignalThread());
}
