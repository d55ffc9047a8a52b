#include "config.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <ifaddrs.h>
#include <kj/debug.h>
#include <netinet/in.h>

#include <charconv>
#include <fstream>
#include <cstdlib>

namespace mos {

namespace {

const char* env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' ? value : nullptr;
}

bool parseUnsigned(const std::string& text, uint64_t max, uint64_t& out) {
  if (text.empty() || text[0] < '0' || text[0] > '9') {
    return false;
  }
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size() && out <= max;
}

}  // namespace

uint32_t parseNodeId(const std::string& text, const std::string& what) {
  uint64_t value;
  if (!parseUnsigned(text, UINT32_MAX, value) || value == 0) {
    throwConfigError(
        fmt::format("{}: expected a node id (1..{}), got \"{}\"", what, UINT32_MAX, text));
  }
  return uint32_t(value);
}

uint16_t parsePort(const std::string& text, const std::string& what) {
  uint64_t value;
  if (!parseUnsigned(text, 65535, value) || value == 0) {
    throwConfigError(fmt::format("{}: expected a TCP port (1..65535), got \"{}\"", what, text));
  }
  return uint16_t(value);
}

NodeConfig configFromEnvironment() {
  NodeConfig config;
  if (const char* v = env("UMOSIX_MAP")) {
    config.mapPath = v;
  }
  if (const char* v = env("UMOSIX_NODE")) {
    config.nodeId = parseNodeId(v, "UMOSIX_NODE");
  }
  if (const char* v = env("UMOSIX_RUN_DIR")) {
    config.runDir = v;
  }
  if (const char* v = env("UMOSIX_CACHE_DIR")) {
    config.cacheDir = v;
  }
  if (const char* v = env("UMOSIX_PORT")) {
    config.port = parsePort(v, "UMOSIX_PORT");
  }
  if (const char* v = env("UMOSIX_KEY")) {
    config.keyPath = v;
  }
  return config;
}

std::vector<Ipv4> localAddresses() {
  ifaddrs* list = nullptr;
  KJ_SYSCALL(getifaddrs(&list));
  KJ_DEFER(freeifaddrs(list));
  std::vector<Ipv4> result;
  for (ifaddrs* i = list; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr != nullptr && i->ifa_addr->sa_family == AF_INET) {
      auto* sin = reinterpret_cast<sockaddr_in*>(i->ifa_addr);
      result.push_back(Ipv4{ntohl(sin->sin_addr.s_addr)});
    }
  }
  return result;
}

kj::Maybe<uint32_t> localNodeId(const MapFile& map, const std::vector<Ipv4>& addresses) {
  kj::Maybe<uint32_t> found;
  Ipv4 foundAddress;
  for (Ipv4 address : addresses) {
    KJ_IF_MAYBE (id, map.nodeOf(address)) {
      KJ_IF_MAYBE (previous, found) {
        if (*previous != *id) {
          throwConfigError(fmt::format(
              "this host has the addresses of nodes {} ({}) and {} ({}); set UMOSIX_NODE or "
              "--node",
              *previous, foundAddress.toString(), *id, address.toString()));
        }
      } else {
        found = *id;
        foundAddress = address;
      }
    }
  }
  return found;
}

Ipv4 resolveNodeId(NodeConfig& config, const MapFile& map) {
  if (config.nodeId == 0) {
    KJ_IF_MAYBE (id, localNodeId(map, localAddresses())) {
      config.nodeId = *id;
    } else {
      throwConfigError(fmt::format("no address of this host is in {}; set UMOSIX_NODE or --node",
                                   config.mapPath));
    }
  }
  KJ_IF_MAYBE (address, map.lookup(config.nodeId)) {
    return *address;
  }
  throwConfigError(fmt::format("node {} is not in {}", config.nodeId, config.mapPath));
}

bool startedLocked(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/environ", std::ios::binary);
  std::string wanted = std::string(LOCKED_ENV) + "=1";
  std::string entry;
  while (std::getline(in, entry, '\0')) {
    if (entry == wanted) {
      return true;
    }
  }
  return false;
}

}  // namespace mos
