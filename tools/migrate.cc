// migrate: move a job process's user part, or checkpoint it (docs/migrate.1.md).
//
//   migrate PID checkpoint FILE
//   migrate PID home
//
// checkpoint: writes the migration image of PID (a job process running at home) to FILE and lets
// PID run on; `mosrun -R FILE` resumes it.
// home: brings the user part of PID (a job running on a remote node; PID is its deputy) back
// home, where it runs natively again in the same process: asks the deputy through its control
// socket (RUN_DIR/control/PID, deputy/control.h) and waits until the job runs at home.
// Moves to a node (migrate PID NODE) are the next step of issue 8 and are refused for now.
//
// Exit status: 0 done; 1 refused or failed (the process keeps running where it was, FILE is not
// created); 2 bad arguments.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <chrono>
#include <cstring>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <kj/debug.h>

#include "checkpoint.h"
#include "config.h"

namespace {

constexpr int EXIT_REFUSED = 1;
constexpr int EXIT_USAGE = 2;

[[noreturn]] void fail(const std::string& message) {
  fmt::print(stderr, "migrate: {}\n", message);
  exit(EXIT_REFUSED);
}

std::string exeOf(pid_t pid) {
  char buf[4096];
  ssize_t n = readlink(fmt::format("/proc/{}/exe", pid).c_str(), buf, sizeof(buf) - 1);
  return n < 0 ? std::string() : std::string(buf, n);
}

bool isDeputy(pid_t pid) {
  std::string exe = exeOf(pid);
  return exe.size() >= 10 && exe.compare(exe.size() - 10, 10, "mos-deputy") == 0;
}

int checkpoint(pid_t pid, const std::string& file) {
  if (kill(pid, 0) != 0 && errno == ESRCH) {
    fail(fmt::format("no process {}", pid));
  }
  if (isDeputy(pid)) {
    fail(fmt::format(
        "pid {} runs on a remote node (it is its deputy here): checkpoints of remote jobs are "
        "not implemented yet",
        pid));
  }
  // The image goes to a temporary file beside FILE, renamed over it when complete: FILE is
  // either absent, the old checkpoint, or a complete new one.
  std::string tmp = fmt::format("{}.tmp.{}", file, getpid());
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    fail(fmt::format("cannot create {}: {}", tmp, strerror(errno)));
  }
  kj::AutoCloseFd owner(fd);
  mos::migrate::CaptureStats stats;
  try {
    kj::FdOutputStream out(fd);
    kj::BufferedOutputStreamWrapper buffered(out);
    {
      mos::migrate::SeizedProcess process(pid);
      stats = mos::migrate::captureImage(pid, buffered);
    }  // detached: the process runs on while the rest of the file is flushed
    buffered.flush();
    KJ_SYSCALL(fsync(fd), tmp);
    KJ_SYSCALL(rename(tmp.c_str(), file.c_str()), tmp, file);
  } catch (kj::Exception& e) {
    unlink(tmp.c_str());
    fail(fmt::format("cannot checkpoint pid {}: {}", pid, e.getDescription().cStr()));
  }
  fmt::print(
      "migrate: pid {} checkpointed to {}: {} pages ({:.1f} MiB) in {} runs, {} mappings, "
      "{} injected syscalls, stopped {:.1f} ms\n",
      pid, file, stats.pages, stats.pages * 4096.0 / (1 << 20), stats.runs, stats.mappings,
      stats.injectedSyscalls, stats.frozen.count() / 1000.0);
  return 0;
}

// migrate PID home: one request line to the deputy's control socket, then its answer, or the
// migration agent's once the job runs at home (deputy/control.h).
int moveHome(pid_t pid, int timeoutSeconds) {
  if (kill(pid, 0) != 0 && errno == ESRCH) {
    fail(fmt::format("no process {}", pid));
  }
  if (!isDeputy(pid)) {
    fmt::print("migrate: pid {} already runs at home\n", pid);
    return 0;
  }
  std::string runDir;
  try {
    runDir = mos::configFromEnvironment().runDir;
  } catch (kj::Exception& e) {
    fail(e.getDescription().cStr());
  }
  std::string path = fmt::format("{}/control/{}", runDir, pid);
  struct sockaddr_un address = {};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof(address.sun_path)) {
    fail(fmt::format("the control socket path {} is too long", path));
  }
  memcpy(address.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    fail(fmt::format("socket: {}", strerror(errno)));
  }
  kj::AutoCloseFd owner(fd);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) < 0) {
    fail(
        fmt::format("cannot reach the deputy of pid {} at {}: {} (is UMOSIX_RUN_DIR the one of "
                    "its home node?)",
                    pid, path, strerror(errno)));
  }
  auto started = std::chrono::steady_clock::now();
  const char request[] = "home\n";
  if (send(fd, request, sizeof(request) - 1, MSG_NOSIGNAL) != sizeof(request) - 1) {
    fail(fmt::format("cannot ask the deputy of pid {}: {}", pid, strerror(errno)));
  }
  // The answer: one line from the deputy (refused) or from the migration agent (ok, failed).
  std::string answer;
  auto deadline = started + std::chrono::seconds(timeoutSeconds);
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0) {
      fail(
          fmt::format("no answer from the deputy of pid {} within {} s (is the job stopped?); "
                      "the move may still happen",
                      pid, timeoutSeconds));
    }
    struct pollfd pfd = {fd, POLLIN, 0};
    int n = poll(&pfd, 1, static_cast<int>(std::min<long>(left, 1000)));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      continue;
    }
    char buffer[512];
    ssize_t got = read(fd, buffer, sizeof(buffer));
    if (got < 0 && errno == EINTR) {
      continue;
    }
    if (got <= 0) {
      break;
    }
    answer.append(buffer, got);
    if (answer.find('\n') != std::string::npos) {
      break;
    }
  }
  while (!answer.empty() && (answer.back() == '\n' || answer.back() == '\r')) {
    answer.pop_back();
  }
  double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
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
    if (kill(pid, 0) != 0 && errno == ESRCH) {
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "migrate: move the user part of job process PID to node NODE or back home, or write it to "
      "a checkpoint FILE that `mosrun -R FILE` resumes."};
  pid_t pid = 0;
  std::string target;
  std::string file;
  app.add_option("PID", pid, "the job process")->required();
  app.add_option("TARGET", target, "`home` or `checkpoint` (a node id: not implemented yet)")
      ->required();
  int timeoutSeconds = 600;
  app.add_option("--timeout", timeoutSeconds,
                 "with `home`: seconds to wait for the move (default 600)");
  app.add_option("FILE", file, "with `checkpoint`: the checkpoint file to write (mode 0600)");
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
  fail(fmt::format(
      "moving pid {} to node {} is not implemented yet (issue 8); `home` and `checkpoint` are", pid,
      target));
}
