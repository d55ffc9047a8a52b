// mps: lists every process of the jobs whose home is this node, as the local mosd reports them,
// with why a guest stays on its node as that node's mosd reports it (docs/mps.1.md).

#include <fmt/format.h>
#include <kj/debug.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <map>
#include <optional>
#include <set>
#include <string>

#include "config.h"
#include "log.h"
#include "map_file.h"
#include "node_client.h"

#ifndef UMOSIX_VERSION
#define UMOSIX_VERSION "unknown"
#endif

namespace mos {
namespace {

std::string where(const JobInfo& job) {
  return job.node == job.homeNode ? "home" : std::to_string(job.node);
}

// One process of a job: its home record, completed by its guest's record where it runs away.
struct ProcessRow {
  JobInfo home;
  int32_t job = 0;  // the job's first process: the topmost ancestor that is listed too
};

// Every process the home mosd lists, with the threads and stay reason that the mosd of each
// node where some run reports for their guests (a node that does not answer leaves them out).
std::vector<ProcessRow> listProcesses(const std::vector<JobInfo>& jobs,
                                      const ClusterCredentials& credentials, const MapFile& map,
                                      uint32_t homeNode, uint16_t port, uint32_t timeoutMs) {
  std::map<int32_t, int32_t> parentOf;
  for (const JobInfo& job : jobs) {
    parentOf[job.homePid] = job.parentPid;
  }
  std::vector<ProcessRow> rows;
  std::set<uint32_t> nodes;
  for (const JobInfo& job : jobs) {
    ProcessRow row{job, job.homePid};
    for (int32_t up = job.parentPid; parentOf.count(up) > 0 && up != row.job; up = parentOf[up]) {
      row.job = up;
    }
    if (job.node != job.homeNode && job.remotePid != 0) {
      nodes.insert(job.node);
    }
    rows.push_back(std::move(row));
  }
  for (uint32_t node : nodes) {
    std::vector<JobInfo> guests;
    KJ_IF_MAYBE (address, map.lookup(node)) {
      KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                          [&]() { guests = listGuests(credentials, *address, port, timeoutMs); })) {
        fmt::print(stderr, "mps: {}\n", e->getDescription().cStr());
      }
    }
    for (ProcessRow& row : rows) {
      for (const JobInfo& guest : guests) {
        if (row.home.node == node && guest.homeNode == homeNode &&
            guest.homePid == row.home.homePid) {
          row.home.threads = guest.threads;
          row.home.stay = guest.stay;
          if (row.home.remotePid == 0) {
            row.home.remotePid = guest.remotePid;  // a forked child's deputy does not know it
          }
        }
      }
    }
  }
  return rows;
}

std::string orDash(int64_t value) { return value > 0 ? std::to_string(value) : "-"; }

void printProcessTable(const std::vector<ProcessRow>& rows) {
  fmt::print("{:>7}  {:>7}  {:<6}  {:<9}  {:>3}  {:>9}  {}\n", "PID", "PPID", "WHERE", "STATE",
             "THR", "SYSCALLS", "COMMAND");
  for (const ProcessRow& row : rows) {
    const JobInfo& p = row.home;
    fmt::print("{:>7}  {:>7}  {:<6}  {:<9}  {:>3}  {:>9}  {}\n", p.homePid, orDash(p.parentPid),
               where(p), p.state, orDash(p.threads), p.syscalls, p.command);
    if (!p.stay.empty()) {
      fmt::print("{:>7}  stays on node {}: {}\n", "", p.node, p.stay);
    }
  }
}

void printProcessJson(const std::vector<ProcessRow>& rows) {
  auto array = nlohmann::json::array();
  for (const ProcessRow& row : rows) {
    const JobInfo& p = row.home;
    array.push_back({{"pid", p.homePid},
                     {"ppid", p.parentPid},
                     {"job", row.job},
                     {"node", p.node},
                     {"state", p.state},
                     {"threads", p.threads},
                     {"syscalls", p.syscalls},
                     {"remotePid", p.remotePid},
                     {"stay", p.stay},
                     {"command", p.command}});
  }
  fmt::print("{}\n", array.dump(2));
}

int run(int argc, char** argv) {
  CLI::App app(
      "lists every process of the umosix jobs whose home is this node: where each one "
      "runs now, and why it stays there",
      "mps");
  bool json = false;
  std::string mapPath, nodeText, portText, keyPath;
  uint32_t timeoutMs = 3000;
  app.add_flag("--json", json, "print a JSON array instead of a table");
  app.add_option("--map", mapPath, "cluster map file (default $UMOSIX_MAP or /etc/umosix/map)");
  app.add_option("--node", nodeText, "this node's id (default $UMOSIX_NODE or the local address)");
  app.add_option("--port", portText, "mosd's TCP port (default $UMOSIX_PORT or 7151)");
  app.add_option("--key", keyPath,
                 "cluster key file (default $UMOSIX_KEY or /etc/umosix/cluster.key)");
  app.add_option("--timeout", timeoutMs, "how long to wait for mosd, in milliseconds (3000)");
  app.set_version_flag("--version", UMOSIX_VERSION);
  CLI11_PARSE(app, argc, argv);
  initLogging("mps", spdlog::level::warn);

  NodeConfig config;
  Ipv4 address;
  std::optional<MapFile> map;
  std::optional<ClusterCredentials> credentials;
  // Configuration errors are kj::Exceptions with a one-line description for the user (config.h).
  KJ_IF_MAYBE (
      e, kj::runCatchingExceptions([&]() {
        config = configFromEnvironment();
        if (!mapPath.empty()) config.mapPath = mapPath;
        if (!nodeText.empty()) config.nodeId = parseNodeId(nodeText, "--node");
        if (!portText.empty()) config.port = parsePort(portText, "--port");
        if (!keyPath.empty()) config.keyPath = keyPath;
        map.emplace(MapFile::fromPath(config.mapPath));
        address = resolveNodeId(config, *map);
        credentials.emplace(ClusterCredentials{config.nodeId, ClusterKey::load(config.keyPath)});
      })) {
    fmt::print(stderr, "mps: {}\n", e->getDescription().cStr());
    return 2;
  }

  std::vector<JobInfo> jobs;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions(
                      [&]() { jobs = listJobs(*credentials, address, config.port, timeoutMs); })) {
    fmt::print(stderr, "mps: {}\n", e->getDescription().cStr());
    return 1;
  }
  auto rows = listProcesses(jobs, *credentials, *map, config.nodeId, config.port, timeoutMs);
  if (json) {
    printProcessJson(rows);
  } else {
    printProcessTable(rows);
  }
  return 0;
}

}  // namespace
}  // namespace mos

int main(int argc, char** argv) { return mos::run(argc, argv); }
