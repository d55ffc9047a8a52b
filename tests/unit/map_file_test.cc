#include "map_file.h"

#include <kj/exception.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>

using mos::Ipv4;
using mos::MapFile;

// Configuration errors are kj::Exceptions whose description is the user's message (config.h).
CATCH_TRANSLATE_EXCEPTION(kj::Exception& e) { return std::string(e.getDescription().cStr()); }

namespace {
Ipv4 ip(const char* text) {
  Ipv4 out;
  REQUIRE(Ipv4::parse(text, out));
  return out;
}
}  // namespace

TEST_CASE("map file ranges expand to consecutive ids and addresses", "[node][map]") {
  auto map = MapFile::fromString(
      "# openMosix map\n"
      "\n"
      "1 10.0.0.1 3   # three nodes\n"
      "10\t192.168.1.250\n"
      "   20 172.16.0.9 2\r\n");
  REQUIRE(map.size() == 6);
  REQUIRE(map.ranges().size() == 3);
  CHECK(map.ranges()[1].line == 4);

  KJ_IF_MAYBE (a, map.lookup(3)) {
    CHECK(a->toString() == "10.0.0.3");
  } else {
    FAIL("node 3 missing");
  }
  KJ_IF_MAYBE (a, map.lookup(21)) {
    CHECK(a->toString() == "172.16.0.10");
  } else {
    FAIL("node 21 missing");
  }
  CHECK(map.lookup(4) == nullptr);
  CHECK(map.lookup(0) == nullptr);
  CHECK(map.lookup(22) == nullptr);

  KJ_IF_MAYBE (id, map.nodeOf(ip("10.0.0.2"))) {
    CHECK(*id == 2);
  } else {
    FAIL("10.0.0.2 not found");
  }
  KJ_IF_MAYBE (id, map.nodeOf(ip("192.168.1.250"))) {
    CHECK(*id == 10);
  } else {
    FAIL("192.168.1.250 not found");
  }
  CHECK(map.nodeOf(ip("10.0.0.4")) == nullptr);
  CHECK(map.nodeOf(ip("10.0.0.0")) == nullptr);

  auto nodes = map.nodes();
  REQUIRE(nodes.size() == 6);
  CHECK(nodes[0].id == 1);
  CHECK(nodes[3].id == 10);
  CHECK(nodes[5].id == 21);
  CHECK(nodes[5].address.toString() == "172.16.0.10");
}

TEST_CASE("map file ranges are sorted by id whatever the line order", "[node][map]") {
  auto map = MapFile::fromString("5 10.0.0.5\n1 10.0.0.1 2\n");
  REQUIRE(map.ranges().size() == 2);
  CHECK(map.ranges()[0].firstId == 1);
  CHECK(map.ranges()[0].line == 2);
  KJ_IF_MAYBE (a, map.lookup(5)) {
    CHECK(a->toString() == "10.0.0.5");
  } else {
    FAIL("node 5 missing");
  }
}

TEST_CASE("an empty or comment-only map has no nodes", "[node][map]") {
  CHECK(MapFile::fromString("").size() == 0);
  CHECK(MapFile::fromString("# nothing\n\n   \n").size() == 0);
}

TEST_CASE("map file syntax errors name the file and line", "[node][map]") {
  CHECK_THROWS_WITH(MapFile::fromString("1 10.0.0.1\n\n1 2 3 4\n", "map"),
                    "map:3: expected \"ID ADDRESS COUNT\", got \"1 2 3 4\"");
  CHECK_THROWS_WITH(MapFile::fromString("# c\nnode1 10.0.0.1 1\n", "/etc/umosix/map"),
                    "/etc/umosix/map:2: expected \"ID ADDRESS COUNT\", got \"node1 10.0.0.1 1\"");
  CHECK_THROWS_WITH(MapFile::fromString("7\n"), "map:1: expected \"ID ADDRESS COUNT\", got \"7\"");
  CHECK_THROWS_WITH(MapFile::fromString("1 10.0.0.1 -2\n"),
                    "map:1: expected \"ID ADDRESS COUNT\", got \"1 10.0.0.1 -2\"");
  CHECK_THROWS_WITH(MapFile::fromString("1 10.0.0.1 2x\n"),
                    "map:1: expected \"ID ADDRESS COUNT\", got \"1 10.0.0.1 2x\"");
}

