// mps: lists the jobs whose home is this node, as the local mosd reports them (docs/mps.1.md).

#include <fmt/format.h>
#include <kj/debug.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
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

void printTable(const std::vector<JobInfo>& jobs) {
  fmt::print("{:>7}  {:<6}  {:<9}  {:>9}  {}\n", "PID", "WHERE", "STATE", "SYSCALLS", "COMMAND");
  for (const JobInfo& job : jobs) {
    fmt::print("{:>7}  {:<6}  {:<9}  {:>9}  {}\n", job.homePid, where(job), job.state, job.syscalls,
               job.command);
  }
}

void printJson(const std::vector<JobInfo>& jobs) {
  auto array = nlohmann::json::array();
  for (const JobInfo& job : jobs) {
    array.push_back({{"pid", job.homePid},
                     {"node", job.node},
                     {"state", job.state},
                     {"syscalls", job.syscalls},
                     {"remotePid", job.remotePid},
                     {"command", job.command}});
  }
  fmt::print("{}\n", array.dump(2));
}

int run(int argc, char** argv) {
  CLI::App app("lists the umosix jobs whose home is this node, with where each one runs now",
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
  std::optional<ClusterCredentials> credentials;
  // Configuration errors are kj::Exceptions with a one-line description for the user (config.h).
  KJ_IF_MAYBE (
      e, kj::runCatchingExceptions([&]() {
        config = configFromEnvironment();
        if (!mapPath.empty()) config.mapPath = mapPath;
        if (!nodeText.empty()) config.nodeId = parseNodeId(nodeText, "--node");
        if (!portText.empty()) config.port = parsePort(portText, "--port");
        if (!keyPath.empty()) config.keyPath = keyPath;
        address = resolveNodeId(config, MapFile::fromPath(config.mapPath));
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
  if (json) {
    printJson(jobs);
  } else {
    printTable(jobs);
  }
  return 0;
}

}  // namespace
}  // namespace mos

int main(int argc, char** argv) { return mos::run(argc, argv); }
