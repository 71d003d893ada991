// Byte sizes and durations as users type and read them.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/status.h"

namespace modelfs {

// "65536", "64K", "64KiB", "64M", "64MiB", "1G", "1.5G" (binary units; a trailing "B" is
// optional; "KB"/"MB"/"GB" are accepted and also binary). Rejects negatives, overflow, garbage.
StatusOr<uint64_t> ParseSize(std::string_view text);
// "10", "10s", "500ms", "2m": seconds, as a double.
StatusOr<double> ParseSeconds(std::string_view text);
// 1536 → "1.5 KiB"; below 1 KiB → "N B".
std::string FormatBytes(uint64_t bytes);

}  // namespace modelfs
