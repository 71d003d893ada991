// The low-level SHA256_CTX API is deprecated in OpenSSL 3 in favour of EVP, but EVP cannot
// export a mid-stream state, which the cache's resumable hash frontier needs. Both run the same
// SHA-NI block function.
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include "base/digest.h"

#include <cstring>

namespace modelfs {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

StatusOr<Digest> Digest::FromHex(std::string_view hex) {
  if (hex.size() != 64) return InvalidArgument("digest must have 64 hex digits");
  Bytes b;
  for (size_t i = 0; i < 32; ++i) {
    int hi = HexValue(hex[2 * i]), lo = HexValue(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return InvalidArgument("digest has a non-hex character");
    b[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return Digest(b);
}

StatusOr<Digest> Digest::Parse(std::string_view text) {
  constexpr std::string_view kPrefix = "sha256:";
  if (text.substr(0, kPrefix.size()) != kPrefix) {
    return InvalidArgument("unsupported digest (want sha256:<64 hex>): " +
                           std::string(text.substr(0, 80)));
  }
  auto d = FromHex(text.substr(kPrefix.size()));
  if (!d.ok()) return d.status().Annotate("bad digest " + std::string(text.substr(0, 80)));
  return d;
}

std::string Digest::Hex() const {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(64, '0');
  for (size_t i = 0; i < 32; ++i) {
    out[2 * i] = kHex[bytes_[i] >> 4];
    out[2 * i + 1] = kHex[bytes_[i] & 15];
  }
  return out;
}

Sha256::Sha256() { SHA256_Init(&ctx_); }

void Sha256::Update(const void* data, size_t len) { SHA256_Update(&ctx_, data, len); }

Digest Sha256::Peek() const {
  SHA256_CTX copy = ctx_;
  Digest::Bytes out;
  SHA256_Final(out.data(), &copy);
  return Digest(out);
}

uint64_t Sha256::bytes_hashed() const {
  return ((static_cast<uint64_t>(ctx_.Nh) << 32) | ctx_.Nl) / 8;
}

std::string Sha256::SaveState() const {
  return std::string(reinterpret_cast<const char*>(&ctx_), sizeof ctx_);
}

StatusOr<Sha256> Sha256::LoadState(std::string_view state) {
  if (state.size() != kStateSize) return InvalidArgument("sha256 state has the wrong size");
  Sha256 h;
  std::memcpy(&h.ctx_, state.data(), sizeof h.ctx_);
  if (h.ctx_.num >= SHA256_CBLOCK || h.ctx_.md_len != SHA256_DIGEST_LENGTH ||
      (h.ctx_.Nl / 8) % SHA256_CBLOCK != h.ctx_.num) {
    return InvalidArgument("sha256 state is inconsistent");
  }
  return h;
}

Digest Sha256::Of(std::string_view data) {
  Sha256 h;
  h.Update(data.data(), data.size());
  return h.Peek();
}

}  // namespace modelfs
