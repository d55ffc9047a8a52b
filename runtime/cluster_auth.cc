#include "cluster_auth.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <kj/debug.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "config.h"

namespace mos {

namespace {

void initSodium() {
  static const bool ready = sodium_init() >= 0;  // idempotent and thread safe
  if (!ready) {
    KJ_FAIL_REQUIRE("libsodium failed to initialize");
  }
}

void putBigEndian(uint8_t* out, uint32_t value) {
  out[0] = uint8_t(value >> 24);
  out[1] = uint8_t(value >> 16);
  out[2] = uint8_t(value >> 8);
  out[3] = uint8_t(value);
}

}  // namespace

ClusterKey ClusterKey::load(const std::string& path) {
  auto fail = [&](const std::string& why) {
    throwConfigError(fmt::format("cluster key {}: {}", path, why));
  };
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    int err = errno;
    fail(err == ENOENT ? "missing (every node needs the same key file; create one with "
                         "`head -c 32 /dev/urandom > FILE; chmod 600 FILE` and copy it)"
                       : std::string("cannot open: ") + strerror(err));
  }
  struct stat st;
  if (fstat(fd, &st) < 0) {
    int err = errno;
    close(fd);
    fail(std::string("cannot stat: ") + strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    fail("not a regular file");
  }
  if ((st.st_mode & 0006) != 0) {
    close(fd);
    fail(fmt::format("accessible to other users (mode {:04o}); chmod 600 {}", st.st_mode & 07777,
                     path));
  }
  std::vector<uint8_t> bytes(CLUSTER_KEY_MAX_BYTES + 1);
  size_t size = 0;
  while (size < bytes.size()) {
    ssize_t n = read(fd, bytes.data() + size, bytes.size() - size);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      int err = errno;
      sodium_memzero(bytes.data(), bytes.size());
      close(fd);
      fail(std::string("cannot read: ") + strerror(err));
    }
    if (n == 0) {
      break;
    }
    size += n;
  }
  close(fd);
  if (size > CLUSTER_KEY_MAX_BYTES) {
    sodium_memzero(bytes.data(), bytes.size());
    fail(fmt::format("longer than {} bytes", CLUSTER_KEY_MAX_BYTES));
  }
  if (size < CLUSTER_KEY_MIN_BYTES) {
    sodium_memzero(bytes.data(), bytes.size());
    fail(fmt::format("too short ({} bytes, at least {} needed)", size, CLUSTER_KEY_MIN_BYTES));
  }
  ClusterKey key = fromBytes(kj::arrayPtr(bytes.data(), size), path);
  sodium_memzero(bytes.data(), bytes.size());
  return key;
}

ClusterKey ClusterKey::fromBytes(kj::ArrayPtr<const uint8_t> bytes, const std::string& origin) {
  if (bytes.size() < CLUSTER_KEY_MIN_BYTES) {
    throwConfigError(fmt::format("cluster key {}: too short ({} bytes, at least {} needed)", origin,
                                 bytes.size(), CLUSTER_KEY_MIN_BYTES));
  }
  initSodium();
  ClusterKey key;
  key.bytes_.assign(bytes.begin(), bytes.end());
  key.origin_ = origin;
  return key;
}

ClusterKey::~ClusterKey() {
  if (!bytes_.empty()) {
    sodium_memzero(bytes_.data(), bytes_.size());
  }
}

std::array<uint8_t, AUTH_MAC_BYTES> ClusterKey::mac(kj::ArrayPtr<const char> hello,
                                                    const AuthNonce& nonce, uint32_t nodeId) const {
  static_assert(AUTH_MAC_BYTES == crypto_auth_hmacsha256_BYTES);
  uint8_t id[4];
  putBigEndian(id, nodeId);
  crypto_auth_hmacsha256_state state;
  crypto_auth_hmacsha256_init(&state, bytes_.data(), bytes_.size());
  crypto_auth_hmacsha256_update(&state, reinterpret_cast<const uint8_t*>(hello.begin()),
                                hello.size());
  crypto_auth_hmacsha256_update(&state, nonce.data(), nonce.size());
  crypto_auth_hmacsha256_update(&state, id, sizeof(id));
  std::array<uint8_t, AUTH_MAC_BYTES> out;
  crypto_auth_hmacsha256_final(&state, out.data());
  sodium_memzero(&state, sizeof(state));
  return out;
}

AuthProof ClusterKey::prove(kj::ArrayPtr<const char> hello, const AuthNonce& nonce,
                            uint32_t nodeId) const {
  AuthProof proof;
  auto m = mac(hello, nonce, nodeId);
  memcpy(proof.data(), m.data(), m.size());
  putBigEndian(proof.data() + AUTH_MAC_BYTES, nodeId);
  return proof;
}

bool ClusterKey::verify(kj::ArrayPtr<const char> hello, const AuthNonce& nonce,
                        const AuthProof& proof) const {
  auto expected = mac(hello, nonce, proofNodeId(proof));
  return sodium_memcmp(expected.data(), proof.data(), AUTH_MAC_BYTES) == 0;
}

uint32_t proofNodeId(const AuthProof& proof) {
  const uint8_t* p = proof.data() + AUTH_MAC_BYTES;
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
}

AuthNonce makeNonce() {
  initSodium();
  AuthNonce nonce;
  randombytes_buf(nonce.data(), nonce.size());
  return nonce;
}

}  // namespace mos
