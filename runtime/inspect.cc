#include "inspect.h"

#include <dirent.h>
#include <limits.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <sstream>
#include <vector>

#include "job_registry.h"
#include "syscall_table.h"

namespace mos {

namespace {

std::string readLink(const std::string& path) {
  char buffer[PATH_MAX + 1];
  ssize_t n = readlink(path.c_str(), buffer, PATH_MAX);
  return n < 0 ? std::string() : std::string(buffer, n);
}

capnp::Data::Reader bytes(const std::string& text) {
  return capnp::Data::Reader(reinterpret_cast<const kj::byte*>(text.data()), text.size());
}

// A "Key:\tvalue" line of a /proc status-like file, or "".
std::string field(const std::string& text, const std::string& key) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.compare(0, key.size(), key) == 0 && line.size() > key.size() &&
        line[key.size()] == ':') {
      size_t at = line.find_first_not_of(" \t", key.size() + 1);
      return at == std::string::npos ? std::string() : line.substr(at);
    }
  }
  return std::string();
}

uint64_t number(const std::string& text, int base) {
  if (text.empty()) {
    return 0;
  }
  try {
    return std::stoull(text, nullptr, base);
  } catch (...) {
    return 0;
  }
}

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream all;
  all << in.rdbuf();
  return all.str();
}

void fillRoute(proto::RouteStats::Builder out, const char* name, const RouteSnapshot& route) {
  out.setRoute(name);
  out.setCalls(route.calls);
  out.setTotalUs(route.totalUs);
  out.setMaxUs(route.maxUs);
}

}  // namespace

void inspectDeputy(const std::string& runDir, uint32_t nodeId, int32_t pid,
                   proto::DeputyView::Builder view) {
  JobSnapshot job;
  StatsSnapshot stats;
  if (pid <= 0 || !readJobRecord(runDir, "jobs", pid, job, stats)) {
    if (pid <= 0 || (kill(pid, 0) != 0 && errno == ESRCH)) {
      view.setError("no process with pid " + std::to_string(pid));
    } else {
      view.setError("process " + std::to_string(pid) +
                    " is not a umosix job process (no job record on node " +
                    std::to_string(nodeId) + ")");
    }
    return;
  }
  std::string proc = "/proc/" + std::to_string(pid);
  view.setHomePid(job.homePid);
  view.setHomeNode(job.homeNode);
  view.setCommand(job.command);
  view.setState(jobStateName(job.state));
  view.setNode(job.node);
  view.setSinceNs(stats.sinceNs);
  view.setRemotePid(job.remotePid);
  view.setCwd(bytes(readLink(proc + "/cwd")));
  view.setSyscalls(job.syscalls);
  view.setBytesIn(stats.bytesIn);
  view.setBytesOut(stats.bytesOut);
  view.setStayReason(stats.stayReason);
  fillRoute(view.initHome(), "home", stats.routes[0]);

  std::string status = readFile(proc + "/status");
  auto signals = view.initSignals();
  signals.setPending(number(field(status, "SigPnd"), 16) | number(field(status, "ShdPnd"), 16));
  signals.setBlocked(number(field(status, "SigBlk"), 16));
  signals.setIgnored(number(field(status, "SigIgn"), 16));
  signals.setCaught(number(field(status, "SigCgt"), 16));

  std::vector<int> fds;
  if (DIR* dir = opendir((proc + "/fd").c_str())) {
    while (dirent* entry = readdir(dir)) {
      if (entry->d_name[0] != '.') {
        fds.push_back(static_cast<int>(number(entry->d_name, 10)));
      }
    }
    closedir(dir);
  }
  std::sort(fds.begin(), fds.end());
  auto list = view.initFds(fds.size());
  for (size_t i = 0; i < fds.size(); i++) {
    std::string n = std::to_string(fds[i]);
    std::string info = readFile(proc + "/fdinfo/" + n);
    auto out = list[i];
    out.setFd(fds[i]);
    out.setTarget(bytes(readLink(proc + "/fd/" + n)));
    out.setFlags(static_cast<uint32_t>(number(field(info, "flags"), 8)));
    out.setOffset(number(field(info, "pos"), 10));
    out.setDeputy(std::find(stats.reserved.begin(), stats.reserved.end(), fds[i]) !=
                  stats.reserved.end());
  }

  uint64_t now = realtimeNs();
  auto calls = view.initInFlight(stats.inFlight.size());
  for (size_t i = 0; i < stats.inFlight.size(); i++) {
    const CallSnapshot& call = stats.inFlight[i];
    auto out = calls[i];
    out.setTid(call.tid);
    out.setNr(call.nr);
    const SyscallEntry* entry = findSyscall(call.nr);
    out.setName(entry != nullptr ? entry->name : ("syscall_" + std::to_string(call.nr)).c_str());
    auto args = out.initArgs(6);
    for (unsigned a = 0; a < 6; a++) {
      args.set(a, call.args[a]);
    }
    out.setStartNs(call.startNs);
    out.setElapsedUs(now > call.startNs ? (now - call.startNs) / 1000 : 0);
  }
}

void inspectGuest(const std::string& runDir, uint32_t nodeId, int32_t homePid, uint32_t homeNode,
                  proto::GuestView::Builder view) {
  view.setNode(nodeId);
  for (const JobSnapshot& guest : readJobRecords(runDir, "guests")) {
    if (guest.homePid != homePid || guest.homeNode != homeNode) {
      continue;
    }
    JobSnapshot job;
    StatsSnapshot stats;
    if (!readJobRecord(runDir, "guests", guest.ownerPid, job, stats)) {
      continue;
    }
    view.setFound(true);
    view.setRemotePid(job.remotePid);
    auto routes = view.initRoutes(JobStats::ROUTES);
    for (int i = 0; i < JobStats::ROUTES; i++) {
      fillRoute(routes[i], ROUTE_NAMES[i], stats.routes[i]);
    }
    view.setCacheHits(stats.cacheHits);
    view.setCacheMisses(stats.cacheMisses);
    view.setCacheBytes(stats.cacheBytes);
    view.setBytesIn(stats.bytesIn);
    view.setBytesOut(stats.bytesOut);
    view.setStayReason(stats.stayReason);
    view.setSinceNs(stats.sinceNs);
    return;
  }
}

}  // namespace mos
