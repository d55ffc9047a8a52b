// mosd: the umosix node daemon (docs/mosd.8.md). Listens on this node's map address, accepts
// connections from cluster members only, and dispatches on the 8-byte hello:
//   "UMOSRPC1"  serve the Node control interface (protocol/node.capnp) on the connection;
//   "UMOSJOB1"  hand the connection to a new mos-supervisor as its fd 3 (protocol/job.capnp).
// Before either, the peer proves that it is a cluster member: the challenge-response of
// runtime/cluster_auth.h (nonce, HMAC over the cluster key and its node id, accept byte).
// Supervisors are mosd's only children; mosd reaps them and kills them when it is stopped.

#include <capnp/rpc-twoparty.h>
#include <fcntl.h>
#include <kj/debug.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "channel.h"
#include "cluster_auth.h"
#include "config.h"
#include "inspect.h"
#include "job_registry.h"
#include "log.h"
#include "map_file.h"
#include "node.capnp.h"
#include "programs.h"
#include "stay_reason.h"
#include "trace_channel.h"
#include "uv_event_port.h"

#ifndef UMOSIX_VERSION
#define UMOSIX_VERSION "unknown"
#endif

namespace mos {
namespace {

constexpr uint64_t HELLO_TIMEOUT_MS = 5000;

void fillJobs(capnp::List<proto::JobInfo>::Builder out, const std::vector<JobSnapshot>& jobs) {
  for (size_t i = 0; i < jobs.size(); i++) {
    const JobSnapshot& job = jobs[i];
    auto info = out[i];
    info.setHomePid(job.homePid);
    info.setCommand(job.command);
    info.setNode(job.node);
    info.setState(jobStateName(job.state));
    info.setSyscalls(job.syscalls);
    info.setRemotePid(job.remotePid);
    info.setHomeNode(job.homeNode);
    info.setMoves(job.moves);
    info.setStay(job.stay);
    auto trail = info.initTrail(job.trail.size());
    for (size_t k = 0; k < job.trail.size(); k++) {
      trail.set(k, job.trail[k]);
    }
  }
}

// Field `index` (1-based) of /proc/PID/stat after the command ("3": state, "4": ppid, "20":
// num_threads), or "" when the process is gone.
std::string procStatField(pid_t pid, int index) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t close = content.rfind(')');
  if (close == std::string::npos) {
    return "";
  }
  std::istringstream rest(content.substr(close + 1));
  std::string field;
  for (int i = 3; i <= index && rest >> field; i++) {
    if (i == index) {
      return field;
    }
  }
  return "";
}

uint32_t procThreads(pid_t pid) {
  std::string threads = procStatField(pid, 20);
  return threads.empty() ? 0 : static_cast<uint32_t>(std::stoul(threads));
}

// Jobs at home: each record is one process of a job (a deputy, or the job while it runs here);
// its parent and threads are the home kernel's.
void fillHomeProcesses(capnp::List<proto::JobInfo>::Builder out,
                       const std::vector<JobSnapshot>& jobs) {
  for (size_t i = 0; i < jobs.size(); i++) {
    std::string ppid = procStatField(jobs[i].homePid, 4);
    out[i].setParentPid(ppid.empty() ? 0 : std::stoi(ppid));
    out[i].setThreads(procThreads(jobs[i].homePid));
  }
}

// Guests here: their threads, and why each stays on this node (stay_reason.h), from the shared
// mappings of the guests of the same job (one supervisor serves every guest of a job here).
void fillGuestProcesses(capnp::List<proto::JobInfo>::Builder out,
                        const std::vector<JobSnapshot>& guests) {
  std::map<std::pair<uint32_t, int32_t>, std::vector<size_t>> byJob;  // (home, owner) → guests
  for (size_t i = 0; i < guests.size(); i++) {
    out[i].setThreads(procThreads(guests[i].remotePid));
    byJob[{guests[i].homeNode, guests[i].ownerPid}].push_back(i);
  }
  for (auto& [job, members] : byJob) {
    std::vector<GuestMaps> maps;
    for (size_t i : members) {
      std::ifstream in("/proc/" + std::to_string(guests[i].remotePid) + "/maps");
      std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      maps.push_back(GuestMaps{guests[i].homePid, sharedMappings(content)});
    }
    auto reasons = stayReasons(maps);
    for (size_t k = 0; k < members.size(); k++) {
      out[members[k]].setStay(reasons[k]);
    }
  }
}

// The Node interface of protocol/node.capnp, answered from the job registry of RUN_DIR.
class NodeService final : public proto::Node::Server {
 public:
  NodeService(uint32_t nodeId, std::string runDir, TraceHub& traceHub)
      : nodeId_(nodeId), runDir_(kj::mv(runDir)), traceHub_(traceHub) {}

