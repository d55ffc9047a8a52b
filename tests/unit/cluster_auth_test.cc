// The cluster key and the handshake proof (runtime/cluster_auth.h).

#include "cluster_auth.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <string>

#include "channel.h"
#include "config.h"

using namespace mos;

namespace {

ClusterKey keyOf(const std::string& bytes) {
  return ClusterKey::fromBytes(
      kj::arrayPtr(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), "test");
}

std::string countingBytes(size_t n) {
  std::string bytes;
  for (size_t i = 0; i < n; i++) {
    bytes += char(i);
  }
  return bytes;
}

std::string hex(const uint8_t* data, size_t size) {
  std::string out;
  char buf[3];
  for (size_t i = 0; i < size; i++) {
    snprintf(buf, sizeof(buf), "%02x", data[i]);
    out += buf;
  }
  return out;
}

const kj::ArrayPtr<const char> JOB = kj::arrayPtr(HELLO_JOB, sizeof(HELLO_JOB));
const kj::ArrayPtr<const char> RPC = kj::arrayPtr(HELLO_RPC, sizeof(HELLO_RPC));

// A temp dir removed at the end.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/cluster-auth-test-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() { CHECK(system(("rm -rf '" + path + "'").c_str()) == 0); }
  std::string write(const std::string& name, const std::string& bytes, mode_t mode) {
    std::string file = path + "/" + name;
    {
      std::ofstream out(file, std::ios::binary);
      out << bytes;
    }
    REQUIRE(chmod(file.c_str(), mode) == 0);
    return file;
  }
};

std::string loadError(const std::string& path) {
  try {
    ClusterKey::load(path);
  } catch (kj::Exception& e) {
    return e.getDescription().cStr();
  }
  return "no error";
}

}  // namespace

TEST_CASE("the MAC is HMAC-SHA256(key, hello || nonce || node id big-endian)", "[node][auth]") {
  ClusterKey key = keyOf(countingBytes(32));
  AuthNonce nonce;
  nonce.fill(0xa5);
  // Computed independently: python3 hmac.new(bytes(range(32)), b"UMOSJOB1" + b"\xa5" * 32 +
  // (7).to_bytes(4, "big"), hashlib.sha256).hexdigest()
  auto mac = key.mac(JOB, nonce, 7);
  CHECK(hex(mac.data(), mac.size()) ==
        "d7602adf0842ae1c44e6e6b06e366fc4cf082ea34dca90ab48c6f07361adcd06");
  AuthProof proof = key.prove(JOB, nonce, 7);
  CHECK(hex(proof.data(), proof.size()) == hex(mac.data(), mac.size()) + "00000007");
  CHECK(proofNodeId(proof) == 7);
  CHECK(proofNodeId(key.prove(JOB, nonce, 0x01020304)) == 0x01020304);
}

TEST_CASE("a proof verifies only for its key, hello, nonce and node id", "[node][auth]") {
  ClusterKey key = keyOf(countingBytes(32));
  AuthNonce nonce = makeNonce();
  AuthProof proof = key.prove(JOB, nonce, 2);
  CHECK(key.verify(JOB, nonce, proof));
  CHECK(keyOf(countingBytes(32)).verify(JOB, nonce, proof));  // the same bytes, another object

  SECTION("another key") {
    std::string other = countingBytes(32);
    other[31] ^= 1;
    CHECK_FALSE(keyOf(other).verify(JOB, nonce, proof));
    CHECK_FALSE(keyOf(countingBytes(33)).verify(JOB, nonce, proof));
  }
  SECTION("another nonce") {
    AuthNonce other = nonce;
    other[0] ^= 0x80;
    CHECK_FALSE(key.verify(JOB, other, proof));
  }
  SECTION("another hello") { CHECK_FALSE(key.verify(RPC, nonce, proof)); }
  SECTION("another node id in the proof") {
    AuthProof other = proof;
    other[AUTH_PROOF_BYTES - 1] = 3;
    CHECK(proofNodeId(other) == 3);
    CHECK_FALSE(key.verify(JOB, nonce, other));
  }
  SECTION("a damaged MAC") {
    for (size_t i : {size_t(0), size_t(15), AUTH_MAC_BYTES - 1}) {
      AuthProof other = proof;
      other[i] ^= 1;
      CHECK_FALSE(key.verify(JOB, nonce, other));
    }
  }
}

TEST_CASE("nonces are fresh", "[node][auth]") {
  AuthNonce a = makeNonce();
  AuthNonce b = makeNonce();
  CHECK(a != b);
  AuthNonce zero{};
  CHECK(a != zero);
}

TEST_CASE("the key file: loaded whole, refused with a message naming it", "[node][auth]") {
  TempDir dir;
  std::string bytes = countingBytes(48);

  std::string good = dir.write("good.key", bytes, 0600);
  ClusterKey key = ClusterKey::load(good);
  CHECK(key.origin() == good);
  AuthNonce nonce = makeNonce();
  CHECK(key.verify(JOB, nonce, keyOf(bytes).prove(JOB, nonce, 1)));  // all 48 bytes are the key
  CHECK_FALSE(key.verify(JOB, nonce, keyOf(bytes.substr(0, 32)).prove(JOB, nonce, 1)));
  CHECK_NOTHROW(ClusterKey::load(dir.write("group.key", bytes, 0640)));

  CHECK(loadError(dir.path + "/none") ==
        "cluster key " + dir.path +
            "/none: missing (every node needs the same key file; create one with `head -c 32 "
            "/dev/urandom > FILE; chmod 600 FILE` and copy it)");
  std::string open = dir.write("open.key", bytes, 0644);
  CHECK(loadError(open) ==
        "cluster key " + open + ": accessible to other users (mode 0644); chmod 600 " + open);
  std::string writable = dir.write("writable.key", bytes, 0602);
  CHECK(loadError(writable).find("accessible to other users (mode 0602)") != std::string::npos);
  std::string shortKey = dir.write("short.key", countingBytes(31), 0600);
  CHECK(loadError(shortKey) ==
        "cluster key " + shortKey + ": too short (31 bytes, at least 32 needed)");
  std::string empty = dir.write("empty.key", "", 0600);
  CHECK(loadError(empty) == "cluster key " + empty + ": too short (0 bytes, at least 32 needed)");
  std::string huge = dir.write("huge.key", std::string(5000, 'x'), 0600);
  CHECK(loadError(huge) == "cluster key " + huge + ": longer than 4096 bytes");
  CHECK(loadError(dir.path) == "cluster key " + dir.path + ": not a regular file");
  if (geteuid() == 0) {
    // root reads a mode 0000 file anyway; an unreadable file is tested for other users only.
    SUCCEED("running as root");
  } else {
    std::string locked = dir.write("locked.key", bytes, 0000);
    CHECK(loadError(locked) == "cluster key " + locked + ": cannot open: Permission denied");
  }
  CHECK_THROWS_AS(keyOf(countingBytes(31)), kj::Exception);
}
