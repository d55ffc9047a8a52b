// mps: lists every process of the jobs whose home is this node, as the local mosd reports them,
// with why a guest stays on its node as that node's mosd reports it (docs/mps.1.md).

#include <fmt/format.h>
#include <kj/debug.h>

#include <fcntl.h>

#include <climits>
#include <cstdlib>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>
#include <map>
#include <optional>
#include <set>
#include <string>

#include "config.h"
#include "inspect.capnp.h"
#include "inspect.h"
#include "job_registry.h"
#include "log.h"
#include "map_file.h"
#include "node_client.h"
#include "syscall_table.h"
#include "trace_format.h"

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
          if (!guest.stay.empty()) {
            row.home.stay = guest.stay;  // else the deputy's own (a lock)
          }
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
  fmt::print("{:>7}  {:>7}  {:<6}  {:<9}  {:>3}  {:>5}  {:>9}  {}\n", "PID", "PPID", "WHERE",
             "STATE", "THR", "MOVES", "SYSCALLS", "COMMAND");
  for (const ProcessRow& row : rows) {
    const JobInfo& p = row.home;
    fmt::print("{:>7}  {:>7}  {:<6}  {:<9}  {:>3}  {:>5}  {:>9}  {}\n", p.homePid,
               orDash(p.parentPid), where(p), p.state, orDash(p.threads), p.moves, p.syscalls,
               p.command);
    if (!p.stay.empty()) {
      fmt::print(
          "{:>7}  stays on {}: {}\n", "",
          p.node == p.homeNode ? std::string("its home node") : "node " + std::to_string(p.node),
          p.stay);
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
                     {"moves", p.moves},
                     {"trail", p.trail},
                     {"command", p.command}});
  }
  fmt::print("{}\n", array.dump(2));
}

// --- mps -d: the deputy's view of one job process (protocol/inspect.capnp)

std::string text(capnp::Data::Reader data) {
  return std::string(reinterpret_cast<const char*>(data.begin()), data.size());
}

// "SIGINT,SIGTERM", or "-" for none.
std::string signalSet(uint64_t mask) {
  std::string out;
  for (int sig = 1; sig <= 64; sig++) {
    if (mask & (uint64_t{1} << (sig - 1))) {
      out += (out.empty() ? "" : ",") + signalName(sig);
    }
  }
  return out.empty() ? "-" : out;
}

// open(2) flags of an fdinfo line: the access mode and the flags that matter to a reader.
std::string fdFlags(uint32_t flags) {
  std::string out = (flags & O_ACCMODE) == O_WRONLY ? "O_WRONLY"
                    : (flags & O_ACCMODE) == O_RDWR ? "O_RDWR"
                                                    : "O_RDONLY";
  const std::pair<uint32_t, const char*> names[] = {
      {O_APPEND, "O_APPEND"},       {O_NONBLOCK, "O_NONBLOCK"}, {O_CLOEXEC, "O_CLOEXEC"},
      {O_DIRECTORY, "O_DIRECTORY"}, {O_PATH, "O_PATH"},         {O_SYNC, "O_SYNC"}};
  for (auto [bit, name] : names) {
    if ((flags & bit) == bit) {
      out += std::string("|") + name;
    }
  }
  return out;
}

// `read(3, 0x7ffd5e1c2a40, 65536)`: descriptors and values in decimal, pointers in hex.
std::string callText(proto::CallInFlight::Reader call) {
  const SyscallEntry* entry = findSyscall(call.getNr());
  std::string out = std::string(call.getName().cStr()) + "(";
  int count = 6;
  if (entry != nullptr) {
    count = 0;
    for (int i = 0; i < 6; i++) {
      if (entry->args[i].kind != ArgKind::NONE) {
        count = i + 1;
      }
    }
  }
  for (int i = 0; i < count; i++) {
    uint64_t v = call.getArgs()[i];
    ArgKind kind = entry != nullptr ? entry->args[i].kind : ArgKind::VAL;
    bool decimal = kind == ArgKind::FD || kind == ArgKind::NEW_FD || kind == ArgKind::VAL;
    out += (i > 0 ? ", " : "") +
           (decimal ? std::to_string(static_cast<int64_t>(v)) : fmt::format("{:#x}", v));
  }
  return out + ")";
}

