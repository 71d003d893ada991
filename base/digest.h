// Digest: a SHA-256 content address ("sha256:<64 lowercase hex>"), and Sha256, an incremental
// hasher whose mid-stream state can be saved and restored (the cache persists the state at its
// hash frontier so a restart never re-hashes a verified prefix).
// Value types; a Sha256 object is not thread-safe (one owner at a time).
#pragma once

#include <openssl/sha.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "base/status.h"

namespace modelfs {

class Digest {
 public:
  using Bytes = std::array<uint8_t, 32>;

  Digest() = default;
  explicit Digest(const Bytes& bytes) : bytes_(bytes) {}

  // Accepts exactly "sha256:" followed by 64 hex digits (either case). Anything else, including
  // other algorithms, is InvalidArgument.
  static StatusOr<Digest> Parse(std::string_view text);
  // Accepts 64 hex digits.
  static StatusOr<Digest> FromHex(std::string_view hex);

  const Bytes& bytes() const { return bytes_; }
  std::string Hex() const;                                  // 64 lowercase hex digits
  std::string ToString() const { return "sha256:" + Hex(); }  // the registry spelling
  std::string FileName() const { return "sha256-" + Hex(); }  // the cache/Ollama spelling
  std::string Short() const { return Hex().substr(0, 12); }   // for logs and progress

  friend bool operator==(const Digest&, const Digest&) = default;
  friend auto operator<=>(const Digest&, const Digest&) = default;

 private:
  Bytes bytes_{};
};

class Sha256 {
 public:
  // The serialized mid-stream state: exactly kStateSize bytes.
  static constexpr size_t kStateSize = sizeof(SHA256_CTX);

  Sha256();
  void Update(const void* data, size_t len);
  // Finishes a copy: the hasher can keep going after.
  Digest Peek() const;
  uint64_t bytes_hashed() const;

  std::string SaveState() const;
  // Restores a state produced by SaveState() on this build; InvalidArgument if malformed.
  static StatusOr<Sha256> LoadState(std::string_view state);

  // One-shot convenience.
  static Digest Of(std::string_view data);

 private:
  SHA256_CTX ctx_;
};

}  // namespace modelfs
