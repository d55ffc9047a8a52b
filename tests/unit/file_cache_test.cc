#include "file_cache.h"
#include "guest_move.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include <capnp/message.h>
#include <catch2/catch.hpp>
#include <kj/debug.h>

namespace {

std::string tempDir() {
  char pattern[] = "/tmp/umosix-cache-test-XXXXXX";
  REQUIRE(mkdtemp(pattern) != nullptr);
  return pattern;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

TEST_CASE("content cache stores fetched bytes under the home file's identity", "[remote][cache]") {
  std::string dir = tempDir();
  mos::remote::FileCache cache(dir, 1);
  capnp::MallocMessageBuilder message;
  auto ref = message.initRoot<mos::proto::FileRef>();
  ref.setDev(0x803);
  ref.setIno(42);
  ref.setSize(11);
  ref.setMtimeNs(1700000000123456789);
  CHECK(cache.keyOf(ref) == "n1-803-42-11-1700000000123456789");
  CHECK(cache.lookup(ref) == nullptr);

  std::string path = cache.store(ref, [](int fd) { REQUIRE(write(fd, "hello cache", 11) == 11); });
  CHECK(slurp(path) == "hello cache");
  KJ_IF_MAYBE (hit, cache.lookup(ref)) {
    CHECK(*hit == path);
  } else {
    FAIL("a stored file is not found again");
  }
  // Another home node's file with the same dev/ino is another file.
  mos::remote::FileCache other(dir, 2);
  CHECK(other.lookup(ref) == nullptr);
  REQUIRE(system(("rm -rf " + dir).c_str()) == 0);
}

TEST_CASE("content cache installs nothing when the fetched size is wrong or the fetch fails",
          "[remote][cache]") {
  std::string dir = tempDir();
  mos::remote::FileCache cache(dir, 1);
  capnp::MallocMessageBuilder message;
  auto ref = message.initRoot<mos::proto::FileRef>();
  ref.setIno(7);
  ref.setSize(100);
  CHECK_THROWS(cache.store(ref, [](int fd) { REQUIRE(write(fd, "short", 5) == 5); }));
  CHECK(cache.lookup(ref) == nullptr);
  CHECK_THROWS(cache.store(ref, [](int) { KJ_FAIL_REQUIRE("deputy gone"); }));
  CHECK(cache.lookup(ref) == nullptr);
  // No temp file is left behind.
  CHECK(system(("test -z \"$(ls -A " + dir + ")\"").c_str()) == 0);
  REQUIRE(system(("rm -rf " + dir).c_str()) == 0);
}

TEST_CASE("a cache file's name gives back the home identity it was keyed by (a move home)",
          "[remote][cache][migrate]") {
  std::string dir = tempDir();
  mos::remote::FileCache cache(dir, 3);
  capnp::MallocMessageBuilder message;
  auto ref = message.initRoot<mos::proto::FileRef>();
  ref.setDev(0xfd01);
  ref.setIno(123456789);
  ref.setSize(4096 * 7 + 5);
  ref.setMtimeNs(1765000000123456789);
  mos::remote::CacheKey key;
  REQUIRE(mos::remote::parseCacheKey(cache.keyOf(ref), key));
  CHECK(key.homeNode == 3);
  CHECK(key.dev == 0xfd01);
  CHECK(key.ino == 123456789);
  CHECK(key.size == 4096 * 7 + 5);
  CHECK(key.mtimeNs == 1765000000123456789);
  CHECK_FALSE(mos::remote::parseCacheKey("n3-fd01-1-2", key));
  CHECK_FALSE(mos::remote::parseCacheKey(cache.keyOf(ref) + ".tmp.12.13", key));
  CHECK_FALSE(mos::remote::parseCacheKey("libc.so.6", key));
  REQUIRE(system(("rm -rf " + dir).c_str()) == 0);
}
