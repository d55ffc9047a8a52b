#pragma once
// The client side of a node's mosd control service (protocol/node.capnp): connect, say
// "UMOSRPC1", prove cluster membership (cluster_auth.h), bootstrap Node. Used by mps, and by
// mosrun to check a node before migrating.

#include <capnp/rpc-twoparty.h>
#include <kj/async.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cluster_auth.h"
#include "map_file.h"
#include "node.capnp.h"
#include "uv_event_port.h"

namespace mos {

// A node's answer to status(), as plain data.
struct NodeStatus {
  uint32_t nodeId = 0;
  std::string version;
  double load = 0;  // 1-minute load average
  uint32_t guests = 0;
  uint32_t cpus = 0;
};

// One job as listed by listJobs()/listGuests(), as plain data (see proto::JobInfo).
struct JobInfo {
  int32_t homePid = 0;
  std::string command;
  uint32_t node = 0;  // where the user part runs now
  std::string state;  // "home", "migrating", "remote", "exited"
  uint64_t syscalls = 0;
  int32_t remotePid = 0;
  uint32_t homeNode = 0;
  int32_t parentPid = 0;        // listJobs: the parent at home; 0 unknown
  uint32_t threads = 0;         // 0 unknown
  std::string stay;             // listGuests: why the guest stays on its node ("" none)
  uint32_t moves = 0;           // listJobs: moves of the user part between nodes
  std::vector<uint32_t> trail;  // listJobs: the nodes it has run on, oldest first
};

// An open RPC connection to one mosd.
class NodeConnection {
 public:
  // Connects to mosd at address:port on `loop`, sends the RPC hello, answers its challenge with
  // `credentials` (cluster_auth.h) and bootstraps Node. Rejects with a DISCONNECTED
  // kj::Exception, "cannot reach mosd at A:P: Connection refused", "mosd at A:P did not answer
  // within N ms" or "mosd at A:P refused node N (is KEYFILE the cluster's key?)", when the
  // connection is refused, the node is unreachable, the connect and handshake take longer than
  // `timeoutMs`, or mosd closes the connection instead of accepting the proof.
  // `credentials` is only used before the returned promise resolves.
  static kj::Promise<kj::Own<NodeConnection>> connect(UvEventPort& loop,
                                                      const ClusterCredentials& credentials,
                                                      Ipv4 address, uint16_t port,
                                                      uint32_t timeoutMs);

  NodeConnection(kj::Own<UvFdStream> stream, kj::String where);
  KJ_DISALLOW_COPY(NodeConnection);

  proto::Node::Client node() { return node_; }
  // "10.0.0.2:7151", for messages.
  kj::StringPtr where() const { return where_; }

 private:
  kj::Own<UvFdStream> stream_;
  kj::String where_;
  capnp::TwoPartyClient client_;  // after stream_: destroyed first
  proto::Node::Client node_;
};

// Converters from the wire.
NodeStatus toNodeStatus(proto::NodeStatus::Reader status);
std::vector<JobInfo> toJobInfos(capnp::List<proto::JobInfo>::Reader jobs);

// Synchronous conveniences: each runs its own private libuv loop (so it must not be called on a
// thread whose KJ event loop is active), and the whole exchange (connect, handshake, call) is
// bounded by `timeoutMs`. Every failure is a kj::Exception of type DISCONNECTED whose
// description names the node: "cannot reach mosd at 127.0.0.1:7151: Connection refused", "mosd
// at 10.0.0.2:7151 did not answer within 500 ms", "mosd at ...: <what went wrong>".
NodeStatus queryStatus(const ClusterCredentials& credentials, Ipv4 address, uint16_t port,
                       uint32_t timeoutMs);
std::vector<JobInfo> listJobs(const ClusterCredentials& credentials, Ipv4 address, uint16_t port,
                              uint32_t timeoutMs);
std::vector<JobInfo> listGuests(const ClusterCredentials& credentials, Ipv4 address, uint16_t port,
                                uint32_t timeoutMs);

// Node.inspectJob(pid) and Node.inspectGuest(homePid, homeNode) (protocol/inspect.capnp, mps -d):
// the view, copied into a message of its own (its root).
kj::Own<capnp::MallocMessageBuilder> inspectJob(const ClusterCredentials& credentials, Ipv4 address,
                                                uint16_t port, uint32_t timeoutMs, int32_t pid);
kj::Own<capnp::MallocMessageBuilder> inspectGuest(const ClusterCredentials& credentials,
                                                  Ipv4 address, uint16_t port, uint32_t timeoutMs,
                                                  int32_t homePid, uint32_t homeNode);

// The same, addressing node `nodeId` of `map`. A node that is not in the map throws
// kj::Exception (FAILED) "node N is not in the cluster map" before any connection is tried.
NodeStatus queryStatus(const ClusterCredentials& credentials, const MapFile& map, uint32_t nodeId,
                       uint16_t port, uint32_t timeoutMs);
std::vector<JobInfo> listJobs(const ClusterCredentials& credentials, const MapFile& map,
                              uint32_t nodeId, uint16_t port, uint32_t timeoutMs);

}  // namespace mos
