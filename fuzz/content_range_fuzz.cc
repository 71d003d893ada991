// Content-Range headers from an untrusted server. Invariants: begin < end, and end <= total.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fetch/content_range.h"
#include "fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  auto r = modelfs::fetch::ParseContentRange(in);
  if (r) {
    FUZZ_CHECK(r->begin < r->end);
    if (r->total) FUZZ_CHECK(r->end <= *r->total);
  }
  return 0;
}