std::string clockTime(uint64_t ns) {
  if (ns == 0) {
    return "unknown";
  }
  time_t seconds = static_cast<time_t>(ns / 1000000000);
  struct tm tm;
  gmtime_r(&seconds, &tm);
  char buffer[32];
  strftime(buffer, sizeof(buffer), "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buffer;
}

std::string duration(uint64_t us) {
  if (us < 1000) {
    return fmt::format("{} us", us);
  }
  if (us < 1000000) {
    return fmt::format("{:.1f} ms", us / 1000.0);
  }
  return fmt::format("{:.3f} s", us / 1e6);
}

std::string routeText(proto::RouteStats::Reader r) {
  if (r.getCalls() == 0) {
    return "0";
  }
  return fmt::format("{} (mean {}, max {})", r.getCalls(), duration(r.getTotalUs() / r.getCalls()),
                     duration(r.getMaxUs()));
}

void printDeputyView(proto::DeputyView::Reader view, kj::Maybe<proto::GuestView::Reader> guest,
                     const std::string& guestError) {
  uint64_t now = realtimeNs();
  bool remote = view.getNode() != view.getHomeNode();
  fmt::print("job process {} ({}), home node {}\n", view.getHomePid(), view.getCommand().cStr(),
             view.getHomeNode());
  std::string where =
      remote ? fmt::format("node {} (pid {} there)", view.getNode(), view.getRemotePid())
             : std::string("home");
  uint64_t since = view.getSinceNs();
  fmt::print("  user part     {}, {} since {} ({} ago)\n", where, view.getState().cStr(),
             clockTime(since), since != 0 && now > since ? duration((now - since) / 1000) : "?");
  fmt::print("  cwd           {}\n", text(view.getCwd()));
  fmt::print("  stay reason   {}\n",
             view.getStayReason().size() > 0 ? view.getStayReason().cStr() : "none");
  auto sig = view.getSignals();
  fmt::print("  signals       pending {}  blocked {}  ignored {}  caught {}\n",
             signalSet(sig.getPending()), signalSet(sig.getBlocked()), signalSet(sig.getIgnored()),
             signalSet(sig.getCaught()));
  if (view.getInFlight().size() == 0) {
    fmt::print("  in flight     none\n");
  }
  for (auto call : view.getInFlight()) {
    fmt::print("  in flight     {}  tid {}  for {}\n", callText(call), call.getTid(),
               duration(call.getElapsedUs()));
  }
  auto home = view.getHome();
  fmt::print("  at home       {} calls answered; {} executed here{}\n", view.getSyscalls(),
             home.getCalls(),
             home.getCalls() == 0
                 ? std::string()
                 : fmt::format(", mean {}, max {}", duration(home.getTotalUs() / home.getCalls()),
                               duration(home.getMaxUs())));
  fmt::print("  channel       {} bytes in, {} bytes out (at home)\n", view.getBytesIn(),
             view.getBytesOut());
  if (remote) {
    KJ_IF_MAYBE (g, guest) {
      if (g->getFound()) {
        for (auto r : g->getRoutes()) {
          fmt::print("  {:<13} {} (node {}: trap to answer)\n", r.getRoute().cStr(), routeText(r),
                     g->getNode());
        }
        fmt::print("  content cache {} hits, {} misses, {} bytes fetched (node {})\n",
                   g->getCacheHits(), g->getCacheMisses(), g->getCacheBytes(), g->getNode());
        if (g->getStayReason().size() > 0) {
          fmt::print("  remote stay   {}\n", g->getStayReason().cStr());
        }
      } else {
        fmt::print("  remote        node {} has no record of this process (partial view)\n",
                   view.getNode());
      }
    } else {
      fmt::print("  remote        unavailable: {}\n", guestError);
    }
  }
  fmt::print("{:>5}  {:<26} {:>10}  {}\n", "FD", "FLAGS", "OFFSET", "TARGET");
  for (auto fd : view.getFds()) {
    fmt::print("{:>5}  {:<26} {:>10}  {}{}\n", fd.getFd(), fdFlags(fd.getFlags()), fd.getOffset(),
               text(fd.getTarget()), fd.getDeputy() ? "  (deputy's own)" : "");
  }
}

nlohmann::json routeJson(proto::RouteStats::Reader r) {
  return {{"route", r.getRoute().cStr()},
          {"calls", r.getCalls()},
          {"totalUs", r.getTotalUs()},
          {"maxUs", r.getMaxUs()}};
}

nlohmann::json deputyViewJson(proto::DeputyView::Reader view,
                              kj::Maybe<proto::GuestView::Reader> guest,
                              const std::string& guestError) {
  uint64_t now = realtimeNs();
  nlohmann::json fds = nlohmann::json::array();
  for (auto fd : view.getFds()) {
    fds.push_back({{"fd", fd.getFd()},
                   {"target", text(fd.getTarget())},
                   {"flags", fd.getFlags()},
                   {"flagNames", fdFlags(fd.getFlags())},
                   {"offset", fd.getOffset()},
                   {"deputy", fd.getDeputy()}});
  }
  nlohmann::json calls = nlohmann::json::array();
  for (auto call : view.getInFlight()) {
    nlohmann::json args = nlohmann::json::array();
    for (auto a : call.getArgs()) {
      args.push_back(a);
    }
    calls.push_back({{"tid", call.getTid()},
                     {"nr", call.getNr()},
                     {"syscall", call.getName().cStr()},
                     {"call", callText(call)},
                     {"args", args},
                     {"startNs", call.getStartNs()},
                     {"elapsedUs", call.getElapsedUs()}});
  }
  auto sig = view.getSignals();
  nlohmann::json out = {
      {"pid", view.getHomePid()},
      {"homeNode", view.getHomeNode()},
      {"command", view.getCommand().cStr()},
      {"state", view.getState().cStr()},
      {"node", view.getNode()},
      {"remotePid", view.getRemotePid()},
      {"sinceNs", view.getSinceNs()},
      {"nowNs", now},
      {"cwd", text(view.getCwd())},
      {"stayReason", view.getStayReason().size() > 0 ? view.getStayReason().cStr() : "none"},
      {"signals",
       {{"pending", signalSet(sig.getPending())},
        {"blocked", signalSet(sig.getBlocked())},
        {"ignored", signalSet(sig.getIgnored())},
        {"caught", signalSet(sig.getCaught())},
        {"pendingMask", sig.getPending()},
        {"blockedMask", sig.getBlocked()}}},
      {"inFlight", calls},
      {"home", routeJson(view.getHome())},
      {"syscalls", view.getSyscalls()},
      {"bytesIn", view.getBytesIn()},
      {"bytesOut", view.getBytesOut()},
      {"fds", fds},
  };
  nlohmann::json remote = nullptr;
  if (view.getNode() != view.getHomeNode()) {
    KJ_IF_MAYBE (g, guest) {
      nlohmann::json routes = nlohmann::json::array();
      for (auto r : g->getRoutes()) {
        routes.push_back(routeJson(r));
      }
      remote = {{"node", g->getNode()},
                {"found", g->getFound()},
                {"remotePid", g->getRemotePid()},
                {"routes", routes},
                {"cacheHits", g->getCacheHits()},
                {"cacheMisses", g->getCacheMisses()},
                {"cacheBytes", g->getCacheBytes()},
                {"bytesIn", g->getBytesIn()},
                {"bytesOut", g->getBytesOut()},
                {"stayReason", g->getStayReason().cStr()},
                {"sinceNs", g->getSinceNs()}};
    } else {
      remote = {{"node", view.getNode()}, {"found", false}, {"error", guestError}};
    }
  }
  out["remote"] = remote;
  return out;
}

// mps -d PID: asks the home mosd for the deputy's view, then the mosd of the node where the user
// part runs for the remote numbers (as mostrace does). Returns the exit status.
int inspect(int32_t pid, bool json, const NodeConfig& config, const MapFile& map, Ipv4 address,
            const ClusterCredentials& credentials, uint32_t timeoutMs) {
  kj::Own<capnp::MallocMessageBuilder> deputy;
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() {
                 deputy = inspectJob(credentials, address, config.port, timeoutMs, pid);
               })) {
    fmt::print(stderr, "mps: {}\n", e->getDescription().cStr());
    return 1;
  }
  auto view = deputy->getRoot<proto::DeputyView>().asReader();
  if (view.getError().size() > 0) {
    fmt::print(stderr, "mps: {}\n", view.getError().cStr());
    return 1;
  }
  kj::Own<capnp::MallocMessageBuilder> guestMessage;
  kj::Maybe<proto::GuestView::Reader> guest;
  std::string guestError;
  if (view.getNode() != view.getHomeNode()) {
    KJ_IF_MAYBE (node, map.lookup(view.getNode())) {
      KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() {
                     guestMessage = inspectGuest(credentials, *node, config.port, timeoutMs, pid,
                                                 view.getHomeNode());
                   })) {
        guestError = e->getDescription().cStr();
      } else {
        guest = guestMessage->getRoot<proto::GuestView>().asReader();
      }
    } else {
      guestError = fmt::format("node {} is not in {}", view.getNode(), config.mapPath);
    }
  }
  if (json) {
    fmt::print("{}\n", deputyViewJson(view, guest, guestError).dump(2));
  } else {
    printDeputyView(view, guest, guestError);
  }
  return 0;
}

