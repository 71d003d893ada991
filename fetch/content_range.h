// ParseContentRange: the `Content-Range` header of a 206 reply, "bytes <first>-<last>/<total>"
// (total may be "*"). Pure; safe for concurrent use.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace modelfs::fetch {

struct ContentRange {
  uint64_t begin = 0;             // first byte
  uint64_t end = 0;               // exclusive (last + 1)
  std::optional<uint64_t> total;  // absent for "*"
};

// nullopt for anything malformed: other units, last < first, last >= total, overflow, junk.
// Leading/trailing whitespace and a case-insensitive "bytes" are accepted.
std::optional<ContentRange> ParseContentRange(std::string_view value);

}  // namespace modelfs::fetch
