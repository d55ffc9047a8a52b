// mos-supervisor: serves one guest on this node. Started by mosd for each job channel; not meant
// to be run by hand (docs/design.md, "the supervisor").

#include <CLI/CLI.hpp>

#include "log.h"
#include "supervisor.h"

int main(int argc, char** argv) {
  CLI::App app{"umosix supervisor: restores one guest on this node and serves its syscalls"};
  mos::remote::SupervisorOptions options;
  app.add_option("--fd", options.fd, "the job channel descriptor")->required();
  app.add_option("--node", options.node, "this node's id")->required();
  app.add_option("--peer-node", options.peerNode, "the job's home node id")->required();
  app.add_option("--run-dir", options.runDir, "the node's run directory")->required();
  app.add_option("--cache-dir", options.cacheDir, "the node's content cache")->required();
  CLI11_PARSE(app, argc, argv);
  mos::initLogging("mos-supervisor", spdlog::level::info);
  mos::remote::Supervisor supervisor(std::move(options));
  return supervisor.run();
}
