#include "node_client.h"

#include <kj/debug.h>

#include "channel.h"

namespace mos {

namespace {

kj::Exception disconnected(kj::String description) {
  return kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__, kj::mv(description));
}

// Runs `body(connection)` against mosd at address:port on a private loop, bounded by timeoutMs.
template <typename T, typename Body>
T runSync(const ClusterCredentials& credentials, Ipv4 address, uint16_t port, uint32_t timeoutMs,
          Body&& body) {
  uv_loop_t loop;
  KJ_REQUIRE(uv_loop_init(&loop) == 0);
  KJ_DEFER({
    uv_run(&loop, UV_RUN_NOWAIT);
    uv_loop_close(&loop);
  });
  kj::String where = kj::str(address.toString().c_str(), ":", port);
  kj::Maybe<T> result;
  kj::Maybe<kj::Exception> error;
  {
    UvEventPort eventPort(&loop);
    kj::WaitScope waitScope(eventPort.kjLoop());
    auto promise = NodeConnection::connect(eventPort, credentials, address, port, timeoutMs)
                       .then([&body](kj::Own<NodeConnection> connection) {
                         auto node = connection->node();
                         return body(node).attach(kj::mv(connection));
                       });
    auto bounded = eventPort.timeoutAfter(
        timeoutMs, kj::str("mosd at ", where, " did not answer within ", timeoutMs, " ms"),
        kj::mv(promise));
    KJ_IF_MAYBE (e, kj::runCatchingExceptions([&]() { result = bounded.wait(waitScope); })) {
      error = kj::mv(*e);
    }
  }
  KJ_IF_MAYBE (e, error) {
    kj::StringPtr description = e->getDescription();
    if (description.startsWith("mosd at ") || description.startsWith("cannot reach mosd")) {
      kj::throwFatalException(disconnected(kj::str(description)));
    }
    kj::throwFatalException(disconnected(kj::str("mosd at ", where, ": ", description)));
  }
  KJ_IF_MAYBE (r, result) {
    return kj::mv(*r);
  }
  KJ_UNREACHABLE;
}

// The client half of the handshake of cluster_auth.h on `stream`: hello, nonce, proof, accept.
kj::Promise<void> authenticate(UvFdStream& stream, const ClusterCredentials& credentials,
                               kj::StringPtr where) {
  struct State {
    AuthNonce nonce;
    AuthProof proof;
    uint8_t accepted = 0;
  };
  auto state = kj::heap<State>();
  auto& st = *state;
  auto refused = [&credentials, where = std::string(where.cStr())]() {
    return disconnected(kj::str("mosd at ", where.c_str(), " refused node ", credentials.nodeId,
                                " (is ", credentials.key.origin().c_str(), " the cluster's key?)"));
  };
  return stream.write(HELLO_RPC, sizeof(HELLO_RPC))
      .then([&stream, &st]() {
        return stream.tryRead(st.nonce.data(), st.nonce.size(), st.nonce.size());
      })
      .then([&stream, &st, &credentials, refused](size_t n) {
        if (n < st.nonce.size()) {
          kj::throwFatalException(refused());
        }
        st.proof = credentials.key.prove(kj::arrayPtr(HELLO_RPC, sizeof(HELLO_RPC)), st.nonce,
                                         credentials.nodeId);
        return stream.write(st.proof.data(), st.proof.size());
      })
      .then([&stream, &st]() { return stream.tryRead(&st.accepted, 1, 1); })
      .then([&st, refused](size_t n) {
        if (n < 1 || st.accepted != AUTH_ACCEPTED) {
          kj::throwFatalException(refused());
        }
      })
      .attach(kj::mv(state));
}

}  // namespace

NodeConnection::NodeConnection(kj::Own<UvFdStream> stream, kj::String where)
    : stream_(kj::mv(stream)),
      where_(kj::mv(where)),
      client_(*stream_),
      node_(client_.bootstrap().castAs<proto::Node>()) {}

kj::Promise<kj::Own<NodeConnection>> NodeConnection::connect(UvEventPort& loop,
                                                             const ClusterCredentials& credentials,
                                                             Ipv4 address, uint16_t port,
                                                             uint32_t timeoutMs) {
  auto where = kj::str(address.toString().c_str(), ":", port);
  auto message = kj::str("mosd at ", where, " did not answer within ", timeoutMs, " ms");
  auto connected =
      connectTcp(loop, makeSockaddr(address.value, port))
          .catch_([where = kj::str(where)](kj::Exception&& e) -> kj::Own<UvFdStream> {
            // "connect to A:P: Connection refused" -> "cannot reach mosd at A:P: Connection ..."
            kj::StringPtr d = e.getDescription();
            KJ_IF_MAYBE (colon, d.findLast(':')) {
              d = d.slice(*colon + 2);
            }
            kj::throwFatalException(disconnected(kj::str("cannot reach mosd at ", where, ": ", d)));
          })
          .then([&credentials, where = kj::mv(where)](kj::Own<UvFdStream> stream) mutable {
            auto& s = *stream;
            return authenticate(s, credentials, where)
                .then([stream = kj::mv(stream), where = kj::mv(where)]() mutable {
                  return kj::heap<NodeConnection>(kj::mv(stream), kj::mv(where));
                });
          });
  return loop.timeoutAfter(timeoutMs, kj::mv(message), kj::mv(connected));
}

