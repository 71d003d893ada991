// RangeSet: a set of disjoint, non-adjacent half-open byte ranges [begin, end), kept merged.
// Used for "bytes present" in a partial blob and for "bytes still wanted" by a fetch.
// Value type; not thread-safe (the owner locks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

namespace modelfs {

struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;  // exclusive
  uint64_t size() const { return end - begin; }
  bool empty() const { return end <= begin; }
  friend bool operator==(const ByteRange&, const ByteRange&) = default;
};

class RangeSet {
 public:
  // Adds [begin, end); merges with overlapping and adjacent ranges. Empty ranges are ignored.
  void Add(uint64_t begin, uint64_t end);
  void Add(ByteRange r) { Add(r.begin, r.end); }
  // Removes [begin, end) from the set.
  void Remove(uint64_t begin, uint64_t end);

  bool Contains(uint64_t begin, uint64_t end) const;  // true for an empty range
  // The parts of [begin, end) not in the set, in order.
  std::vector<ByteRange> Missing(uint64_t begin, uint64_t end) const;
  // End of the range that starts at 0, or 0 when offset 0 is missing.
  uint64_t PrefixEnd() const;
  // End of the contiguous run containing offset, or offset itself when it is missing.
  uint64_t RunEnd(uint64_t offset) const;
  uint64_t TotalBytes() const { return total_; }
  bool empty() const { return ranges_.empty(); }
  size_t RangeCount() const { return ranges_.size(); }
  std::vector<ByteRange> Ranges() const;
  void Clear() {
    ranges_.clear();
    total_ = 0;
  }

  friend bool operator==(const RangeSet& a, const RangeSet& b) { return a.ranges_ == b.ranges_; }

 private:
  std::map<uint64_t, uint64_t> ranges_;  // begin -> end
  uint64_t total_ = 0;
};

}  // namespace modelfs
