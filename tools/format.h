// Human formatting for the operating commands: sizes as `ollama` prints them (decimal units:
// "1.2 GB", "85 MB/s"), durations ("9s", "1m20s", "2h05m"), ages ("3 minutes ago") and simple
// left-aligned tables. Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <ctime>
#include <string>
#include <vector>

namespace modelfs::tools {

std::string HumanBytes(uint64_t bytes);  // "999 B", "1.2 KB", "85 MB", "2.0 GB"
std::string HumanDuration(double seconds);
std::string HumanAge(time_t when, time_t now);
// Rows (the first is the header) padded to column widths, two spaces apart.
std::string Table(const std::vector<std::vector<std::string>>& rows);

}  // namespace modelfs::tools