int run(int argc, char** argv) {
  CLI::App app(
      "lists every process of the umosix jobs whose home is this node: where each one "
      "runs now, and why it stays there",
      "mps");
  bool json = false;
  std::string mapPath, nodeText, portText, keyPath;
  uint32_t timeoutMs = 3000;
  std::optional<std::string> deputyPid;
  app.add_flag("--json", json, "print a JSON array instead of a table");
  app.add_option("-d,--deputy", deputyPid,
                 "show the deputy's view of job process PID: where it runs, its fds, signals, "
                 "calls in flight at home, counters");
  app.add_option("--map", mapPath, "cluster map file (default $UMOSIX_MAP or /etc/umosix/map)");
  app.add_option("--node", nodeText, "this node's id (default $UMOSIX_NODE or the local address)");
  app.add_option("--port", portText, "mosd's TCP port (default $UMOSIX_PORT or 7151)");
  app.add_option("--key", keyPath,
                 "cluster key file (default $UMOSIX_KEY or /etc/umosix/cluster.key)");
  app.add_option("--timeout", timeoutMs, "how long to wait for mosd, in milliseconds (3000)");
  app.set_version_flag("--version", UMOSIX_VERSION);
  CLI11_PARSE(app, argc, argv);
  initLogging("mps", spdlog::level::warn);
  int32_t pid = 0;
  if (deputyPid) {
    char* end = nullptr;
    long value = strtol(deputyPid->c_str(), &end, 10);
    if (deputyPid->empty() || *end != '\0' || value <= 0 || value > INT32_MAX) {
      fmt::print(stderr, "mps: -d: '{}' is not a process id\n", *deputyPid);
      return 2;
    }
    pid = static_cast<int32_t>(value);
  }

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

  if (deputyPid) {
    return inspect(pid, json, config, MapFile::fromPath(config.mapPath), address, *credentials,
                   timeoutMs);
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
