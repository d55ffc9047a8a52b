// migrate: move a job process's user part, or checkpoint it (docs/migrate.1.md).
//
//   migrate PID NODE
//   migrate PID checkpoint FILE
//
// NODE: moves the user part of PID, a job process running at home, to node NODE while it runs:
// captures it (libmigrate's migration stream), turns PID into its own deputy (execve injected
// into it, design decision 1) and waits until the deputy reports the guest running on NODE. A job
// that runs on another node already is first brought home (below), then sent to NODE.
// home: brings the user part of PID (a job running on a remote node; PID is its deputy) back
// home, where it runs natively again in the same process: asks the deputy through its control
// socket (RUN_DIR/control/PID, deputy/control.h) and waits until the job runs at home.
// checkpoint: writes the migration image of PID to FILE and lets PID run on; `mosrun -R FILE`
// resumes it.
//
// Exit status: 0 done; 1 refused or failed (the process keeps running where it was, FILE is not
// created); 2 bad arguments.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <kj/debug.h>

#include <arpa/inet.h>
#include <capnp/serialize.h>
#include <netinet/in.h>
#include <set>

#include "channel.h"
#include "checkpoint.h"
#include "job.capnp.h"
#include "proc_maps.h"
#include "startup.h"
#include "deputy_control.h"
#include "cluster_auth.h"
#include "config.h"
#include "job_registry.h"
#include "map_file.h"
#include "node_client.h"
#include "programs.h"

