#include "base/range_set.h"

#include <gtest/gtest.h>

#include <random>

namespace modelfs {
namespace {

TEST(RangeSetTest, MergesAdjacentRanges) {
  RangeSet s;
  s.Add(0, 10);
  s.Add(10, 20);
  ASSERT_EQ(s.RangeCount(), 1u);
  EXPECT_EQ(s.PrefixEnd(), 20u);
  EXPECT_EQ(s.TotalBytes(), 20u);
}

TEST(RangeSetTest, MergesOverlapsAndBridgesGaps) {
  RangeSet s;
  s.Add(10, 20);
  s.Add(30, 40);
  s.Add(15, 35);
  ASSERT_EQ(s.RangeCount(), 1u);
  EXPECT_EQ(s.Ranges()[0], (ByteRange{10, 40}));
  EXPECT_EQ(s.PrefixEnd(), 0u);
}

TEST(RangeSetTest, MissingListsGapsInOrder) {
  RangeSet s;
  s.Add(10, 20);
  s.Add(30, 40);
  auto m = s.Missing(0, 50);
  ASSERT_EQ(m.size(), 3u);
  EXPECT_EQ(m[0], (ByteRange{0, 10}));
  EXPECT_EQ(m[1], (ByteRange{20, 30}));
  EXPECT_EQ(m[2], (ByteRange{40, 50}));
  EXPECT_TRUE(s.Missing(12, 18).empty());
  EXPECT_TRUE(s.Contains(30, 40));
  EXPECT_FALSE(s.Contains(19, 21));
  EXPECT_EQ(s.RunEnd(15), 20u);
  EXPECT_EQ(s.RunEnd(25), 25u);
}

TEST(RangeSetTest, RemoveSplitsRanges) {
  RangeSet s;
  s.Add(0, 100);
  s.Remove(10, 20);
  s.Remove(90, 200);
  EXPECT_EQ(s.TotalBytes(), 80u);
  auto r = s.Ranges();
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0], (ByteRange{0, 10}));
  EXPECT_EQ(r[1], (ByteRange{20, 90}));
}

// Against a byte map: random adds and removes agree on every query.
TEST(RangeSetTest, MatchesBitmapModel) {
  std::mt19937 rng(7);
  RangeSet s;
  std::vector<bool> model(512, false);
  for (int i = 0; i < 2000; ++i) {
    uint64_t b = rng() % 512, e = b + rng() % 40;
    if (e > 512) e = 512;
    bool add = rng() % 3 != 0;
    if (add) s.Add(b, e);
    else s.Remove(b, e);
    for (uint64_t k = b; k < e; ++k) model[k] = add;
    uint64_t total = 0;
    for (bool x : model) total += x;
    ASSERT_EQ(s.TotalBytes(), total);
    uint64_t prefix = 0;
    while (prefix < 512 && model[prefix]) ++prefix;
    ASSERT_EQ(s.PrefixEnd(), prefix);
  }
}

}  // namespace
}  // namespace modelfs