 protected:
  kj::Promise<void> status(StatusContext context) override {
    auto status = context.getResults().initStatus();
    status.setNodeId(nodeId_);
    status.setVersion(UMOSIX_VERSION);
    double load[1] = {0};
    if (getloadavg(load, 1) == 1) {
      status.setLoad(load[0]);
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    status.setCpus(cpus > 0 ? uint32_t(cpus) : 1);
    status.setGuests(readJobRecords(runDir_, "guests").size());
    return kj::READY_NOW;
  }

  kj::Promise<void> listJobs(ListJobsContext context) override {
    auto jobs = readJobRecords(runDir_, "jobs");
    auto out = context.getResults().initJobs(jobs.size());
    fillJobs(out, jobs);
    fillHomeProcesses(out, jobs);
    return kj::READY_NOW;
  }

  kj::Promise<void> listGuests(ListGuestsContext context) override {
    auto jobs = readJobRecords(runDir_, "guests");
    auto out = context.getResults().initJobs(jobs.size());
    fillJobs(out, jobs);
    fillGuestProcesses(out, jobs);
    return kj::READY_NOW;
  }

  // mps -d (protocol/inspect.capnp): read from the records and /proc, never from the deputy.
  kj::Promise<void> inspectJob(InspectJobContext context) override {
    inspectDeputy(runDir_, nodeId_, context.getParams().getPid(), context.getResults().initView());
    return kj::READY_NOW;
  }

  kj::Promise<void> inspectGuest(InspectGuestContext context) override {
    auto params = context.getParams();
    mos::inspectGuest(runDir_, nodeId_, params.getHomePid(), params.getHomeNode(),
                      context.getResults().initView());
    return kj::READY_NOW;
  }

  // The trace stream of one job's calls trapped on this node (protocol/trace.capnp).
  kj::Promise<void> traceJob(TraceJobContext context) override {
    auto params = context.getParams();
    uint32_t homeNode = params.getHomeNode() == 0 ? nodeId_ : params.getHomeNode();
    context.getResults().setSubscription(
        traceHub_.subscribe(params.getHomePid(), homeNode, params.getFilter(), params.getSink()));
    return kj::READY_NOW;
  }

 private:
  uint32_t nodeId_;
  std::string runDir_;
  TraceHub& traceHub_;
};

struct Supervisor {
  uint32_t peerNode;
  std::string peer;
};

class Daemon final : private kj::TaskSet::ErrorHandler {
 public:
  Daemon(UvEventPort& port, NodeConfig config, MapFile map, Ipv4 address, ClusterKey key)
      : port_(port),
        config_(kj::mv(config)),
        map_(kj::mv(map)),
        key_(kj::mv(key)),
        traceHub_(port, config_.runDir),
        rpcServer_(kj::heap<NodeService>(config_.nodeId, config_.runDir, traceHub_)),
        listener_(port, makeSockaddr(address.value, config_.port)),
        tasks_(*this) {
    spdlog::info("node {} listening on {}:{} (map {}, {} nodes, key {})", config_.nodeId,
                 address.toString(), config_.port, config_.mapPath, map_.size(), config_.keyPath);
    tasks_.add(traceHub_.run());  // receives supervisors' trace events until mosd stops
  }