namespace {

constexpr int EXIT_REFUSED = 1;
constexpr int EXIT_USAGE = 2;
constexpr int NODE_CHECK_TIMEOUT_MS = 3000;
constexpr auto START_TIMEOUT = std::chrono::seconds(60);

[[noreturn]] void fail(const std::string& message) {
  fmt::print(stderr, "migrate: {}\n", message);
  exit(EXIT_REFUSED);
}

bool isDeputy(pid_t pid) { return mos::migrate::isDeputyProcess(pid); }

// True when process `pid` is gone or a zombie (it ended and its parent has not reaped it yet: not
// a deputy any more, yet kill(2) still finds it), from /proc/PID/stat's state letter (proc(5)).
bool processEnded(pid_t pid) {
  std::ifstream stat(fmt::format("/proc/{}/stat", pid));
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  size_t paren = text.rfind(')');
  if (paren == std::string::npos || paren + 2 >= text.size()) {
    return !(kill(pid, 0) == 0 || errno == EPERM);
  }
  char state = text[paren + 2];
  return state == 'Z' || state == 'X';
}

// Waits until the deputy of job `pid` reports its guest running on `node` (its job record), or the
// job ends. Returns an empty string, or why not.
std::string waitForGuest(pid_t pid, const std::string& runDir, uint32_t node) {
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  kj::AutoCloseFd owner(pidfd);
  auto deadline = std::chrono::steady_clock::now() + START_TIMEOUT;
  while (std::chrono::steady_clock::now() < deadline) {
    mos::JobSnapshot job{};
    mos::StatsSnapshot stats;
    bool known = mos::readJobRecord(runDir, "jobs", pid, job, stats);
    if (known && job.state == mos::JobState::REMOTE && job.node == node) {
      return "";
    }
    if (known && job.state == mos::JobState::HOME && job.stay == mos::START_FAILED_REASON) {
      // The deputy fell back on the image (deputy.h, runOnAtHome); not an exec at home, which
      // leaves no such reason.
      return "the node could not start it, so it runs on at home (its stderr says why)";
    }
    if (pidfd >= 0) {
      pollfd p{pidfd, POLLIN, 0};
      if (poll(&p, 1, 10) == 1) {
        return "the job ended before its guest ran on the node (see its stderr)";
      }
    } else if (processEnded(pid)) {
      return "the job ended before its guest ran on the node (see its stderr)";
    } else {
      usleep(10000);
    }
  }
  return "the guest did not report running within 60 s";
}

// One request line to the control socket of the deputy of `pid` (deputy/control.h), then the
// answer line (libmigrate askDeputy); exits (fail) when the deputy cannot be reached or does not
// answer within `timeoutSeconds`. `seconds` receives the time from the request to the answer.
std::string askDeputy(pid_t pid, const std::string& line, int timeoutSeconds, double& seconds) {
  std::string runDir;
  try {
    runDir = mos::configFromEnvironment().runDir;
  } catch (kj::Exception& e) {
    fail(e.getDescription().cStr());
  }
  std::chrono::duration<double> elapsed{};
  std::string answer;
  try {
    answer =
        mos::migrate::askDeputy(runDir, pid, line, std::chrono::seconds(timeoutSeconds), elapsed);
  } catch (kj::Exception& e) {
    fail(e.getDescription().cStr());
  }
  seconds = elapsed.count();
  return answer;
}

// migrate PID home: the deputy's answer, or the migration agent's once the job runs at home.
int moveHome(pid_t pid, int timeoutSeconds) {
  if (processEnded(pid)) {
    fail(fmt::format("no process {}", pid));
  }
  if (!isDeputy(pid)) {
    fmt::print("migrate: pid {} already runs at home\n", pid);
    return 0;
  }
  double seconds = 0;
  std::string answer = askDeputy(pid, "home", timeoutSeconds, seconds);
  if (answer.rfind("ok", 0) == 0) {
    unsigned long long pages = 0, injected = 0;
    sscanf(answer.c_str(), "ok %llu %llu", &pages, &injected);
    fmt::print(
        "migrate: pid {} runs at home again: {} pages ({:.1f} MiB), {} injected syscalls, "
        "{:.3f} s\n",
        pid, pages, pages * 4096.0 / (1 << 20), injected, seconds);
    return 0;
  }
  if (answer.rfind("refused: ", 0) == 0) {
    fail(
        fmt::format("pid {} cannot move home: {}; it runs on where it was", pid, answer.substr(9)));
  }
  if (answer.rfind("failed: ", 0) == 0) {
    fail(fmt::format("moving pid {} home failed: {}", pid, answer.substr(8)));
  }
  if (answer.empty()) {
    if (processEnded(pid)) {
      fail(fmt::format("pid {} ended during the move", pid));
    }
    if (!isDeputy(pid)) {
      fmt::print("migrate: pid {} runs at home again ({:.3f} s)\n", pid, seconds);
      return 0;
    }
    fail(fmt::format("the deputy of pid {} closed the connection without an answer", pid));
  }
  fail(fmt::format("unexpected answer from the deputy of pid {}: {}", pid, answer));
}

int checkpoint(pid_t pid, const std::string& file) {
  if (processEnded(pid)) {
    fail(fmt::format("no process {}", pid));
  }
  if (isDeputy(pid)) {
    // Its user part runs on a node: the deputy has the image streamed home and writes it, with
    // the job's descriptors and cwd (its own); the guest runs on (deputy/control.h).
    std::string path = std::filesystem::absolute(file).string();
    double seconds = 0;
    std::string answer = askDeputy(pid, "checkpoint " + path, 600, seconds);
    unsigned long long pages = 0, bytes = 0;
    if (sscanf(answer.c_str(), "ok checkpoint %llu %llu", &pages, &bytes) == 2) {
      fmt::print(
          "migrate: pid {} (running on a remote node) checkpointed to {}: {} pages ({:.1f} MiB), "
          "{:.3f} s\n",
          pid, file, pages, pages * 4096.0 / (1 << 20), seconds);
      return 0;
    }
    if (answer.rfind("refused: ", 0) == 0) {
      fail(fmt::format("cannot checkpoint pid {}: {}; it runs on where it was", pid,
                       answer.substr(9)));
    }
    fail(fmt::format("unexpected answer from the deputy of pid {}: {}", pid, answer));
  }
  mos::migrate::CaptureStats stats;
  try {
    stats = mos::migrate::writeCheckpoint(pid, file);
  } catch (kj::Exception& e) {
    fail(fmt::format("cannot checkpoint pid {}: {}", pid, e.getDescription().cStr()));
  }
  fmt::print(
      "migrate: pid {} checkpointed to {}: {} pages ({:.1f} MiB) in {} runs, {} mappings, "
      "{} injected syscalls, stopped {:.1f} ms\n",
      pid, file, stats.pages, stats.pages * 4096.0 / (1 << 20), stats.runs, stats.mappings,
      stats.injectedSyscalls, stats.frozen.count() / 1000.0);
  return 0;
}

// Reads `key`'s first number of a "Key:\tA\tB..." line of /proc/PID/status (Uid:, Gid:) and,
// with `second`, the one after it (the effective id).
uint32_t statusId(const std::string& status, const char* key, bool second) {
  size_t at = status.find(key);
  KJ_REQUIRE(at != std::string::npos, "no such line in /proc/PID/status", key);
  char* end = nullptr;
  unsigned long v = strtoul(status.c_str() + at + strlen(key), &end, 10);
  if (second) {
    v = strtoul(end, nullptr, 10);
  }
  return static_cast<uint32_t>(v);
}

// The job's connection to the node during `migrate PID NODE` (docs/design.md, "Speed"): a socket
// made inside P by injection (libmigrate injectSocket) and shared with us, through which we speak
// the deputy's half of a job start while P is still itself: hello, JobStart, the migration
// stream straight from the capture (no image file), the node's file fetches (of the files P
// maps, nothing else), until the node reports the guest running (`started`). Then P execs its
// deputy, which takes the connection over (--channel-fd) with nothing read past `started`.
class StreamedMove final : public kj::OutputStream {
 public:
  // The stream's bytes, into the connection (open() must have made it).
  void write(const void* buffer, size_t size) override {
    kj::FdOutputStream(channel_->fd()).write(buffer, size);
  }

