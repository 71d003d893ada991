#include "fetch/chunksums.h"

#include <limits>
#include <string>

namespace modelfs::fetch {
namespace {

constexpr std::string_view kBlanks = " \t";

// Decimal digits only, no sign, no leading zero unless the number is "0", no overflow.
bool ParseOffset(std::string_view s, uint64_t* out) {
  if (s.empty() || s.size() > 20) return false;
  if (s.size() > 1 && s[0] == '0') return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (std::numeric_limits<uint64_t>::max() - d) / 10) return false;
    v = v * 10 + d;
  }
  *out = v;
  return true;
}

Status LineError(size_t line, const std::string& what) {
  return InvalidArgument("chunksums line " + std::to_string(line) + ": " + what);
}

}  // namespace

StatusOr<std::vector<Chunk>> ParseChunksums(std::string_view text, uint64_t blob_size) {
  std::vector<Chunk> chunks;
  uint64_t next = 0;  // where the next chunk must start
  size_t line_no = 0;
  while (!text.empty()) {
    ++line_no;
    size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text.remove_prefix(nl == std::string_view::npos ? text.size() : nl + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    // Ollama documents the pairs as "whitespace-separated": blanks may pad the separator and end
    // of a line, never its start.
    line = line.substr(0, line.find_last_not_of(kBlanks) + 1);  // npos + 1 == 0
    // A final "\n" ends the loop before an empty line is seen, so any empty line is an error.
    if (line.empty()) return LineError(line_no, "empty line");
    if (chunks.size() >= kMaxChunks) return LineError(line_no, "too many chunks");
    size_t sp = line.find_first_of(kBlanks);
    if (sp == std::string_view::npos) return LineError(line_no, "want '<digest> <start>-<end>'");
    auto digest = Digest::Parse(line.substr(0, sp));
    if (!digest.ok()) return LineError(line_no, "bad digest");
    // The line ends in a non-blank, so one follows the separator.
    std::string_view range = line.substr(line.find_first_not_of(kBlanks, sp));
    size_t dash = range.find('-');
    uint64_t first = 0, last = 0;
    if (dash == std::string_view::npos || !ParseOffset(range.substr(0, dash), &first) ||
        !ParseOffset(range.substr(dash + 1), &last)) {
      return LineError(line_no, "bad range (want <start>-<end>, decimal)");
    }
    if (last < first) return LineError(line_no, "range ends before it starts");
    if (first != next) {
      return LineError(line_no, "chunk starts at " + std::to_string(first) + ", want " +
                                    std::to_string(next) + " (chunks must be contiguous)");
    }
    if (last >= blob_size) {
      return LineError(line_no,
                       "chunk ends past the blob's " + std::to_string(blob_size) + " bytes");
    }
    chunks.push_back(Chunk{*digest, first, last + 1});
    next = last + 1;
  }
  if (next != blob_size) {
    return InvalidArgument("chunksums cover " + std::to_string(next) + " of " +
                           std::to_string(blob_size) + " bytes");
  }
  return chunks;
}

}  // namespace modelfs::fetch