  // Accepts connections until an unrecoverable accept error (then rejects). A connection that
  // cannot be set up is closed and logged; it never ends the loop.
  kj::Promise<void> acceptLoop() {
    return listener_.accept().then([this](UvTcpListener::Accepted accepted) {
      KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() { handleConnection(kj::mv(accepted)); })) {
        spdlog::warn("connection closed: {}", e->getDescription().cStr());
      }
      return acceptLoop();
    });
  }

  // Reaps every exited supervisor (SIGCHLD). Supervisors are mosd's only children.
  void reap() {
    for (;;) {
      int status;
      pid_t pid = waitpid(-1, &status, WNOHANG);
      if (pid <= 0) {
        return;
      }
      auto it = supervisors_.find(pid);
      std::string who = it == supervisors_.end()
                            ? fmt::format("child {}", pid)
                            : fmt::format("supervisor {} (job from node {} at {})", pid,
                                          it->second.peerNode, it->second.peer);
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        spdlog::info("{} exited", who);
      } else if (WIFEXITED(status)) {
        spdlog::warn("{} exited with status {}", who, WEXITSTATUS(status));
      } else if (WIFSIGNALED(status)) {
        spdlog::warn("{} killed by signal {} ({})", who, WTERMSIG(status),
                     strsignal(WTERMSIG(status)));
      }
      if (it != supervisors_.end()) {
        supervisors_.erase(it);
      }
    }
  }

  // SIGKILLs every supervisor (their guests die with them: a guest is the supervisor's child
  // and dies with its seccomp listener) and reaps them.
  void killSupervisors() {
    for (auto& [pid, info] : supervisors_) {
      kill(pid, SIGKILL);
    }
    for (auto& [pid, info] : supervisors_) {
      int status;
      while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
    }
    if (!supervisors_.empty()) {
      spdlog::info("killed {} supervisor(s)", supervisors_.size());
    }
    supervisors_.clear();
  }

 private:
  void taskFailed(kj::Exception&& exception) override {
    spdlog::warn("connection closed: {}", exception.getDescription().cStr());
  }

  // One connection's handshake state (cluster_auth.h): hello, nonce, proof.
  struct Handshake {
    kj::Own<UvFdStream> stream;
    Ipv4 peer;
    std::string peerText;
    uint32_t peerNode;  // the map's node for the peer's address
    char hello[AUTH_HELLO_BYTES];
    AuthNonce nonce;
    AuthProof proof;
  };

  void handleConnection(UvTcpListener::Accepted accepted) {
    Ipv4 peer{ntohl(accepted.peer.sin_addr.s_addr)};
    std::string peerText = fmt::format("{}:{}", peer.toString(), ntohs(accepted.peer.sin_port));
    uint32_t peerNode;
    KJ_IF_MAYBE (node, map_.nodeOf(peer)) {
      peerNode = *node;
    } else {
      if (rejected_.insert(peer.value).second) {
        spdlog::warn("refusing connections from {}: not in the cluster map {}", peer.toString(),
                     config_.mapPath);
      }
      return;  // the descriptor closes here
    }
    auto handshake = kj::heap<Handshake>();
    handshake->stream = kj::heap<UvFdStream>(port_, kj::mv(accepted.fd));
    handshake->peer = peer;
    handshake->peerText = kj::mv(peerText);
    handshake->peerNode = peerNode;
    Handshake& h = *handshake;
    auto promise = port_
                       .timeoutAfter(HELLO_TIMEOUT_MS,
                                     kj::str("no complete handshake from ", h.peerText.c_str(),
                                             " within ", HELLO_TIMEOUT_MS, " ms"),
                                     authenticate(h))
                       .then([this, handshake = kj::mv(handshake)](
                                 kj::Maybe<uint32_t> node) mutable -> kj::Promise<void> {
                         KJ_IF_MAYBE (id, node) {
                           return serve(kj::mv(handshake), *id);
                         }
                         return kj::READY_NOW;
                       });
    tasks_.add(kj::mv(promise));
  }

  // Reads the hello, sends a nonce, reads and checks the proof, accepts. Resolves to the
  // authenticated node id, or to nullptr when the connection is to be closed (already logged).
  kj::Promise<kj::Maybe<uint32_t>> authenticate(Handshake& h) {
    return h.stream->tryRead(h.hello, sizeof(h.hello), sizeof(h.hello))
        .then([this, &h](size_t n) -> kj::Promise<kj::Maybe<uint32_t>> {
          if (n < sizeof(h.hello)) {
            spdlog::debug("{} closed before its hello", h.peerText);
            return kj::Maybe<uint32_t>(nullptr);
          }
          if (memcmp(h.hello, HELLO_RPC, sizeof(h.hello)) != 0 &&
              memcmp(h.hello, HELLO_JOB, sizeof(h.hello)) != 0) {
            spdlog::warn("bad hello from node {} ({}); closing the connection", h.peerNode,
                         h.peerText);
            return kj::Maybe<uint32_t>(nullptr);
          }
          h.nonce = makeNonce();
          return h.stream->write(h.nonce.data(), h.nonce.size())
              .then([&h]() {
                return h.stream->tryRead(h.proof.data(), h.proof.size(), h.proof.size());
              })
              .then([this, &h](size_t n) -> kj::Promise<kj::Maybe<uint32_t>> {
                if (n < h.proof.size()) {
                  spdlog::debug("{} closed during the handshake", h.peerText);
                  return kj::Maybe<uint32_t>(nullptr);
                }
                uint32_t claimed = proofNodeId(h.proof);
                KJ_IF_MAYBE (why, checkProof(h, claimed)) {
                  if (authFailed_.insert(h.peer.value).second) {
                    spdlog::warn("refusing a connection from {} claiming node {}: {}", h.peerText,
                                 claimed, *why);
                  } else {
                    spdlog::debug("refused again: a connection from {} claiming node {}: {}",
                                  h.peerText, claimed, *why);
                  }
                  return kj::Maybe<uint32_t>(nullptr);
                }
                authFailed_.erase(h.peer.value);  // a later failure is news again
                static const uint8_t accepted = AUTH_ACCEPTED;
                return h.stream->write(&accepted, 1).then([claimed]() {
                  return kj::Maybe<uint32_t>(claimed);
                });
              });
        });
  }

  // Why the proof of `h` for node `claimed` is refused, or nullptr when it is good.
  kj::Maybe<std::string> checkProof(const Handshake& h, uint32_t claimed) {
    KJ_IF_MAYBE (address, map_.lookup(claimed)) {
      if (address->value != h.peer.value) {
        return fmt::format("node {} has the address {} in {}", claimed, address->toString(),
                           config_.mapPath);
      }
    } else {
      return fmt::format("node {} is not in {}", claimed, config_.mapPath);
    }
    if (!key_.verify(kj::arrayPtr(h.hello, sizeof(h.hello)), h.nonce, h.proof)) {
      return fmt::format("wrong proof (its cluster key differs from {})", key_.origin());
    }
    return nullptr;
  }

  // Serves an authenticated connection by its hello.
  kj::Promise<void> serve(kj::Own<Handshake> h, uint32_t node) {
    if (memcmp(h->hello, HELLO_RPC, sizeof(h->hello)) == 0) {
      spdlog::debug("control connection from node {} ({})", node, h->peerText);
      auto& stream = *h->stream;
      return rpcServer_.accept(stream).attach(kj::mv(h));
    }
    startSupervisor(kj::mv(h->stream), node, h->peerText);
    return kj::READY_NOW;
  }

  // fork+exec mos-supervisor with the job connection as fd 3 (blocking, as the job channel
  // expects), nothing else inherited but 0-2, default signal handling.
  void startSupervisor(kj::Own<UvFdStream> stream, uint32_t peerNode, const std::string& peer) {
    std::string path;
    KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() { path = programPath("mos-supervisor"); })) {
      spdlog::error("cannot start a supervisor for a job from node {} ({}): {}", peerNode, peer,
                    e->getDescription().cStr());
      return;
    }
    kj::AutoCloseFd fd = stream->releaseFd();
    stream = nullptr;
    tuneJobSocket(fd.get());
    std::vector<std::string> args = {path,
                                     "--fd",
                                     "3",
                                     "--node",
                                     std::to_string(config_.nodeId),
                                     "--peer-node",
                                     std::to_string(peerNode),
                                     "--run-dir",
                                     config_.runDir,
                                     "--cache-dir",
                                     config_.cacheDir};
    std::vector<char*> argv;
    for (auto& a : args) {
      argv.push_back(a.data());
    }
    argv.push_back(nullptr);

    pid_t pid = fork();
    if (pid < 0) {
      spdlog::error("fork for a supervisor failed: {}", strerror(errno));
      return;
    }
    if (pid == 0) {
      // Child: only async-signal-safe calls from here to exec.
      int from = fd.get();
      if (from == 3) {
        fcntl(3, F_SETFD, 0);
      } else if (dup2(from, 3) < 0) {
        _exit(127);
      }
      int flags = fcntl(3, F_GETFL);
      fcntl(3, F_SETFL, flags & ~O_NONBLOCK);
      close_range(4, ~0U, 0);
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      for (int sig = 1; sig < NSIG; sig++) {
        sigaction(sig, &dfl, nullptr);  // fails harmlessly for SIGKILL, SIGSTOP, 32, 33
      }
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    supervisors_[pid] = Supervisor{peerNode, peer};
    spdlog::info("supervisor {} started for a job from node {} ({})", pid, peerNode, peer);
  }

  UvEventPort& port_;
  NodeConfig config_;
  MapFile map_;
  ClusterKey key_;
  TraceHub traceHub_;  // RUN_DIR/trace.sock: events from this node's supervisors
  capnp::TwoPartyServer rpcServer_;
  UvTcpListener listener_;
  std::map<pid_t, Supervisor> supervisors_;
  std::set<uint32_t> rejected_;    // peers already logged as non-members
  std::set<uint32_t> authFailed_;  // peers already logged as failing the handshake
  kj::TaskSet tasks_;              // last: connections die before what they use
};