  // Makes the socket in `pid` (seized and stopped), connects it to the node within 5 s, proves
  // the cluster key and sends JobStart with P's ids. `header` is the image's, complete: it is
  // copied (the deputy's argv and its header file). Throws kj::Exception (FAILED) saying why.
  void open(pid_t pid, mos::proto::ImageHeader::Reader header, mos::Ipv4 address, uint16_t port,
            const mos::ClusterCredentials& credentials, uint32_t homeNode) {
    header_.setRoot(header);
    for (auto m : header.getMappings()) {
      if (m.getKind() == mos::proto::Mapping::Kind::FILE) {
        auto path = m.getFile().getPath();
        files_.emplace(reinterpret_cast<const char*>(path.begin()), path.size());
      }
    }
    auto made = mos::migrate::injectSocket(pid, AF_INET, SOCK_STREAM);
    remoteFd_ = made.remoteFd;
    int fd = made.local.get();
    channel_ = kj::heap<mos::Channel>(kj::mv(made.local));
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(address.value);
    // O_NONBLOCK is the open file's, shared with P: set for the connect's timeout, then cleared.
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) < 0) {
      KJ_REQUIRE(errno == EINPROGRESS, kj::str("cannot connect to the node: ", strerror(errno)));
      pollfd p{fd, POLLOUT, 0};
      int n;
      do {
        n = poll(&p, 1, 5000);
      } while (n < 0 && errno == EINTR);
      KJ_REQUIRE(n == 1, "cannot connect to the node within 5 s");
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      KJ_REQUIRE(err == 0, kj::str("cannot connect to the node: ", strerror(err)));
    }
    fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    mos::tuneJobSocket(fd);
    int err = mos::deputy::sendHello(fd, credentials, 5000);
    KJ_REQUIRE(err == 0, kj::str("the node did not accept this node's hello: ", strerror(-err)));
    // A node that stops answering must not hold the job frozen: every read waits 30 s at most.
    struct timeval timeout = {30, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    capnp::MallocMessageBuilder start;
    mos::deputy::fillJobStart(homeNode, mos::deputy::imageCommand(header), start);
    std::string status = mos::migrate::readProcFile("/proc/" + std::to_string(pid) + "/status");
    auto ids = start.getRoot<mos::proto::JobStart>().getIds();
    ids.setPid(pid);
    ids.setTid(pid);
    ids.setUid(statusId(status, "Uid:", false));
    ids.setEuid(statusId(status, "Uid:", true));
    ids.setGid(statusId(status, "Gid:", false));
    ids.setEgid(statusId(status, "Gid:", true));
    channel_->send(start);
  }

