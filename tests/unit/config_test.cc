#include "config.h"

#include <kj/exception.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

using mos::Ipv4;
using mos::MapFile;
using mos::NodeConfig;

// Configuration errors are kj::Exceptions whose description is the user's message (config.h).
CATCH_TRANSLATE_EXCEPTION(kj::Exception& e) { return std::string(e.getDescription().cStr()); }

namespace {

// Sets (or with nullptr unsets) the UMOSIX_* variables for one test, restoring them after.
class EnvGuard {
 public:
  EnvGuard() {
    for (const char* name : NAMES) {
      const char* v = std::getenv(name);
      saved_.emplace_back(name, v ? std::optional<std::string>(v) : std::nullopt);
      unsetenv(name);
    }
  }
  ~EnvGuard() {
    for (auto& [name, value] : saved_) {
      if (value) {
        setenv(name, value->c_str(), 1);
      } else {
        unsetenv(name);
      }
    }
  }
  void set(const char* name, const char* value) { setenv(name, value, 1); }

 private:
  static constexpr const char* NAMES[] = {"UMOSIX_MAP",       "UMOSIX_NODE", "UMOSIX_RUN_DIR",
                                          "UMOSIX_CACHE_DIR", "UMOSIX_PORT", "UMOSIX_KEY"};
  std::vector<std::pair<const char*, std::optional<std::string>>> saved_;
};

Ipv4 ip(const char* text) {
  Ipv4 out;
  REQUIRE(Ipv4::parse(text, out));
  return out;
}

}  // namespace

TEST_CASE("config defaults apply when no variable is set", "[node][config]") {
  EnvGuard env;
  NodeConfig c = mos::configFromEnvironment();
  CHECK(c.mapPath == "/etc/umosix/map");
  CHECK(c.nodeId == 0);
  CHECK(c.runDir == "/run/umosix");
  CHECK(c.cacheDir == "/var/cache/umosix");
  CHECK(c.port == 7151);
  CHECK(c.keyPath == "/etc/umosix/cluster.key");
}

TEST_CASE("config variables override the defaults", "[node][config]") {
  EnvGuard env;
  env.set("UMOSIX_MAP", "/tmp/m");
  env.set("UMOSIX_NODE", "4");
  env.set("UMOSIX_RUN_DIR", "/tmp/run");
  env.set("UMOSIX_CACHE_DIR", "/tmp/cache");
  env.set("UMOSIX_PORT", "9000");
  env.set("UMOSIX_KEY", "/tmp/key");
  NodeConfig c = mos::configFromEnvironment();
  CHECK(c.mapPath == "/tmp/m");
  CHECK(c.nodeId == 4);
  CHECK(c.runDir == "/tmp/run");
  CHECK(c.cacheDir == "/tmp/cache");
  CHECK(c.port == 9000);
  CHECK(c.keyPath == "/tmp/key");
}

TEST_CASE("config rejects bad node ids and ports, naming the variable", "[node][config]") {
  EnvGuard env;
  env.set("UMOSIX_PORT", "70000");
  CHECK_THROWS_WITH(mos::configFromEnvironment(),
                    "UMOSIX_PORT: expected a TCP port (1..65535), got \"70000\"");
  env.set("UMOSIX_PORT", "7151");
  env.set("UMOSIX_NODE", "two");
  CHECK_THROWS_WITH(mos::configFromEnvironment(),
                    Catch::StartsWith("UMOSIX_NODE: expected a node id"));
  env.set("UMOSIX_NODE", "0");
  CHECK_THROWS_AS(mos::configFromEnvironment(), kj::Exception);
  CHECK_THROWS_WITH(mos::parsePort("12ab", "--port"), Catch::StartsWith("--port: "));
}

TEST_CASE("the local node is the one whose map address is on an interface", "[node][config]") {
  auto map = MapFile::fromString("1 10.1.0.1 2\n7 127.0.0.7\n");
  KJ_IF_MAYBE (id, mos::localNodeId(map, {ip("192.168.0.5"), ip("127.0.0.7")})) {
    CHECK(*id == 7);
  } else {
    FAIL("no local node");
  }
  CHECK(mos::localNodeId(map, {ip("192.168.0.5")}) == nullptr);
  CHECK_THROWS_WITH(mos::localNodeId(map, {ip("10.1.0.2"), ip("127.0.0.7")}),
                    Catch::StartsWith("this host has the addresses of nodes 2 (10.1.0.2) and 7"));
}

TEST_CASE("resolveNodeId finds 127.0.0.1 on the loopback interface", "[node][config]") {
  auto local = mos::localAddresses();
  CHECK(std::find(local.begin(), local.end(), ip("127.0.0.1")) != local.end());

  auto map = MapFile::fromString("3 127.0.0.1\n4 10.254.254.254\n");
  NodeConfig c;
  c.mapPath = "test-map";
  CHECK(mos::resolveNodeId(c, map) == ip("127.0.0.1"));
  CHECK(c.nodeId == 3);

  // A given id wins over the interfaces, and must be in the map.
  c.nodeId = 4;
  CHECK(mos::resolveNodeId(c, map) == ip("10.254.254.254"));
  c.nodeId = 9;
  CHECK_THROWS_WITH(mos::resolveNodeId(c, map), "node 9 is not in test-map");

  NodeConfig none;
  none.mapPath = "other-map";
  CHECK_THROWS_WITH(mos::resolveNodeId(none, MapFile::fromString("1 10.254.254.253\n")),
                    "no address of this host is in other-map; set UMOSIX_NODE or --node");
}
