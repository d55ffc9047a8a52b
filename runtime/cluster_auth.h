#pragma once
// Authentication of connections between nodes (DESIGN.md decision 10): every node of a cluster
// holds the same secret, the cluster key, and proves it on each connection to a mosd by answering
// a challenge.
//
// The handshake, after the TCP connect (protocol/job.capnp's header comment has the wire view):
//   client -> mosd   hello    8 bytes, "UMOSRPC1" or "UMOSJOB1" (channel.h)
//   mosd -> client   nonce    32 random bytes (randombytes_buf, fresh per connection)
//   client -> mosd   proof    36 bytes: mac (32) || node id (4, big-endian)
//                             mac = HMAC-SHA256(key, hello || nonce || node id big-endian)
//   mosd -> client   accept   1 byte, AUTH_ACCEPTED; on any failure mosd closes instead
// mosd accepts when the node id is in its map with the peer's address and the MAC matches
// (constant-time compare). HMAC-SHA256 is libsodium's crypto_auth_hmacsha256 (RFC 2104 over
// SHA-256, any key length); see https://doc.libsodium.org/advanced/hmac-sha2.
//
// Only mosd is authenticated to, not the other way round: a client does not learn whether the
// server holds the key. The bytes that follow the handshake are neither encrypted nor MACed.

#include <kj/common.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mos {

inline constexpr size_t CLUSTER_KEY_MIN_BYTES = 32;
inline constexpr size_t CLUSTER_KEY_MAX_BYTES = 4096;
inline constexpr size_t AUTH_HELLO_BYTES = 8;
inline constexpr size_t AUTH_NONCE_BYTES = 32;
inline constexpr size_t AUTH_MAC_BYTES = 32;
inline constexpr size_t AUTH_PROOF_BYTES = AUTH_MAC_BYTES + 4;  // mac || node id (big-endian)
inline constexpr uint8_t AUTH_ACCEPTED = 0x01;

// The default key file, overridden by UMOSIX_KEY (config.h) or a --key flag.
inline constexpr const char* DEFAULT_KEY_PATH = "/etc/umosix/cluster.key";

using AuthNonce = std::array<uint8_t, AUTH_NONCE_BYTES>;
using AuthProof = std::array<uint8_t, AUTH_PROOF_BYTES>;

// The cluster key: the whole content of the key file, raw bytes (32..4096), used as the HMAC key.
// Copies wipe nothing; the bytes are zeroed (sodium_memzero) when the object is destroyed.
class ClusterKey {
 public:
  // Reads the key file at `path`. Throws a configuration error (throwConfigError, map_file.h),
  // one line naming the file, when it is missing or unreadable (with strerror), is not a regular
  // file, is readable or writable by others (mode & 0006: "chmod 600 PATH"), is shorter than
  // CLUSTER_KEY_MIN_BYTES or longer than CLUSTER_KEY_MAX_BYTES.
  static ClusterKey load(const std::string& path);

  // A key from bytes (tests). Throws a configuration error when shorter than
  // CLUSTER_KEY_MIN_BYTES.
  static ClusterKey fromBytes(kj::ArrayPtr<const uint8_t> bytes, const std::string& origin = "");

  ClusterKey(const ClusterKey&) = default;
  ClusterKey(ClusterKey&&) = default;
  ClusterKey& operator=(const ClusterKey&) = default;
  ClusterKey& operator=(ClusterKey&&) = default;
  ~ClusterKey();

  // HMAC-SHA256(key, hello || nonce || nodeId big-endian): 32 bytes.
  std::array<uint8_t, AUTH_MAC_BYTES> mac(kj::ArrayPtr<const char> hello, const AuthNonce& nonce,
                                          uint32_t nodeId) const;

  // The 36 bytes a client sends after the nonce: mac(hello, nonce, nodeId) || nodeId big-endian.
  AuthProof prove(kj::ArrayPtr<const char> hello, const AuthNonce& nonce, uint32_t nodeId) const;

  // True when `proof` is mac(hello, nonce, id) || id for the id it carries (compared in constant
  // time with sodium_memcmp). The caller checks separately that the id may connect from where
  // the connection comes (proofNodeId()).
  bool verify(kj::ArrayPtr<const char> hello, const AuthNonce& nonce, const AuthProof& proof) const;

  // Where the key came from ("/etc/umosix/cluster.key"), for messages.
  const std::string& origin() const { return origin_; }

 private:
  ClusterKey() = default;
  std::vector<uint8_t> bytes_;
  std::string origin_;
};

// The node id a proof claims (its last 4 bytes, big-endian).
uint32_t proofNodeId(const AuthProof& proof);

// 32 fresh random bytes (randombytes_buf(3), the kernel's CSPRNG).
AuthNonce makeNonce();

// What a node shows when it connects to a mosd: its id and the cluster key.
struct ClusterCredentials {
  uint32_t nodeId;
  ClusterKey key;
};

}  // namespace mos