  // Its number inside P.
  int remoteFd() const { return remoteFd_; }
  mos::proto::ImageHeader::Reader header() {
    return header_.getRoot<mos::proto::ImageHeader>().asReader();
  }
  // The job's argv, for the deputy's (ps shows the job at home).
  std::vector<std::string> argv() {
    std::vector<std::string> out;
    for (auto arg : header().getArgv()) {
      out.emplace_back(reinterpret_cast<const char*>(arg.begin()), arg.size());
    }
    return out;
  }

  // After the header: serves the node's fetches until it asks for the pages (sendImage).
  // Throws kj::Exception (FAILED) with the node's reason when it fails the start.
  void awaitSendImage() {
    for (;;) {
      auto message = receive();
      auto root = message->getRoot<mos::proto::ToDeputy>().asReader();
      switch (root.which()) {
        case mos::proto::ToDeputy::SEND_IMAGE: return;
        case mos::proto::ToDeputy::FETCH_FILE: serveFetch(root.getFetchFile()); break;
        case mos::proto::ToDeputy::FAILED: KJ_FAIL_REQUIRE(kj::str(root.getFailed()));
        default:
          KJ_FAIL_REQUIRE(kj::str("unexpected message from the node during the start (union tag ",
                                  static_cast<int>(root.which()), ")"));
      }
    }
  }

  // After the end frame: the guest's pid on the node once it runs. Throws kj::Exception (FAILED)
  // with the node's reason when it fails the start.
  pid_t awaitStarted() {
    auto message = receive();
    auto root = message->getRoot<mos::proto::ToDeputy>().asReader();
    if (root.isStarted()) {
      return root.getStarted();
    }
    KJ_REQUIRE(!root.isFailed(), kj::str(root.getFailed()));
    KJ_FAIL_REQUIRE(kj::str("unexpected message from the node instead of `started` (union tag ",
                            static_cast<int>(root.which()), ")"));
  }

  // MAGIC and the header, for the deputy (mos-deputy --image: the header alone), mode 0600.
  void writeHeaderFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    KJ_REQUIRE(fd >= 0, kj::str("cannot create ", path.c_str(), ": ", strerror(errno)));
    kj::FdOutputStream out{kj::AutoCloseFd(fd)};
    out.write(mos::migrate::IMAGE_MAGIC, sizeof(mos::migrate::IMAGE_MAGIC));
    capnp::writeMessage(out, header_);
  }

  // The connection becomes the deputy's: reads no longer time out.
  void handOver() {
    struct timeval none = {0, 0};
    setsockopt(channel_->fd(), SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
  }

  // The move does not happen: P's socket is closed (injected close) and ours, so the node ends
  // the start (a guest that already runs is killed when its channel closes).
  void abandon(pid_t pid) {
    if (remoteFd_ >= 0) {
      mos::migrate::closeInjectedFd(pid, remoteFd_);
      remoteFd_ = -1;
    }
    channel_ = nullptr;
  }

 private:
  // One message, read exactly: nothing past it is taken from the socket (after `started`, the
  // guest's first requests are the deputy's to read).
  kj::Own<capnp::MallocMessageBuilder> receive() {
    kj::FdInputStream in(channel_->fd());
    capnp::InputStreamMessageReader reader(in);
    auto copy = kj::heap<capnp::MallocMessageBuilder>();
    copy->setRoot(reader.getRoot<mos::proto::ToDeputy>());
    return copy;
  }

  void serveFetch(mos::proto::FetchFile::Reader request) {
    std::string path(reinterpret_cast<const char*>(request.getPath().begin()),
                     request.getPath().size());
    int err = 0;
    int fd = -1;
    kj::AutoCloseFd owner;
    if (request.getFd() >= 0 || files_.count(path) == 0) {
      err = EACCES;  // only the files P maps: the node asks for nothing else at a start
    } else {
      fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
      if (fd < 0) {
        err = errno;
      } else {
        owner = kj::AutoCloseFd(fd);
      }
    }
    mos::deputy::sendFetchedFile(*channel_, request.getId(), fd, path, err, request.getWantData());
  }

  kj::Own<mos::Channel> channel_;
  int remoteFd_ = -1;
  capnp::MallocMessageBuilder header_;
  std::set<std::string> files_;
};

