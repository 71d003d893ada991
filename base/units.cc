#include "base/units.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace modelfs {
namespace {

bool ParseNumber(std::string_view text, double* value, std::string_view* suffix) {
  size_t i = 0;
  while (i < text.size() && ((text[i] >= '0' && text[i] <= '9') || text[i] == '.')) ++i;
  if (i == 0) return false;
  std::string num(text.substr(0, i));
  char* end = nullptr;
  *value = std::strtod(num.c_str(), &end);
  if (end != num.c_str() + num.size() || !std::isfinite(*value)) return false;
  *suffix = text.substr(i);
  return true;
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c);
  return out;
}

}  // namespace

StatusOr<uint64_t> ParseSize(std::string_view text) {
  double v;
  std::string_view suffix;
  if (!ParseNumber(text, &v, &suffix)) return InvalidArgument("not a size: " + std::string(text));
  std::string s = Lower(suffix);
  if (!s.empty() && s.back() == 'b') s.pop_back();
  if (s.size() == 2 && s[1] == 'i') s.pop_back();
  double mult;
  if (s.empty()) mult = 1;
  else if (s == "k") mult = 1024.0;
  else if (s == "m") mult = 1024.0 * 1024;
  else if (s == "g") mult = 1024.0 * 1024 * 1024;
  else if (s == "t") mult = 1024.0 * 1024 * 1024 * 1024;
  else return InvalidArgument("unknown size unit in " + std::string(text));
  double bytes = v * mult;
  if (bytes >= 18446744073709551615.0) return InvalidArgument("size too large: " + std::string(text));
  return static_cast<uint64_t>(bytes);
}

StatusOr<double> ParseSeconds(std::string_view text) {
  double v;
  std::string_view suffix;
  if (!ParseNumber(text, &v, &suffix)) {
    return InvalidArgument("not a duration: " + std::string(text));
  }
  std::string s = Lower(suffix);
  if (s.empty() || s == "s") return v;
  if (s == "ms") return v / 1000;
  if (s == "m" || s == "min") return v * 60;
  if (s == "h") return v * 3600;
  return InvalidArgument("unknown duration unit in " + std::string(text));
}

std::string FormatBytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0) std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  else std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[u]);
  return buf;
}

}  // namespace modelfs
