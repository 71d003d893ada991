#include "cache/state_file.h"

#include <charconv>
#include <vector>

namespace modelfs::cache {
namespace {

constexpr std::string_view kMagic = "modelfs-partial-state";

std::string ToHex(std::string_view bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

bool FromHex(std::string_view hex, std::string* out) {
  if (hex.size() % 2 != 0) return false;
  auto val = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  out->clear();
  for (size_t i = 0; i < hex.size(); i += 2) {
    int hi = val(hex[i]), lo = val(hex[i + 1]);
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<char>(hi << 4 | lo));
  }
  return true;
}

bool ParseU64(std::string_view s, uint64_t* out) {
  if (s.empty() || s.size() > 20) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}

// Splits "key rest" at the first space.
bool Field(std::string_view line, std::string_view key, std::string_view* value) {
  if (line.size() <= key.size() || line.substr(0, key.size()) != key || line[key.size()] != ' ') {
    return false;
  }
  *value = line.substr(key.size() + 1);
  return true;
}

}  // namespace

std::string EncodeState(const PartialState& s) {
  std::string out;
  out += std::string(kMagic) + " " + std::to_string(kStateVersion) + "\n";
  out += "digest " + s.digest.ToString() + "\n";
  out += "size " + std::to_string(s.size) + "\n";
  out += "frontier " + std::to_string(s.frontier) + "\n";
  out += "sha256 " + ToHex(s.sha_state) + "\n";
  for (const auto& [offset, state] : s.checkpoints) {
    out += "checkpoint " + std::to_string(offset) + " " + ToHex(state) + "\n";
  }
  for (const ByteRange& r : s.present.Ranges()) {
    out += "range " + std::to_string(r.begin) + " " + std::to_string(r.end) + "\n";
  }
  for (const ByteRange& r : s.verified.Ranges()) {
    out += "verified " + std::to_string(r.begin) + " " + std::to_string(r.end) + "\n";
  }
  for (const auto& [offset, troubles] : s.suspects) {
    out += "suspect " + std::to_string(offset) + " " + std::to_string(troubles) + "\n";
  }
  out += "checksum " + Sha256::Of(out).Hex() + "\n";
  return out;
}

StatusOr<PartialState> DecodeState(std::string_view text, const Digest& digest, uint64_t size) {
  // The checksum line is last; everything before it is covered.
  if (text.empty() || text.back() != '\n') return DataLoss("state file is truncated");
  size_t last = text.rfind('\n', text.size() - 2);
  if (last == std::string_view::npos) return DataLoss("state file has no checksum");
  std::string_view body = text.substr(0, last + 1);
  std::string_view sum;
  if (!Field(text.substr(last + 1, text.size() - last - 2), "checksum", &sum)) {
    return DataLoss("state file has no checksum line");
  }
  if (sum != Sha256::Of(body).Hex()) return DataLoss("state file checksum mismatch");

  std::vector<std::string_view> lines;
  for (size_t pos = 0; pos < body.size();) {
    size_t nl = body.find('\n', pos);
    lines.push_back(body.substr(pos, nl - pos));
    pos = nl + 1;
  }
  if (lines.size() < 5) return DataLoss("state file is too short");
  std::string_view v;
  if (!Field(lines[0], kMagic, &v)) return DataLoss("state file has a bad magic line");
  if (v != std::to_string(kStateVersion) && v != "2" && v != "1") {
    return FailedPrecondition("state file has version " + std::string(v.substr(0, 20)));
  }
  PartialState s;
  if (!Field(lines[1], "digest", &v)) return DataLoss("state file: missing digest");
  auto d = Digest::Parse(v);
  if (!d.ok()) return DataLoss("state file: bad digest");
  s.digest = *d;
  if (s.digest != digest) return FailedPrecondition("state file is for another blob");
  if (!Field(lines[2], "size", &v) || !ParseU64(v, &s.size)) {
    return DataLoss("state file: bad size");
  }
  if (s.size != size) {
    return FailedPrecondition("state file is for size " + std::to_string(s.size) + ", not " +
                              std::to_string(size));
  }
  if (!Field(lines[3], "frontier", &v) || !ParseU64(v, &s.frontier) || s.frontier > size) {
    return DataLoss("state file: bad frontier");
  }
  if (!Field(lines[4], "sha256", &v) || !FromHex(v, &s.sha_state)) {
    return DataLoss("state file: bad sha256 state");
  }
  // The checksum vouches for the bytes, so a hash state this build cannot use (another
  // OpenSSL's SHA256_CTX layout) only costs re-hashing: keep the ranges, restart the frontier.
  const uint64_t claimed_frontier = s.frontier;
  auto hasher = Sha256::LoadState(s.sha_state);
  if (!hasher.ok() || hasher->bytes_hashed() != s.frontier) {
    s.frontier = 0;
    s.sha_state = Sha256().SaveState();
    s.hash_reset = true;
  }
  size_t i = 5;
  for (; i < lines.size(); ++i) {
    std::string_view rest;
    if (!Field(lines[i], "checkpoint", &rest)) break;
    size_t sp = rest.find(' ');
    uint64_t off;
    std::string state;
    if (sp == std::string_view::npos || !ParseU64(rest.substr(0, sp), &off) ||
        !FromHex(rest.substr(sp + 1), &state) || off > claimed_frontier ||
        (!s.checkpoints.empty() && off <= s.checkpoints.rbegin()->first)) {
      return DataLoss("state file: bad checkpoint line");
    }
    s.checkpoints[off] = std::move(state);
  }
  // As with the frontier's state: one this build cannot load only costs re-hashing (they are
  // all dropped; repair then restarts hashing from offset 0).
  for (const auto& [off, state] : s.checkpoints) {
    auto h = Sha256::LoadState(state);
    if (s.hash_reset || !h.ok() || h->bytes_hashed() != off) {
      s.checkpoints.clear();
      break;
    }
  }
  // "<keyword> <begin> <end>" lines: ascending, disjoint, non-empty, within the blob.
  auto ranges = [&](std::string_view keyword, RangeSet* out) -> Status {
    const size_t first = i;
    uint64_t prev_end = 0;
    for (; i < lines.size(); ++i) {
      std::string_view rest;
      if (!Field(lines[i], keyword, &rest)) break;
      size_t sp = rest.find(' ');
      uint64_t b, e;
      if (sp == std::string_view::npos || !ParseU64(rest.substr(0, sp), &b) ||
          !ParseU64(rest.substr(sp + 1), &e) || b >= e || e > size ||
          (i > first && b <= prev_end)) {
        return DataLoss("state file: bad " + std::string(keyword) + " line");
      }
      prev_end = e;
      out->Add(b, e);
    }
    return Status::Ok();
  };
  RETURN_IF_ERROR(ranges("range", &s.present));
  RETURN_IF_ERROR(ranges("verified", &s.verified));
  for (; i < lines.size(); ++i) {
    std::string_view rest;
    if (!Field(lines[i], "suspect", &rest)) break;
    const size_t sp = rest.find(' ');
    uint64_t off, troubles;
    if (sp == std::string_view::npos || !ParseU64(rest.substr(0, sp), &off) ||
        !ParseU64(rest.substr(sp + 1), &troubles) || off >= size || troubles == 0 ||
        troubles > UINT32_MAX || (!s.suspects.empty() && off <= s.suspects.rbegin()->first)) {
      return DataLoss("state file: bad suspect line");
    }
    s.suspects[off] = static_cast<uint32_t>(troubles);
  }
  if (i != lines.size()) return DataLoss("state file: unexpected line");
  for (const ByteRange& r : s.verified.Ranges()) {
    if (!s.present.Contains(r.begin, r.end)) {
      return DataLoss("state file: verified bytes that are not present");
    }
  }
  if (s.frontier > s.present.PrefixEnd()) {
    return DataLoss("state file: frontier is past the present prefix");
  }
  return s;
}

}  // namespace modelfs::cache