int moveToNode(pid_t pid, const std::string& target, int timeoutSeconds) {
  uint32_t node = 0;
  try {
    size_t used = 0;
    unsigned long v = std::stoul(target, &used);
    if (used != target.size() || v == 0 || v > UINT32_MAX) {
      throw std::invalid_argument(target);
    }
    node = static_cast<uint32_t>(v);
  } catch (std::exception&) {
    fmt::print(stderr, "migrate: TARGET is a node id, `home` or `checkpoint`, not `{}`\n", target);
    exit(EXIT_USAGE);
  }
  if (processEnded(pid)) {
    fail(fmt::format("no process {}", pid));
  }
  mos::NodeConfig config;
  mos::MapFile map;
  try {
    config = mos::configFromEnvironment();
    map = mos::MapFile::fromPath(config.mapPath);
    mos::resolveNodeId(config, map);
  } catch (kj::Exception& e) {
    fail(e.getDescription().cStr());
  }
  if (isDeputy(pid) && node == config.nodeId) {
    return moveHome(pid, timeoutSeconds);
  }
  if (node == config.nodeId) {
    fmt::print("migrate: pid {} already runs at home (node {})\n", pid, node);
    return 0;
  }
  mos::Ipv4 address;
  KJ_IF_MAYBE (a, map.lookup(node)) {
    address = *a;
  } else {
    fail(fmt::format("node {} is not in the cluster map {}", node, config.mapPath));
  }
  if (isDeputy(pid)) {
    // Away already: remote -> remote. The deputy takes the stream from the node the job runs
    // on and starts it on NODE (its channel reconnects there); the job never runs at home and
    // the old node keeps nothing (deputy/deputy.h, relayMove).
    mos::JobSnapshot job;
    mos::StatsSnapshot stats;
    if (mos::readJobRecord(config.runDir, "jobs", pid, job, stats) &&
        job.state == mos::JobState::REMOTE && job.node == node) {
      fmt::print("migrate: pid {} already runs on node {}\n", pid, node);
      return 0;
    }
    double seconds = 0;
    std::string answer =
        askDeputy(pid, fmt::format("node {} {} {}", node, address.toString(), config.port),
                  timeoutSeconds, seconds);
    unsigned long long remotePid = 0, bytes = 0;
    unsigned target = 0;
    if (sscanf(answer.c_str(), "ok node %u %llu %llu", &target, &remotePid, &bytes) == 3) {
      fmt::print("migrate: pid {} runs on node {} (from node {}): {:.1f} MiB moved, {:.3f} s\n",
                 pid, target, job.node, bytes / double(1 << 20), seconds);
      return 0;
    }
    if (answer.rfind("refused: ", 0) == 0) {
      fail(fmt::format("pid {} cannot move to node {}: {}; it runs on where it was", pid, node,
                       answer.substr(9)));
    }
    if (answer.rfind("failed: ", 0) == 0) {
      fail(fmt::format("moving pid {} to node {} failed: {}", pid, node, answer.substr(8)));
    }
    if (answer.empty() && processEnded(pid)) {
      fail(fmt::format("pid {} ended during the move", pid));
    }
    fail(fmt::format("unexpected answer from the deputy of pid {}: {}", pid, answer));
  }
  if (mos::startedLocked(pid)) {
    fail(fmt::format("pid {} cannot move to node {}: it is locked by mosrun -L; it stays at home",
                     pid, node));
  }
  using Clock = std::chrono::steady_clock;
  auto began = Clock::now();
  auto msSince = [](Clock::time_point from) {
    return std::chrono::duration<double, std::milli>(Clock::now() - from).count();
  };
  double checkedMs = 0, seizedMs = 0, capturedMs = 0, startedMs = 0, execMs = 0;
  std::string keyPath = std::filesystem::absolute(config.keyPath).string();
  try {
    mos::ClusterCredentials credentials{config.nodeId, mos::ClusterKey::load(keyPath)};
    mos::queryStatus(credentials, address, config.port, NODE_CHECK_TIMEOUT_MS);
  } catch (kj::Exception& e) {
    fail(fmt::format("node {} ({}:{}) is down or unreachable, pid {} stays at home: {}", node,
                     address.toString(), config.port, pid, e.getDescription().cStr()));
  }
  checkedMs = msSince(began);
  mos::migrate::DeputyExec exec;
  try {
    exec.path = mos::programPath("mos-deputy");
  } catch (kj::Exception& e) {
    fail(e.getDescription().cStr());
  }
  mos::ClusterCredentials credentials{config.nodeId, mos::ClusterKey::load(keyPath)};
  std::string headerPath = fmt::format("{}/images/{}.img", config.runDir, pid);
  std::error_code ec;
  std::filesystem::create_directories(config.runDir + "/images", ec);
  if (ec) {
    fail(fmt::format("cannot create {}/images: {}", config.runDir, ec.message()));
  }
  // A node that closes the connection must not kill us with SIGPIPE: P would keep the socket.
  signal(SIGPIPE, SIG_IGN);

  mos::migrate::CaptureStats stats;
  std::vector<int> resend;
  StreamedMove move;
  bool threadsEnded = false;
  try {
    mos::migrate::SeizedProcess process(pid);
    seizedMs = msSince(began);
    // Counted once every task is stopped (none can start another now). Each thread but the
    // leader is ended before the deputy's exec (endOtherThreads): its tid is then free for the
    // deputy thread that will serve it, which the deputy makes at that tid (ns_last_pid: root).
    int threads = mos::migrate::countThreads(pid);
    if (threads > 1) {
      if (std::string why = mos::migrate::threadIdsRefusal(pid, threads); !why.empty()) {
        fail(fmt::format("cannot move pid {}, it stays at home: {}", pid, why));
      }
    }
    if (threads > 1 && access(exec.path.c_str(), X_OK) != 0) {
      fail(fmt::format("cannot move pid {}, it stays at home: {}: {}", pid, exec.path,
                       strerror(errno)));
    }
    // The stream goes straight into the job's connection, which P itself will own as its deputy
    // (docs/design.md, "Speed"): no image file, the node restores while we capture.
    mos::migrate::CaptureOptions options;
    options.editHeader = [&](mos::proto::ImageHeader::Builder header) {
      move.open(pid, header.asReader(), address, config.port, credentials, config.nodeId);
    };
    options.beforePages = [&]() { move.awaitSendImage(); };
    // P sends its own pages on its copy of the connection: one copy, none through us.
    options.sendPagesFromFd = [&]() { return move.remoteFd(); };
    try {
      stats = mos::migrate::captureImage(pid, move, options);
      capturedMs = msSince(began);
      pid_t remotePid = move.awaitStarted();
      startedMs = msSince(began);
      move.writeHeaderFile(headerPath);
      exec.argv = move.argv();
      if (exec.argv.empty()) {
        exec.argv.push_back(exec.path);
      }
      // The deputy's options travel in its environment, one per line (mos-deputy(8)), so that
      // its argv stays the job's own.
      std::vector<std::string> deputyOptions = {"--node",       std::to_string(node),
                                                "--address",    address.toString(),
                                                "--port",       std::to_string(config.port),
                                                "--home-node",  std::to_string(config.nodeId),
                                                "--run-dir",    config.runDir,
                                                "--key",        keyPath,
                                                "--image",      headerPath,
                                                "--channel-fd", std::to_string(move.remoteFd()),
                                                "--started",    std::to_string(remotePid)};
      std::string env = "UMOSIX_DEPUTY_ARGS=";
      for (auto& o : deputyOptions) {
        env += o + "\n";
      }
      exec.env = {env};
      if (threads > 1) {
        // The guest runs on the node with all its threads: their tids at home must be free for
        // the deputy threads that will serve them. From here on P cannot run on at home.
        threadsEnded = true;
        mos::migrate::endOtherThreads(pid);
      }
      move.handOver();
      resend = mos::migrate::execDeputy(pid, move.header(), exec);
    } catch (kj::Exception& e) {
      if (threadsEnded) {
        kill(pid, SIGKILL);  // its other threads are gone: it cannot run on at home
        unlink(headerPath.c_str());
        fail(fmt::format("pid {} is lost: {}", pid, e.getDescription().cStr()));
      }
      move.abandon(pid);
      unlink(headerPath.c_str());
      fail(fmt::format("cannot move pid {} to node {}: {}; it runs on at home, untouched", pid,
                       node, e.getDescription().cStr()));
    }
  } catch (kj::Exception& e) {
    fail(fmt::format("cannot move pid {}: {}", pid, e.getDescription().cStr()));
  }
  execMs = msSince(began);
  // Detached: the process is the deputy now. Signals that came after the capture go to it again.
  for (int sig : resend) {
    kill(pid, sig);
  }
  std::string why = waitForGuest(pid, config.runDir, node);
  if (!why.empty()) {
    fail(fmt::format("pid {} did not start on node {}: {}", pid, node, why));
  }
  fmt::print(
      "migrate: pid {} runs on node {}: {} pages ({:.1f} MiB) in {} runs, stopped {:.1f} ms for "
      "the capture; at ms: node checked {:.1f}, seized {:.1f}, streamed {:.1f}, guest started "
      "{:.1f}, deputy exec'd {:.1f}, deputy ready {:.1f}\n",
      pid, node, stats.pages, stats.pages * 4096.0 / (1 << 20), stats.runs,
      stats.frozen.count() / 1000.0, checkedMs, seizedMs, capturedMs, startedMs, execMs,
      msSince(began));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "migrate: move the user part of job process PID to node NODE or back home, or write it to "
      "a checkpoint FILE that `mosrun -R FILE` resumes."};
  pid_t pid = 0;
  std::string target;
  std::string file;
  app.add_option("PID", pid, "the job process")->required();
  app.add_option("TARGET", target,
                 "a node id: move the job there; `home`: bring it home; `checkpoint`: write FILE")
      ->required();
  app.add_option("FILE", file, "with `checkpoint`: the checkpoint file to write (mode 0600)");
  int timeoutSeconds = 600;
  app.add_option("--timeout", timeoutSeconds,
                 "with `home` or a NODE for a job that is away: seconds to wait for its move home "
                 "(default 600)");
  app.footer(
      "Exit status: 0 done; 1 refused or failed (the process keeps running where it was); 2 bad "
      "arguments.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : EXIT_USAGE;
  }
  if (target == "checkpoint") {
    if (file.empty()) {
      fmt::print(stderr, "migrate: checkpoint needs a FILE (see migrate --help)\n");
      return EXIT_USAGE;
    }
    return checkpoint(pid, file);
  }
  if (!file.empty()) {
    fmt::print(stderr, "migrate: FILE is only for `checkpoint`\n");
    return EXIT_USAGE;
  }
  if (target == "home") {
    return moveHome(pid, timeoutSeconds);
  }
  return moveToNode(pid, target, timeoutSeconds);
}
