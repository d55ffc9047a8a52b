#pragma once
// Where a node finds its map, its id, its directories and its port. Every tool starts from
// configFromEnvironment(), lets its command-line flags override fields, then resolves the node id
// against the map with resolveNodeId().
//
//   variable           default               meaning
//   UMOSIX_MAP         /etc/umosix/map       the cluster map file (map_file.h)
//   UMOSIX_NODE        (local interfaces)    this node's id
//   UMOSIX_RUN_DIR     /run/umosix           job records, pid files
//   UMOSIX_CACHE_DIR   /var/cache/umosix     the remote node's file cache
//   UMOSIX_PORT        7151                  mosd's TCP port (the same on every node)
//   UMOSIX_KEY         /etc/umosix/cluster.key   the cluster key file (cluster_auth.h)

#include <cstdint>
#include <string>
#include <vector>

#include "map_file.h"

namespace mos {

inline constexpr uint16_t DEFAULT_PORT = 7151;

// `mosrun -L` puts UMOSIX_LOCKED=1 in the environment the job starts with (inherited by what it
// forks and execs at home): `migrate` refuses to move such a process (openMosix's lock).
inline constexpr const char* LOCKED_ENV = "UMOSIX_LOCKED";

// True when process `pid` started with UMOSIX_LOCKED=1 in its environment (/proc/PID/environ,
// proc(5): the environment at its last exec). False when it did not or cannot be read.
bool startedLocked(int pid);

// Configuration errors (a bad variable or flag value, a node not found) are kj::Exceptions of type
// FAILED whose description is one line for the user, naming the variable or flag
// (throwConfigError, map_file.h).

struct NodeConfig {
  std::string mapPath = "/etc/umosix/map";
  uint32_t nodeId = 0;  // 0: not given, resolve from the map and the local interfaces
  std::string runDir = "/run/umosix";
  std::string cacheDir = "/var/cache/umosix";
  uint16_t port = DEFAULT_PORT;
  std::string keyPath = "/etc/umosix/cluster.key";  // read with ClusterKey::load
};

// The defaults overridden by the UMOSIX_* variables (empty variables count as unset). Throws a
// configuration error for a UMOSIX_NODE or UMOSIX_PORT that is not a number in range
// (node 1..2^32-1, port 1..65535).
NodeConfig configFromEnvironment();

// Parses a node id ("3") or a port ("7151") as given in a flag or variable named `what`; throws a
// configuration error naming `what` otherwise.
uint32_t parseNodeId(const std::string& text, const std::string& what);
uint16_t parsePort(const std::string& text, const std::string& what);

// The IPv4 addresses assigned to this host's interfaces (getifaddrs(3)), including loopback, in
// interface order. Throws kj::Exception if getifaddrs fails.
std::vector<Ipv4> localAddresses();

// The node of `map` whose address is one of `addresses`: nullptr if none. Throws a configuration
// error when several nodes match (the host is ambiguous; the user must set UMOSIX_NODE or --node).
kj::Maybe<uint32_t> localNodeId(const MapFile& map, const std::vector<Ipv4>& addresses);

// Completes config.nodeId: keeps a given id (checking that the map has it), or finds the node
// whose map address is assigned to a local interface. Returns the node's map address. Throws a
// configuration error ("node 7 is not in /etc/umosix/map", "no address of this host is in MAP;
// set UMOSIX_NODE or --node") otherwise.
Ipv4 resolveNodeId(NodeConfig& config, const MapFile& map);

}  // namespace mos
