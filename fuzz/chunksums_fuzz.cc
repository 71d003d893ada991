// Chunksums from an untrusted registry. Input: 8 bytes of blob size (little endian), then the
// text. Invariants: accepted chunks are non-empty, contiguous, and cover [0, size) exactly.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "fuzz/fuzz_check.h"
#include "fetch/chunksums.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t blob_size;
  std::memcpy(&blob_size, data, 8);
  std::string_view text(reinterpret_cast<const char*>(data + 8), size - 8);
  auto chunks = modelfs::fetch::ParseChunksums(text, blob_size);
  if (chunks.ok()) {
    uint64_t next = 0;
    for (const auto& c : *chunks) {
      FUZZ_CHECK(c.begin == next);
      FUZZ_CHECK(c.end > c.begin);
      next = c.end;
    }
    FUZZ_CHECK(next == blob_size);
  }
  return 0;
}
