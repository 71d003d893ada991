#include "fetch/content_range.h"

#include <gtest/gtest.h>

namespace modelfs::fetch {
namespace {

TEST(ContentRangeTest, ParsesWellFormed) {
  auto r = ParseContentRange("bytes 0-99/1000");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->begin, 0u);
  EXPECT_EQ(r->end, 100u);
  ASSERT_TRUE(r->total);
  EXPECT_EQ(*r->total, 1000u);
}

TEST(ContentRangeTest, AcceptsUnknownTotalCaseAndSpace) {
  auto r = ParseContentRange("  Bytes 5-5/*\r\n");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->begin, 5u);
  EXPECT_EQ(r->end, 6u);
  EXPECT_FALSE(r->total);
}

TEST(ContentRangeTest, LargeValues) {
  auto r = ParseContentRange("bytes 68719476736-137438953471/137438953472");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->end, 137438953472u);
}

TEST(ContentRangeTest, RejectsMalformed) {
  for (const char* bad :
       {"", "bytes", "bytes ", "items 0-1/2", "bytes 0-1", "bytes 1-0/5", "bytes 0-5/5",
        "bytes */100", "bytes -1-5/10", "bytes 0-1/2x", "bytes 0 - 1/2", "bytes=0-1/2",
        "bytes 0-99999999999999999999999/1", "bytes 18446744073709551615-18446744073709551615/*",
        "bytes 0-1/", "bytes a-b/c", "bytes 00000000000000000000001-2/3"}) {
    EXPECT_FALSE(ParseContentRange(bad)) << bad;
  }
}

}  // namespace
}  // namespace modelfs::fetch
