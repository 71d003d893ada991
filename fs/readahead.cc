#include "fs/readahead.h"

#include <algorithm>

namespace modelfs::fs {
namespace {

// The kernel issues a stream's reads concurrently and slightly out of order; a read this close
// to the expected position still belongs to the stream.
constexpr uint64_t kSlack = 4 << 20;

uint64_t AlignDown(uint64_t x) { return x / Readahead::kAlign * Readahead::kAlign; }
uint64_t AlignUp(uint64_t x, uint64_t size) {
  uint64_t up = (x + Readahead::kAlign - 1) / Readahead::kAlign * Readahead::kAlign;
  return std::min(up, size);
}

}  // namespace

ByteRange Readahead::OnRead(uint64_t offset, uint64_t len, uint64_t size) {
  const uint64_t end = std::min(size, offset + len);
  ByteRange out{AlignDown(offset), AlignUp(end, size)};
  const bool streaming = next_ != 0 && offset + kSlack >= next_ && offset <= next_ + kSlack;
  next_ = std::max(streaming ? next_ : 0, end);
  if (!streaming) {
    window_ = 0;
    ahead_end_ = out.end;
    return out;
  }
  if (ahead_end_ < out.end || ahead_end_ - end < window_ / 2) {
    window_ = std::clamp(window_ * 2, kMinWindow, kMaxWindow);
    uint64_t from = std::max(ahead_end_, out.end);
    ahead_end_ = AlignUp(std::max(from, end + window_), size);
    out.end = std::max(out.end, ahead_end_);
  }
  return out;
}

}  // namespace modelfs::fs