// Writes RUN_DIR/mosd.pid; returns its path ("" when it could not be written).
std::string writePidFile(const std::string& runDir) {
  std::string path = runDir + "/mosd.pid";
  mkdir(runDir.c_str(), 0755);
  std::ofstream out(path);
  out << getpid() << "\n";
  out.close();
  if (!out) {
    spdlog::warn("cannot write {}", path);
    return "";
  }
  return path;
}

void removePidFile(const std::string& path) {
  if (path.empty()) {
    return;
  }
  std::ifstream in(path);
  pid_t pid = 0;
  in >> pid;
  if (pid == getpid()) {
    unlink(path.c_str());
  }
}

int run(int argc, char** argv) {
  CLI::App app(
      "umosix node daemon: serves this node's control interface and supervises the "
      "guests of jobs migrated here",
      "mosd");
  std::string mapPath, runDir, cacheDir, nodeText, portText, keyPath;
  bool foreground = false;
  app.add_option("--map", mapPath, "cluster map file (default $UMOSIX_MAP or /etc/umosix/map)");
  app.add_option("--node", nodeText, "this node's id (default $UMOSIX_NODE or the local address)");
  app.add_option("--port", portText, "TCP port (default $UMOSIX_PORT or 7151)");
  app.add_option("--key", keyPath,
                 "cluster key file (default $UMOSIX_KEY or /etc/umosix/cluster.key)");
  app.add_option("--run-dir", runDir, "job records and pid file (default /run/umosix)");
  app.add_option("--cache-dir", cacheDir, "file cache of guests (default /var/cache/umosix)");
  app.add_flag("--foreground,-f", foreground, "stay in the foreground (always the case)");
  app.set_version_flag("--version", UMOSIX_VERSION);
  CLI11_PARSE(app, argc, argv);

  initLogging("mosd", spdlog::level::info);

  NodeConfig config;
  kj::Maybe<MapFile> maybeMap;
  kj::Maybe<ClusterKey> maybeKey;
  Ipv4 address;
  // Configuration errors are kj::Exceptions with a one-line description for the user (config.h).
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() {
                 config = configFromEnvironment();
                 if (!mapPath.empty()) config.mapPath = mapPath;
                 if (!runDir.empty()) config.runDir = runDir;
                 if (!cacheDir.empty()) config.cacheDir = cacheDir;
                 if (!nodeText.empty()) config.nodeId = parseNodeId(nodeText, "--node");
                 if (!portText.empty()) config.port = parsePort(portText, "--port");
                 if (!keyPath.empty()) config.keyPath = keyPath;
                 auto map = MapFile::fromPath(config.mapPath);
                 address = resolveNodeId(config, map);
                 maybeMap = kj::mv(map);
                 maybeKey = ClusterKey::load(config.keyPath);
               })) {
    spdlog::error("{}", e->getDescription().cStr());
    return 2;
  }
  MapFile& map = KJ_ASSERT_NONNULL(maybeMap);
  ClusterKey& key = KJ_ASSERT_NONNULL(maybeKey);

  signal(SIGPIPE, SIG_IGN);
  uv_loop_t* loop = uv_default_loop();
  int exitCode = 0;
  std::string pidFile;
  {
    UvEventPort port(loop);
    kj::WaitScope waitScope(port.kjLoop());

    kj::Maybe<kj::Own<Daemon>> maybeDaemon;
    KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() {
                   maybeDaemon = kj::heap<Daemon>(port, config, kj::mv(map), address, kj::mv(key));
                 })) {
      spdlog::error("{}", e->getDescription().cStr());  // "cannot listen on A:P: strerror"
      return 1;
    }
    Daemon& daemon = *KJ_ASSERT_NONNULL(maybeDaemon);
    pidFile = writePidFile(config.runDir);

    auto stop = kj::newPromiseAndFulfiller<int>();
    struct Signals {
      uv_signal_t term, interrupt, child;
    } signals;
    struct Context {
      Daemon* daemon;
      kj::PromiseFulfiller<int>* stop;
    } context{&daemon, stop.fulfiller.get()};
    for (uv_signal_t* s : {&signals.term, &signals.interrupt, &signals.child}) {
      uv_signal_init(loop, s);
      s->data = &context;
    }
    auto onStop = [](uv_signal_t* s, int signum) {
      auto* c = static_cast<Context*>(s->data);
      if (c->stop->isWaiting()) {
        c->stop->fulfill(kj::cp(signum));
      }
    };
    uv_signal_start(&signals.term, onStop, SIGTERM);
    uv_signal_start(&signals.interrupt, onStop, SIGINT);
    uv_signal_start(
        &signals.child, [](uv_signal_t* s, int) { static_cast<Context*>(s->data)->daemon->reap(); },
        SIGCHLD);

    auto accepting = daemon.acceptLoop().then([]() { return 1; },
                                              [](kj::Exception&& e) {
                                                spdlog::error("accepting connections failed: {}",
                                                              e.getDescription().cStr());
                                                return 1;
                                              });
    int result = stop.promise.exclusiveJoin(kj::mv(accepting)).wait(waitScope);
    if (result == SIGTERM || result == SIGINT) {
      spdlog::info("{}: stopping", strsignal(result));
    } else {
      exitCode = 1;
    }
    daemon.killSupervisors();
    maybeDaemon = nullptr;
    for (uv_signal_t* s : {&signals.term, &signals.interrupt, &signals.child}) {
      uv_close(reinterpret_cast<uv_handle_t*>(s), nullptr);
    }
    uv_run(loop, UV_RUN_NOWAIT);
  }
  removePidFile(pidFile);
  uv_loop_close(loop);
  return exitCode;
}

}  // namespace
}  // namespace mos

int main(int argc, char** argv) { return mos::run(argc, argv); }
