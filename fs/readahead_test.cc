#include "fs/readahead.h"

#include <gtest/gtest.h>

namespace modelfs::fs {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kSize = 1024 * kMiB;

TEST(ReadaheadTest, RandomReadFetchesItsAlignedWindow) {
  Readahead ra;
  ByteRange r = ra.OnRead(300 * kMiB + 5, 4096, kSize);
  EXPECT_EQ(r.begin, 300 * kMiB);
  EXPECT_EQ(r.end, 301 * kMiB);
  r = ra.OnRead(10 * kMiB, 4096, kSize);  // a seek: no window
  EXPECT_EQ(r.begin, 10 * kMiB);
  EXPECT_EQ(r.end, 11 * kMiB);
  EXPECT_EQ(ra.window(), 0u);
}

TEST(ReadaheadTest, WindowIsClampedToTheFile) {
  Readahead ra;
  ByteRange r = ra.OnRead(kSize - 10, 4096, kSize);
  EXPECT_EQ(r.begin, kSize - kMiB);
  EXPECT_EQ(r.end, kSize);
}

TEST(ReadaheadTest, StreamGrowsWindowAheadOfReader) {
  Readahead ra;
  uint64_t off = 0;
  uint64_t max_ahead = 0;
  for (int i = 0; i < 400; ++i) {
    ByteRange r = ra.OnRead(off, 128 << 10, kSize);
    EXPECT_LE(r.begin, off);
    EXPECT_GE(r.end, off + (128 << 10));
    max_ahead = std::max(max_ahead, r.end - off);
    off += 128 << 10;
  }
  EXPECT_EQ(ra.window(), Readahead::kMaxWindow);
  EXPECT_GE(max_ahead, Readahead::kMaxWindow);
}

TEST(ReadaheadTest, StreamRefillsOnlyWhenHalfTheWindowIsLeft) {
  Readahead ra;
  ra.OnRead(0, kMiB, kSize);
  ByteRange first = ra.OnRead(kMiB, kMiB, kSize);  // streaming starts: 4 MiB ahead
  EXPECT_EQ(first.end, 6 * kMiB);
  ByteRange second = ra.OnRead(2 * kMiB, kMiB, kSize);  // 3 MiB left of 4: no refill
  EXPECT_EQ(second.end, 3 * kMiB);
}

TEST(ReadaheadTest, SlightlyOutOfOrderReadsStayInTheStream) {
  Readahead ra;
  ra.OnRead(0, kMiB, kSize);
  ra.OnRead(2 * kMiB, kMiB, kSize);
  ra.OnRead(kMiB, kMiB, kSize);
  EXPECT_GT(ra.window(), 0u);
}

}  // namespace
}  // namespace modelfs::fs
