// mosrun: start a program as a umosix job (docs/mosrun.1.md).
//
//   mosrun [-r NODE] PROGRAM [ARGS...]
//   mosrun -R FILE
//
// The process the shell waits on is the job itself (design decision 1): mosrun checks its
// arguments and the target node, starts a migration agent, and execs PROGRAM in place. At the
// exec event the agent captures the new program's user part, sends it to NODE and turns this
// very process into the job's deputy. Without -r, or with -r naming this node, the job simply
// runs at home.
//
// Exit status: the job's own (or death by the same signal). mosrun's own failures before the
// job starts: 125 (bad arguments, unknown or unreachable node, malformed map file), 126 (PROGRAM
// not executable), 127 (PROGRAM not found). 112: the remote node died while the job ran.

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <kj/debug.h>

#include "checkpoint.h"
#include "config.h"
#include "log.h"
#include "map_file.h"
#include "migrate.h"
#include "node_client.h"
#include "programs.h"

namespace {

constexpr int EXIT_MOSRUN_FAILED = 125;
constexpr int EXIT_NOT_EXECUTABLE = 126;
constexpr int EXIT_NOT_FOUND = 127;
constexpr int NODE_CHECK_TIMEOUT_MS = 3000;

[[noreturn]] void fail(int status, const std::string& message) {
  fmt::print(stderr, "mosrun: {}\n", message);
  fflush(stderr);
  _exit(status);
}

// The path execvp(3) would run for `name`, or an errno (ENOENT, EACCES).
std::string resolveProgram(const std::string& name, int& err) {
  auto usable = [&](const std::string& path) {
    struct stat st;
    if (stat(path.c_str(), &st) < 0) {
      err = errno;
      return false;
    }
    if (S_ISDIR(st.st_mode) || access(path.c_str(), X_OK) < 0) {
      err = EACCES;
      return false;
    }
    return true;
  };
  err = ENOENT;
  if (name.find('/') != std::string::npos) {
    return usable(name) ? name : std::string();
  }
  const char* pathEnv = getenv("PATH");
  std::string path = pathEnv != nullptr ? pathEnv : "/usr/local/bin:/usr/bin:/bin";
  int firstErr = ENOENT;
  size_t start = 0;
  for (;;) {
    size_t end = path.find(':', start);
    std::string dir = path.substr(start, end == std::string::npos ? end : end - start);
    std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    if (usable(candidate)) {
      return candidate;
    }
    if (err == EACCES) {
      firstErr = EACCES;
    }
    if (end == std::string::npos) {
      break;
    }
    start = end + 1;
  }
  err = firstErr;
  return std::string();
}

// mosrun --trace: starts `mostrace -p <this pid> --job-node NODE` detached from the job (a
// grandchild in its own session, so it is never the job's child and never gets the terminal's
// signals) and waits until it is subscribed, so the trace starts with the job's first call.
// `file` "-" is stderr. A tracer that cannot start is reported and the job runs untraced.
void startTracer(const std::string& file, uint32_t node) {
  std::string path;
  try {
    path = mos::programPath("mostrace");
  } catch (kj::Exception& e) {
    fmt::print(stderr, "mosrun: --trace: {}\n", e.getDescription().cStr());
    return;
  }
  std::vector<std::string> args = {
      path, "-p", std::to_string(getpid()), "--job-node", std::to_string(node), "--ready-fd", "3"};
  if (file != "-") {
    args.push_back("-o");
    args.push_back(file);
  }
  std::vector<char*> argv;
  for (auto& a : args) {
    argv.push_back(a.data());
  }
  argv.push_back(nullptr);
  int ready[2];
  if (pipe2(ready, O_CLOEXEC) < 0) {
    fmt::print(stderr, "mosrun: --trace: pipe: {}\n", strerror(errno));
    return;
  }
  pid_t child = fork();
  if (child == 0) {
    // Only async-signal-safe calls from here to exec.
    if (fork() != 0) {
      _exit(0);
    }
    setsid();
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    dup2(devnull, 0);
    dup2(ready[1], 3);  // without O_CLOEXEC
    close_range(4, ~0U, 0);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(ready[1]);
  if (child > 0) {
    waitpid(child, nullptr, 0);
  }
  pollfd wait{ready[0], POLLIN, 0};
  char byte;
  if (child < 0 || poll(&wait, 1, 10000) != 1 || read(ready[0], &byte, 1) != 1) {
    fmt::print(stderr, "mosrun: --trace: mostrace did not subscribe; the job runs untraced\n");
  }
  close(ready[0]);
}

// -R FILE: the whole checkpoint is read and checked (digest, counts, files, descriptors, CPU)
// before anything happens to this process; then an agent restores it into this very process
// after it has exec'd the restore stub, so the shell's job is the resumed process.
[[noreturn]] void resume(const std::string& file, std::optional<uint32_t> node) {
  std::string path = std::filesystem::absolute(file).string();
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fail(EXIT_MOSRUN_FAILED, fmt::format("cannot open {}: {}", file, strerror(errno)));
  }
  std::vector<std::string> problems;
  try {
    kj::AutoCloseFd owner(fd);
    kj::FdInputStream in(fd);
    mos::migrate::ImageReader reader(in);
    reader.verifyToEnd();
    problems = mos::migrate::checkResumable(reader.header());
  } catch (kj::Exception& e) {
    fail(EXIT_MOSRUN_FAILED, fmt::format("cannot resume {}: {}", file, e.getDescription().cStr()));
  }
  if (!problems.empty()) {
    for (auto& p : problems) {
      fmt::print(stderr, "mosrun: cannot resume {}: {}\n", file, p);
    }
    fflush(stderr);
    _exit(EXIT_MOSRUN_FAILED);
  }
  mos::migrate::AgentConfig config;
  config.resumeImagePath = path;
  if (node.has_value()) {
    // -r NODE: resumed here, then moved by `migrate PID NODE`, which the agent becomes once the
    // job runs (it reports a refusal on the job's stderr; the job then runs on at home).
    try {
      config.afterResume = {mos::programPath("migrate"), std::to_string(getpid()),
                            std::to_string(*node)};
    } catch (kj::Exception& e) {
      fail(EXIT_MOSRUN_FAILED, e.getDescription().cStr());
    }
  }
  mos::migrate::Agent agent;
  try {
    agent = mos::migrate::Agent::start(config);
  } catch (kj::Exception& e) {
    fail(EXIT_MOSRUN_FAILED,
         fmt::format("cannot start the migration agent: {}", e.getDescription().cStr()));
  }
  mos::migrate::execRestoreStub();
  int err = errno;
  agent.cancel();
  fail(EXIT_MOSRUN_FAILED, fmt::format("cannot exec the restore stub: {}", strerror(err)));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "mosrun: run PROGRAM as a umosix job. Its user part (memory and registers) may run on "
      "another node of the cluster while its system calls are served at home by its deputy, so "
      "it sees its home files, pid, terminal and signals."};
  std::optional<uint32_t> remote;
  app.add_option("-r,--remote", remote,
                 "run the user part on node NODE (a node id of the cluster map); without it the "
                 "job runs at home")
      ->type_name("NODE");
  bool locked = false;
  app.add_flag("-L,--lock", locked,
               "lock the job where it starts (at home, or on the -r NODE): `migrate` refuses to "
               "move it or any process it forks, and mps shows why it stays");
  std::string traceFile;
  app.add_flag("--trace{-}", traceFile,
               "trace the job's trapped system calls from its start with mostrace(1), to stderr "
               "or, as --trace=FILE, to FILE (with -r)");
  std::string resumeFile;
  app.add_option("-R,--resume", resumeFile,
                 "resume the job checkpointed in FILE (migrate PID checkpoint FILE) at home, in "
                 "this process; its files are reopened by path and offset; with -r NODE, it is "
                 "then moved to NODE")
      ->type_name("FILE");
  std::string checkpointFile;
  auto* checkpointOption =
      app.add_option("-C,--checkpoint", checkpointFile,
                     "with -A: write the job's checkpoints to FILE (each one replaces the last, "
                     "atomically); `mosrun -R FILE` resumes the latest")
          ->type_name("FILE");
  double checkpointMinutes = 0;
  app.add_option("-A,--auto-checkpoint", checkpointMinutes,
                 "checkpoint the job every MINUTES (a decimal: 0.5 is 30 s) to the -C FILE while "
                 "it runs at home")
      ->type_name("MINUTES")
      ->check(CLI::PositiveNumber)
      ->needs(checkpointOption);
  app.prefix_command();
  app.footer(
      "PROGRAM [ARGS...] follow the options; everything from PROGRAM on is the program's own.\n"
      "Environment: UMOSIX_MAP (cluster map, openMosix format), UMOSIX_NODE (this node's id), "
      "UMOSIX_RUN_DIR, UMOSIX_PORT, UMOSIX_KEY (the cluster key file), UMOSIX_LOG.\n"
      "Exit status: the job's own; 125 mosrun failed before the job started (unknown or "
      "unreachable node, malformed map); 126 PROGRAM not executable; 127 PROGRAM not found; "
      "112 the remote node died while the job ran.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : EXIT_MOSRUN_FAILED;
  }
  std::vector<std::string> command = app.remaining();
  if (!command.empty() && command[0] == "--") {
    command.erase(command.begin());
  }
  if (!resumeFile.empty()) {
    if (!command.empty()) {
      fail(EXIT_MOSRUN_FAILED, "-R FILE takes no PROGRAM: the checkpoint is the program");
    }
    if (!checkpointFile.empty()) {
      fail(EXIT_MOSRUN_FAILED,
           "-R with -C/-A is not implemented yet: checkpoint the resumed job with `migrate PID "
           "checkpoint FILE`");
    }
    if (locked) {
      fail(EXIT_MOSRUN_FAILED,
           "-R with -L is not implemented: the resumed job keeps its own "
           "environment, where the lock lives");
    }
    resume(resumeFile, remote);
  }
  if (command.empty()) {
    fail(EXIT_MOSRUN_FAILED, "no PROGRAM given (see mosrun --help)");
  }
  if (!checkpointFile.empty() && checkpointMinutes <= 0) {
    fail(EXIT_MOSRUN_FAILED, "-C FILE needs -A MINUTES (the checkpoint interval)");
  }
  mos::initLogging("mosrun", spdlog::level::warn);

