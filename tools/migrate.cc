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

#include "checkpoint.h"
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
  std::string keyPath = std::filesystem::absolute(config.keyPath).string();
  try {
    mos::ClusterCredentials credentials{config.nodeId, mos::ClusterKey::load(keyPath)};
    mos::queryStatus(credentials, address, config.port, NODE_CHECK_TIMEOUT_MS);
  } catch (kj::Exception& e) {
    fail(fmt::format("node {} ({}:{}) is down or unreachable, pid {} stays at home: {}", node,
                     address.toString(), config.port, pid, e.getDescription().cStr()));
  }
  mos::migrate::DeputyExec exec;
  try {
    exec.path = mos::programPath("mos-deputy");
  } catch (kj::Exception& e) {
    fail(e.getDescription().cStr());
  }
  std::string imagePath = fmt::format("{}/images/{}.img", config.runDir, pid);
  std::error_code ec;
  std::filesystem::create_directories(config.runDir + "/images", ec);
  if (ec) {
    fail(fmt::format("cannot create {}/images: {}", config.runDir, ec.message()));
  }
  // The deputy's options travel in its environment, one per line (mos-deputy(8)), so that its
  // argv stays the job's own.
  std::vector<std::string> options = {"--node",      std::to_string(node),
                                      "--address",   address.toString(),
                                      "--port",      std::to_string(config.port),
                                      "--home-node", std::to_string(config.nodeId),
                                      "--run-dir",   config.runDir,
                                      "--key",       keyPath,
                                      "--image",     imagePath};
  std::string env = "UMOSIX_DEPUTY_ARGS=";
  for (auto& o : options) {
    env += o + "\n";
  }
  exec.env = {env};

  mos::migrate::CaptureStats stats;
  std::vector<int> resend;
  try {
    mos::migrate::SeizedProcess process(pid);
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
    {
      int fd = open(imagePath.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (fd < 0) {
        fail(fmt::format("cannot create {}: {}", imagePath, strerror(errno)));
      }
      kj::AutoCloseFd owner(fd);
      kj::FdOutputStream out(fd);
      kj::BufferedOutputStreamWrapper buffered(out);
      try {
        stats = mos::migrate::captureImage(pid, buffered);
        buffered.flush();
      } catch (kj::Exception& e) {
        unlink(imagePath.c_str());
        fail(fmt::format("cannot move pid {}, it stays at home: {}", pid,
                         e.getDescription().cStr()));
      }
    }
    int fd = open(imagePath.c_str(), O_RDONLY | O_CLOEXEC);
    KJ_REQUIRE(fd >= 0, "cannot reopen the image", imagePath, strerror(errno));
    kj::AutoCloseFd owner(fd);
    kj::FdInputStream in(fd);
    mos::migrate::ImageReader reader(in);
    auto header = reader.header();
    for (auto arg : header.getArgv()) {
      exec.argv.emplace_back(reinterpret_cast<const char*>(arg.begin()), arg.size());
    }
    if (exec.argv.empty()) {
      exec.argv.push_back(exec.path);
    }
    if (threads > 1) {
      try {
        mos::migrate::endOtherThreads(pid);
      } catch (kj::Exception& e) {
        kill(pid, SIGKILL);  // some of its threads are gone: it cannot run on
        unlink(imagePath.c_str());
        fail(fmt::format("pid {} is lost: ending its threads for the move failed: {}", pid,
                         e.getDescription().cStr()));
      }
    }
    try {
      resend = mos::migrate::execDeputy(pid, header, exec);
    } catch (kj::Exception& e) {
      unlink(imagePath.c_str());
      if (threads > 1) {
        kill(pid, SIGKILL);  // its other threads are gone: it cannot run on at home
        fail(fmt::format("pid {} is lost: {}", pid, e.getDescription().cStr()));
      }
      fail(fmt::format("cannot move pid {}, it stays at home: {}", pid, e.getDescription().cStr()));
    }
  } catch (kj::Exception& e) {
    unlink(imagePath.c_str());
    fail(fmt::format("cannot move pid {}: {}", pid, e.getDescription().cStr()));
  }
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
      "the capture\n",
      pid, node, stats.pages, stats.pages * 4096.0 / (1 << 20), stats.runs,
      stats.frozen.count() / 1000.0);
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
