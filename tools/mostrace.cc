// mostrace: live trace of a job's trapped system calls, in strace's notation (docs/mostrace.1.md).
// Finds the job in the local mosd's list, connects to the mosd of the node where its user part
// runs and subscribes to the job's trace stream (Node.traceJob, protocol/trace.capnp). Detaching
// (Ctrl-C, SIGTERM) drops the subscription; the job never notices either.

#include <fmt/format.h>
#include <kj/debug.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "config.h"
#include "log.h"
#include "map_file.h"
#include "node_client.h"
#include "trace_channel.h"
#include "trace_format.h"
#include "uv_event_port.h"

#ifndef UMOSIX_VERSION
#define UMOSIX_VERSION "unknown"
#endif

namespace mos {
namespace {

struct Options {
  int32_t pid = 0;
  bool summary = false;
  std::vector<std::string> expressions;
  size_t stringLimit = 32;
  bool durations = false;
  bool relative = false;
  int timestamps = 0;
  bool failed = false;
  bool stacks = false;
  std::string output;
  std::string mapPath, nodeText, portText, keyPath;
  uint32_t timeoutMs = 3000;
  std::optional<uint32_t> jobNode;  // where the job runs, when the caller knows (mosrun --trace)
  int readyFd = -1;                 // written to and closed once subscribed (mosrun --trace)
};

// Runs the subscription until a signal or the end of the stream. Returns the exit status.
int trace(const Options& options, const ClusterCredentials& credentials, Ipv4 address,
          uint16_t tcpPort, uint32_t jobNode, uint32_t homeNode, FILE* out) {
  TraceFilter filter;
  for (const std::string& e : options.expressions) {
    filter = TraceFilter::parse(e);  // strace: the last trace= wins
  }
  filter.setFailedOnly(options.failed);
  TraceFormatter formatter({options.stringLimit, options.durations, options.relative,
                            options.timestamps, true, options.stacks});
  TraceSummary summary;
  std::string endReason;
  uint64_t received = 0;  // events the sink got, before our own filter
  bool interactive = isatty(fileno(out));

  uv_loop_t loop;
  uv_loop_init(&loop);
  int status = 0;
  {
    UvEventPort port(&loop);
    kj::WaitScope waitScope(port.kjLoop());
    auto done = kj::newPromiseAndFulfiller<void>();
    auto* fulfiller = done.fulfiller.get();

    auto sink = kj::heap<CallbackTraceSink>(
        [&](TraceRecord&& record) {
          received++;
          if (!filter.accepts(record)) {
            return;
          }
          if (options.summary) {
            summary.add(record);
          } else {
            fmt::print(out, "{}\n", formatter.line(record));
            // A terminal sees each line at once; a file is flushed once per batch (below): a
            // write(2) per line is what kept mostrace behind a fast job.
            if (interactive) {
              fflush(out);
            }
          }
        },
        [&](const std::string& reason) {
          endReason = reason;
          if (fulfiller->isWaiting()) fulfiller->fulfill();
        },
        [&]() { fflush(out); });
    auto& sinkRef = *sink;
    proto::TraceSink::Client sinkClient = kj::mv(sink);

    uv_signal_t signals[2];
    int signalNumbers[2] = {SIGINT, SIGTERM};
    for (int i = 0; i < 2; i++) {
      uv_signal_init(&loop, &signals[i]);
      signals[i].data = fulfiller;
      uv_signal_start(
          &signals[i],
          [](uv_signal_t* s, int) {
            auto* f = static_cast<kj::PromiseFulfiller<void>*>(s->data);
            if (f->isWaiting()) f->fulfill();
          },
          signalNumbers[i]);
    }

    KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() {
                   auto connection = NodeConnection::connect(port, credentials, address, tcpPort,
                                                             options.timeoutMs)
                                         .wait(waitScope);
                   auto request = connection->node().traceJobRequest();
                   request.setHomePid(options.pid);
                   request.setHomeNode(homeNode);
                   auto wire = request.initFilter();
                   auto nrs = filter.syscalls();
                   auto list = wire.initSyscalls(nrs.size());
                   for (size_t i = 0; i < nrs.size(); i++) {
                     list.set(i, nrs[i]);
                   }
                   wire.setFailedOnly(options.failed);
                   wire.setPayloadBytes(uint32_t(options.stringLimit));
                   wire.setStacks(options.stacks);
                   request.setSink(kj::mv(sinkClient));
                   auto response = request.send().wait(waitScope);
                   auto subscription = response.getSubscription();
                   fmt::print(stderr, "mostrace: Process {} attached (node {})\n", options.pid,
                              jobNode);
                   if (options.readyFd >= 0) {
                     (void)!write(options.readyFd, "1", 1);
                     close(options.readyFd);
                   }
                   // The job's home process is on this machine: stop when it exits.
                   bool exited = false;
                   kj::Promise<void> exit = kj::NEVER_DONE;
                   kj::Own<UvFdWatcher> exitWatcher;
                   kj::AutoCloseFd pidfd(int(syscall(SYS_pidfd_open, options.pid, 0)));
                   if (pidfd.get() >= 0) {
                     exitWatcher = kj::heap<UvFdWatcher>(port, pidfd.get());
                     exit = exitWatcher->whenReadable().then([&exited]() { exited = true; });
                   }
                   done.promise.exclusiveJoin(kj::mv(exit)).wait(waitScope);
                   if (exited) {
                     // Every event the job caused was published before it exited: wait for
                     // those mosd has for us, then detach.
                     auto stats = subscription.statsRequest().send().wait(waitScope);
                     uint64_t target = stats.getDelivered() + stats.getQueued();
                     // Give up only when nothing arrives for 5 s (mosd gone): a long backlog
                     // is written out in full.
                     auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
                     uint64_t seen = received;
                     while (received < target && std::chrono::steady_clock::now() < deadline) {
                       port.afterDelay(5).wait(waitScope);
                       fflush(out);
                       if (received != seen) {
                         seen = received;
                         deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
                       }
                     }
                     endReason = "the job exited";
                   }
                   if (exitWatcher) {
                     exitWatcher->stop();
                   }
                   // Detach: the subscription and the connection go; the job never noticed.
                 })) {
      fmt::print(stderr, "mostrace: {}\n", e->getDescription().cStr());
      status = 1;
    } else {
      fmt::print(stderr, "mostrace: Process {} detached{}\n", options.pid,
                 endReason.empty() ? "" : fmt::format(" ({})", endReason));
      if (sinkRef.dropped() > 0) {
        fmt::print(stderr, "mostrace: {} events lost (mostrace fell behind)\n", sinkRef.dropped());
      }
    }
    for (auto& s : signals) {
      uv_close(reinterpret_cast<uv_handle_t*>(&s), nullptr);
    }
  }
  uv_run(&loop, UV_RUN_NOWAIT);
  uv_loop_close(&loop);
  if (options.summary && status == 0) {
    fmt::print(out, "{}", summary.render());
  }
  return status;
}