  std::vector<char*> execArgv;
  for (auto& arg : command) {
    execArgv.push_back(arg.data());
  }
  execArgv.push_back(nullptr);
  int err;
  std::string program = resolveProgram(command[0], err);

  bool away = false;
  mos::migrate::Agent agent;
  if (remote.has_value()) {
    mos::NodeConfig config;
    mos::MapFile map;
    try {
      config = mos::configFromEnvironment();
      map = mos::MapFile::fromPath(config.mapPath);
      mos::resolveNodeId(config, map);
    } catch (kj::Exception& e) {
      fail(EXIT_MOSRUN_FAILED, e.getDescription().cStr());
    }
    if (*remote != config.nodeId) {
      mos::Ipv4 address;
      KJ_IF_MAYBE (a, map.lookup(*remote)) {
        address = *a;
      } else {
        fail(EXIT_MOSRUN_FAILED,
             fmt::format("node {} is not in the cluster map {}", *remote, config.mapPath));
      }
      // The cluster key proves this node to the remote mosd, here for the check and in the
      // deputy for the job channel (cluster_auth.h).
      std::string keyPath = std::filesystem::absolute(config.keyPath).string();
      std::optional<mos::ClusterCredentials> credentials;
      try {
        credentials.emplace(mos::ClusterCredentials{config.nodeId, mos::ClusterKey::load(keyPath)});
      } catch (kj::Exception& e) {
        fail(EXIT_MOSRUN_FAILED, e.getDescription().cStr());
      }
      try {
        mos::queryStatus(*credentials, address, config.port, NODE_CHECK_TIMEOUT_MS);
      } catch (kj::Exception& e) {
        fail(EXIT_MOSRUN_FAILED,
             fmt::format("node {} ({}:{}) is unreachable: {}", *remote, address.toString(),
                         config.port, e.getDescription().cStr()));
      }
      if (program.empty()) {
        fail(
            err == ENOENT ? EXIT_NOT_FOUND : EXIT_NOT_EXECUTABLE,
            fmt::format("{}: {}", command[0], err == ENOENT ? "command not found" : strerror(err)));
      }
      mos::migrate::AgentConfig agentConfig;
      try {
        agentConfig.deputyPath = mos::programPath("mos-deputy");
      } catch (kj::Exception& e) {
        fail(EXIT_MOSRUN_FAILED, e.getDescription().cStr());
      }
      agentConfig.deputyArgv = {agentConfig.deputyPath,
                                "--node",
                                std::to_string(*remote),
                                "--address",
                                address.toString(),
                                "--port",
                                std::to_string(config.port),
                                "--home-node",
                                std::to_string(config.nodeId),
                                "--run-dir",
                                config.runDir,
                                "--key",
                                keyPath};
      if (locked) {
        agentConfig.deputyArgv.push_back("--locked");
      }
      agentConfig.imagePath = fmt::format("{}/images/{}.img", config.runDir, getpid());
      std::error_code ec;
      std::filesystem::create_directories(config.runDir + "/images", ec);
      if (ec) {
        fail(EXIT_MOSRUN_FAILED,
             fmt::format("cannot create {}/images: {}", config.runDir, ec.message()));
      }
      try {
        agent = mos::migrate::Agent::start(agentConfig);
      } catch (kj::Exception& e) {
        fail(EXIT_MOSRUN_FAILED,
             fmt::format("cannot start the migration agent: {}", e.getDescription().cStr()));
      }
      away = true;
      if (!traceFile.empty()) {
        startTracer(traceFile, *remote);
      }
    }
  }
  if (locked) {
    // Inherited by the job and everything it forks or execs at home; `migrate` reads it from
    // /proc/PID/environ (docs/mosrun.1.md, -L).
    setenv(mos::LOCKED_ENV, "1", 1);
  }
  if (!traceFile.empty() && !away) {
    fmt::print(stderr,
               "mosrun: --trace: the job runs at home, where nothing is trapped; use "
               "strace\n");
  }
  if (program.empty()) {
    fail(err == ENOENT ? EXIT_NOT_FOUND : EXIT_NOT_EXECUTABLE,
         fmt::format("{}: {}", command[0], err == ENOENT ? "command not found" : strerror(err)));
  }
  if (!checkpointFile.empty()) {
    std::string path = std::filesystem::absolute(checkpointFile).string();
    auto interval =
        std::chrono::milliseconds(std::max<int64_t>(1, std::llround(checkpointMinutes * 60'000.0)));
    try {
      mos::migrate::startCheckpointer(path, interval, mos::configFromEnvironment().runDir);
    } catch (kj::Exception& e) {
      fail(EXIT_MOSRUN_FAILED,
           fmt::format("cannot start the checkpointer: {}", e.getDescription().cStr()));
    }
  }
  execv(program.c_str(), execArgv.data());
  err = errno;
  if (away) {
    agent.cancel();
  }
  fail(err == ENOENT ? EXIT_NOT_FOUND : EXIT_NOT_EXECUTABLE,
       fmt::format("{}: {}", command[0], strerror(err)));
}
