// migrate: move a job process's user part, or checkpoint it (docs/migrate.1.md).
//
//   migrate PID checkpoint FILE
//
// Writes the migration image of PID (a job process running at home) to FILE and lets PID run
// on; `mosrun -R FILE` resumes it. Moves between nodes (migrate PID NODE|home) are the next
// step of issue 8 and are refused with a clear message for now.
//
// Exit status: 0 done; 1 refused or failed (the process keeps running where it was, FILE is not
// created); 2 bad arguments.

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <kj/debug.h>

#include "checkpoint.h"

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

int checkpoint(pid_t pid, const std::string& file) {
  if (kill(pid, 0) != 0 && errno == ESRCH) {
    fail(fmt::format("no process {}", pid));
  }
  std::string exe = exeOf(pid);
  if (exe.size() >= 10 && exe.compare(exe.size() - 10, 10, "mos-deputy") == 0) {
    fail(fmt::format(
        "pid {} runs on a remote node (it is its deputy here): checkpoints of remote jobs are "
        "not implemented yet",
        pid));
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "migrate: move the user part of job process PID to node NODE or back home, or write it to "
      "a checkpoint FILE that `mosrun -R FILE` resumes."};
  pid_t pid = 0;
  std::string target;
  std::string file;
  app.add_option("PID", pid, "the job process")->required();
  app.add_option("TARGET", target, "`checkpoint` (a node id or `home`: not implemented yet)")
      ->required();
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
  fail(fmt::format("moving pid {} to {} is not implemented yet (issue 8); only `checkpoint` is",
                   pid, target));
}
