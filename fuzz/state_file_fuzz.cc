// Partial-blob state files (cache/state_file.h) as a crash or an attacker may leave them.
// Input byte 0 bit 0: when set, the "checksum" line is recomputed over the body before decoding,
// so the fuzzer reaches the field parsers behind the checksum. Invariants: an accepted state is
// within bounds (verified bytes are present bytes), and re-encoding it decodes to the same state.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "base/digest.h"
#include "cache/state_file.h"
#include "fuzz/fuzz_check.h"

namespace cache = modelfs::cache;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static const modelfs::Digest kDigest = modelfs::Sha256::Of("modelfs fuzz blob");
  constexpr uint64_t kSize = 1 << 20;
  bool fix_checksum = data[0] & 1;
  std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  if (fix_checksum) {
    size_t pos = text.rfind("checksum ");
    if (pos != std::string::npos && (pos == 0 || text[pos - 1] == '\n')) {
      text = text.substr(0, pos);
      text += "checksum " + modelfs::Sha256::Of(text).Hex() + "\n";
    }
  }
  auto s = cache::DecodeState(text, kDigest, kSize);
  if (s.ok()) {
    FUZZ_CHECK(s->digest == kDigest && s->size == kSize);
    FUZZ_CHECK(s->frontier <= s->present.PrefixEnd());
    for (const auto& r : s->present.Ranges()) FUZZ_CHECK(r.begin < r.end && r.end <= kSize);
    for (const auto& r : s->verified.Ranges()) FUZZ_CHECK(s->present.Contains(r.begin, r.end));
    for (const auto& [off, troubles] : s->suspects) FUZZ_CHECK(off < kSize && troubles > 0);
    auto again = cache::DecodeState(cache::EncodeState(*s), kDigest, kSize);
    FUZZ_CHECK(again.ok());
    FUZZ_CHECK(again->present == s->present && again->frontier == s->frontier);
    FUZZ_CHECK(again->verified == s->verified && again->suspects == s->suspects);
  }
  return 0;
}
