#include "base/range_set.h"

#include <algorithm>

namespace modelfs {

void RangeSet::Add(uint64_t begin, uint64_t end) {
  if (end <= begin) return;
  // First range whose begin is > begin; step back one if it touches.
  auto it = ranges_.upper_bound(begin);
  if (it != ranges_.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= begin) it = prev;
  }
  while (it != ranges_.end() && it->first <= end) {
    begin = std::min(begin, it->first);
    end = std::max(end, it->second);
    total_ -= it->second - it->first;
    it = ranges_.erase(it);
  }
  ranges_.emplace(begin, end);
  total_ += end - begin;
}

void RangeSet::Remove(uint64_t begin, uint64_t end) {
  if (end <= begin) return;
  auto it = ranges_.upper_bound(begin);
  if (it != ranges_.begin()) --it;
  while (it != ranges_.end() && it->first < end) {
    uint64_t rb = it->first, re = it->second;
    if (re <= begin) {
      ++it;
      continue;
    }
    total_ -= re - rb;
    it = ranges_.erase(it);
    if (rb < begin) {
      ranges_.emplace(rb, begin);
      total_ += begin - rb;
    }
    if (re > end) {
      ranges_.emplace(end, re);
      total_ += re - end;
      break;
    }
  }
}

bool RangeSet::Contains(uint64_t begin, uint64_t end) const {
  if (end <= begin) return true;
  auto it = ranges_.upper_bound(begin);
  if (it == ranges_.begin()) return false;
  --it;
  return it->first <= begin && it->second >= end;
}

std::vector<ByteRange> RangeSet::Missing(uint64_t begin, uint64_t end) const {
  std::vector<ByteRange> out;
  if (end <= begin) return out;
  uint64_t pos = begin;
  auto it = ranges_.upper_bound(begin);
  if (it != ranges_.begin()) --it;
  for (; it != ranges_.end() && it->first < end && pos < end; ++it) {
    if (it->second <= pos) continue;
    if (it->first > pos) out.push_back({pos, std::min(it->first, end)});
    pos = std::max(pos, it->second);
  }
  if (pos < end) out.push_back({pos, end});
  return out;
}

uint64_t RangeSet::PrefixEnd() const {
  auto it = ranges_.find(0);
  return it == ranges_.end() ? 0 : it->second;
}

uint64_t RangeSet::RunEnd(uint64_t offset) const {
  auto it = ranges_.upper_bound(offset);
  if (it == ranges_.begin()) return offset;
  --it;
  return it->second > offset ? it->second : offset;
}

std::vector<ByteRange> RangeSet::Ranges() const {
  std::vector<ByteRange> out;
  out.reserve(ranges_.size());
  for (auto& [b, e] : ranges_) out.push_back({b, e});
  return out;
}

}  // namespace modelfs