int run(int argc, char** argv) {
  CLI::App app(
      "traces the system calls a umosix job's user part makes on a remote node, in "
      "strace's notation",
      "mostrace");
  Options o;
  app.add_option("-p,--pid", o.pid, "the job to trace (its pid at home)")->required();
  app.add_flag("-c,--summary-only", o.summary,
               "count calls, errors and latency per syscall and per route; print at detach");
  app.add_option("-e", o.expressions,
                 "trace=NAME,CLASS,... (classes: file, network, process, "
                 "signal, desc, memory, ipc; ! negates)");
  app.add_option("-s,--string-limit", o.stringLimit, "bytes of strings and buffers shown (32)");
  app.add_flag("-T,--syscall-times", o.durations,
               "time of each call, and for forwarded ones the time at home and in transit");
  app.add_flag("-r,--relative-timestamps", o.relative, "time since the previous call");
  app.add_flag("-t", o.timestamps, "wall clock time; -tt with microseconds, -ttt epoch seconds");
  app.add_flag("-Z,--failed", o.failed, "only calls that failed");
  app.add_flag("-k,--stack-trace", o.stacks,
               "the guest's user-space stack at each call, unwound on the remote node");
  app.add_option("-o,--output", o.output, "write the trace to FILE instead of stderr");
  app.add_option("--map", o.mapPath, "cluster map file (default $UMOSIX_MAP or /etc/umosix/map)");
  app.add_option("--node", o.nodeText,
                 "this node's id (default $UMOSIX_NODE or the local address)");
  app.add_option("--port", o.portText, "mosd's TCP port (default $UMOSIX_PORT or 7151)");
  app.add_option("--key", o.keyPath,
                 "cluster key file (default $UMOSIX_KEY or /etc/umosix/cluster.key)");
  app.add_option("--timeout", o.timeoutMs, "how long to wait for mosd, in milliseconds (3000)");
  app.add_option("--job-node", o.jobNode,
                 "the node where the job runs (default: ask this node's mosd); the "
                 "subscription may precede the job's arrival there");
  app.add_option("--ready-fd", o.readyFd, "write one byte to descriptor FD once subscribed");
  app.set_version_flag("--version", UMOSIX_VERSION);
  CLI11_PARSE(app, argc, argv);
  initLogging("mostrace", spdlog::level::warn);

  for (const std::string& e : o.expressions) {
    try {
      TraceFilter::parse(e);
    } catch (const std::invalid_argument& error) {
      fmt::print(stderr, "mostrace: {}\n", error.what());
      return 2;
    }
    if (e.find('=') != std::string::npos && !e.starts_with("trace=")) {
      fmt::print(stderr, "mostrace: only -e trace=... is supported\n");
      return 2;
    }
  }

  NodeConfig config;
  std::optional<MapFile> map;
  std::optional<ClusterCredentials> credentials;
  KJ_IF_MAYBE (
      e, kj::runCatchingExceptions([&]() {
        config = configFromEnvironment();
        if (!o.mapPath.empty()) config.mapPath = o.mapPath;
        if (!o.nodeText.empty()) config.nodeId = parseNodeId(o.nodeText, "--node");
        if (!o.portText.empty()) config.port = parsePort(o.portText, "--port");
        if (!o.keyPath.empty()) config.keyPath = o.keyPath;
        map.emplace(MapFile::fromPath(config.mapPath));
        resolveNodeId(config, *map);
        credentials.emplace(ClusterCredentials{config.nodeId, ClusterKey::load(config.keyPath)});
      })) {
    fmt::print(stderr, "mostrace: {}\n", e->getDescription().cStr());
    return 2;
  }

  // Where does the job's user part run? The home mosd knows.
  std::optional<JobInfo> job;
  if (o.jobNode) {
    job = JobInfo{};
    job->homePid = o.pid;
    job->node = *o.jobNode;
    job->homeNode = config.nodeId;
  }
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() {
                 if (job) return;
                 for (JobInfo& j :
                      listJobs(*credentials, *map, config.nodeId, config.port, o.timeoutMs)) {
                   if (j.homePid == o.pid) job = j;
                 }
               })) {
    fmt::print(stderr, "mostrace: {}\n", e->getDescription().cStr());
    return 1;
  }
  if (!job) {
    fmt::print(stderr, "mostrace: attach: no job with pid {} has its home on node {}\n", o.pid,
               config.nodeId);
    return 1;
  }
  if (job->node == job->homeNode) {
    fmt::print(stderr,
               "mostrace: job {} runs at home ({}): no call is trapped or forwarded; use strace "
               "-p {} while it is home\n",
               o.pid, job->state, o.pid);
    return 1;
  }
  Ipv4 address;
  KJ_IF_MAYBE (a, map->lookup(job->node)) {
    address = *a;
  } else {
    fmt::print(stderr, "mostrace: job {} runs on node {}, which is not in {}\n", o.pid, job->node,
               config.mapPath);
    return 1;
  }

  FILE* out = stderr;
  if (!o.output.empty()) {
    out = fopen(o.output.c_str(), "we");
    if (out == nullptr) {
      fmt::print(stderr, "mostrace: cannot write {}: {}\n", o.output, strerror(errno));
      return 2;
    }
  }
  int status = trace(o, *credentials, address, config.port, job->node, config.nodeId, out);
  if (out != stderr) {
    fclose(out);
  }
  return status;
}

}  // namespace
}  // namespace mos

int main(int argc, char** argv) { return mos::run(argc, argv); }