TEST_CASE("map file rejects bad addresses, zero ids and counts", "[node][map]") {
  CHECK_THROWS_WITH(MapFile::fromString("1 10.0.0.1\n2 host.example\n"),
                    Catch::StartsWith("map:2: bad address \"host.example\""));
  CHECK_THROWS_WITH(MapFile::fromString("1 10.0.0.256\n"),
                    Catch::StartsWith("map:1: bad address \"10.0.0.256\""));
  CHECK_THROWS_WITH(MapFile::fromString("1 10.1\n"), Catch::StartsWith("map:1: bad address"));
  CHECK_THROWS_WITH(MapFile::fromString("1 ::1\n"), Catch::StartsWith("map:1: bad address"));
  CHECK_THROWS_WITH(MapFile::fromString("0 10.0.0.1\n"), "map:1: node ids start at 1, got 0");
  CHECK_THROWS_WITH(MapFile::fromString("1 10.0.0.1 0\n"),
                    "map:1: count must be at least 1, got 0");
}

TEST_CASE("map file rejects overlapping ids and addresses", "[node][map]") {
  CHECK_THROWS_WITH(MapFile::fromString("1 10.0.0.1 3\n# x\n3 10.0.1.1 2\n"),
                    "map:3: nodes 3..4 overlap nodes 1..3 of line 1");
  CHECK_THROWS_WITH(MapFile::fromString("5 10.0.1.1 2\n1 10.0.0.1 5\n"),
                    "map:2: nodes 1..5 overlap nodes 5..6 of line 1");
  CHECK_THROWS_WITH(MapFile::fromString("1 10.0.0.1 3\n10 10.0.0.3\n"),
                    "map:2: address 10.0.0.3 already belongs to node 3 (line 1)");
}

TEST_CASE("map file rejects ranges that overflow ids or addresses", "[node][map]") {
  CHECK_THROWS_WITH(MapFile::fromString("4294967290 10.0.0.1 10\n"),
                    Catch::StartsWith("map:1: nodes 4294967290..4294967299 overflow"));
  CHECK_THROWS_WITH(MapFile::fromString("4294967296 10.0.0.1\n"),
                    Catch::StartsWith("map:1: node 4294967296 overflow"));
  CHECK_THROWS_WITH(MapFile::fromString("1 255.255.255.250 10\n"),
                    "map:1: 10 addresses from 255.255.255.250 overflow the IPv4 range");
  // The last id and the last address themselves are fine.
  CHECK(MapFile::fromString("4294967295 255.255.255.255\n").size() == 1);
}

TEST_CASE("map file from a path names the path in errors", "[node][map]") {
  char dir[] = "/tmp/umosix-map-XXXXXX";
  REQUIRE(mkdtemp(dir) != nullptr);
  std::string path = std::string(dir) + "/map";
  {
    std::ofstream out(path);
    out << "1 127.0.0.1 2\nbogus\n";
  }
  CHECK_THROWS_WITH(MapFile::fromPath(path), path +
                                                 ":2: expected \"ID ADDRESS COUNT\", got "
                                                 "\"bogus\"");
  {
    std::ofstream out(path);
    out << "1 127.0.0.1 2\n";
  }
  CHECK(MapFile::fromPath(path).size() == 2);
  CHECK_THROWS_WITH(MapFile::fromPath(path + ".missing"),
                    path + ".missing: cannot read: No such file or directory");
  unlink(path.c_str());
  rmdir(dir);
}
