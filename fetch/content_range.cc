#include "fetch/content_range.h"

#include <cctype>
#include <limits>

namespace modelfs::fetch {
namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() &&
         (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n'))
    s.remove_suffix(1);
  return s;
}

// Parses a run of decimal digits at the front of s; consumes them.
std::optional<uint64_t> TakeNumber(std::string_view& s) {
  size_t i = 0;
  uint64_t v = 0;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
    uint64_t d = static_cast<uint64_t>(s[i] - '0');
    if (v > (std::numeric_limits<uint64_t>::max() - d) / 10) return std::nullopt;
    v = v * 10 + d;
    ++i;
  }
  if (i == 0 || i > 20) return std::nullopt;
  s.remove_prefix(i);
  return v;
}

}  // namespace

std::optional<ContentRange> ParseContentRange(std::string_view value) {
  std::string_view s = Trim(value);
  constexpr std::string_view kUnit = "bytes";
  if (s.size() < kUnit.size()) return std::nullopt;
  for (size_t i = 0; i < kUnit.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(s[i])) != kUnit[i]) return std::nullopt;
  }
  s.remove_prefix(kUnit.size());
  if (s.empty() || (s.front() != ' ' && s.front() != '\t')) return std::nullopt;
  s = Trim(s);
  auto first = TakeNumber(s);
  if (!first || s.empty() || s.front() != '-') return std::nullopt;
  s.remove_prefix(1);
  auto last = TakeNumber(s);
  if (!last || s.empty() || s.front() != '/') return std::nullopt;
  s.remove_prefix(1);
  if (*last < *first || *last == std::numeric_limits<uint64_t>::max()) return std::nullopt;
  ContentRange r;
  r.begin = *first;
  r.end = *last + 1;
  if (s == "*") return r;
  auto total = TakeNumber(s);
  if (!total || !s.empty()) return std::nullopt;
  if (*last >= *total) return std::nullopt;
  r.total = *total;
  return r;
}

}  // namespace modelfs::fetch