NodeStatus toNodeStatus(proto::NodeStatus::Reader status) {
  NodeStatus result;
  result.nodeId = status.getNodeId();
  result.version = status.getVersion();
  result.load = status.getLoad();
  result.guests = status.getGuests();
  result.cpus = status.getCpus();
  return result;
}

std::vector<JobInfo> toJobInfos(capnp::List<proto::JobInfo>::Reader jobs) {
  std::vector<JobInfo> result;
  for (auto job : jobs) {
    JobInfo info;
    info.homePid = job.getHomePid();
    info.command = job.getCommand();
    info.node = job.getNode();
    info.state = job.getState();
    info.syscalls = job.getSyscalls();
    info.remotePid = job.getRemotePid();
    info.homeNode = job.getHomeNode();
    info.parentPid = job.getParentPid();
    info.threads = job.getThreads();
    info.stay = job.getStay();
    info.moves = job.getMoves();
    for (uint32_t node : job.getTrail()) {
      info.trail.push_back(node);
    }
    result.push_back(kj::mv(info));
  }
  return result;
}

NodeStatus queryStatus(const ClusterCredentials& credentials, Ipv4 address, uint16_t port,
                       uint32_t timeoutMs) {
  return runSync<NodeStatus>(credentials, address, port, timeoutMs, [](proto::Node::Client& node) {
    return node.statusRequest().send().then(
        [](auto response) { return toNodeStatus(response.getStatus()); });
  });
}

std::vector<JobInfo> listJobs(const ClusterCredentials& credentials, Ipv4 address, uint16_t port,
                              uint32_t timeoutMs) {
  return runSync<std::vector<JobInfo>>(
      credentials, address, port, timeoutMs, [](proto::Node::Client& node) {
        return node.listJobsRequest().send().then(
            [](auto response) { return toJobInfos(response.getJobs()); });
      });
}

std::vector<JobInfo> listGuests(const ClusterCredentials& credentials, Ipv4 address, uint16_t port,
                                uint32_t timeoutMs) {
  return runSync<std::vector<JobInfo>>(
      credentials, address, port, timeoutMs, [](proto::Node::Client& node) {
        return node.listGuestsRequest().send().then(
            [](auto response) { return toJobInfos(response.getJobs()); });
      });
}

kj::Own<capnp::MallocMessageBuilder> inspectJob(const ClusterCredentials& credentials, Ipv4 address,
                                                uint16_t port, uint32_t timeoutMs, int32_t pid) {
  return runSync<kj::Own<capnp::MallocMessageBuilder>>(
      credentials, address, port, timeoutMs, [pid](proto::Node::Client& node) {
        auto request = node.inspectJobRequest();
        request.setPid(pid);
        return request.send().then([](auto response) {
          auto copy = kj::heap<capnp::MallocMessageBuilder>();
          copy->setRoot(response.getView());
          return copy;
        });
      });
}

kj::Own<capnp::MallocMessageBuilder> inspectGuest(const ClusterCredentials& credentials,
                                                  Ipv4 address, uint16_t port, uint32_t timeoutMs,
                                                  int32_t homePid, uint32_t homeNode) {
  return runSync<kj::Own<capnp::MallocMessageBuilder>>(
      credentials, address, port, timeoutMs, [homePid, homeNode](proto::Node::Client& node) {
        auto request = node.inspectGuestRequest();
        request.setHomePid(homePid);
        request.setHomeNode(homeNode);
        return request.send().then([](auto response) {
          auto copy = kj::heap<capnp::MallocMessageBuilder>();
          copy->setRoot(response.getView());
          return copy;
        });
      });
}

namespace {
Ipv4 addressOf(const MapFile& map, uint32_t nodeId) {
  KJ_IF_MAYBE (address, map.lookup(nodeId)) {
    return *address;
  }
  kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                                        kj::str("node ", nodeId, " is not in the cluster map")));
}
}  // namespace

NodeStatus queryStatus(const ClusterCredentials& credentials, const MapFile& map, uint32_t nodeId,
                       uint16_t port, uint32_t timeoutMs) {
  return queryStatus(credentials, addressOf(map, nodeId), port, timeoutMs);
}

std::vector<JobInfo> listJobs(const ClusterCredentials& credentials, const MapFile& map,
                              uint32_t nodeId, uint16_t port, uint32_t timeoutMs) {
  return listJobs(credentials, addressOf(map, nodeId), port, timeoutMs);
}

}  // namespace mos
