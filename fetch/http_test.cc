#include "fetch/http.h"

#include <gtest/gtest.h>

#include "fetch/url.h"

namespace modelfs::fetch {
namespace {

TEST(HttpTest, ParsesRetryAfter) {
  EXPECT_EQ(ParseRetryAfter("7"), 7);
  EXPECT_EQ(ParseRetryAfter("0"), 0);
  EXPECT_LT(ParseRetryAfter(""), 0);
  EXPECT_LT(ParseRetryAfter("soon"), 0);
  EXPECT_EQ(ParseRetryAfter("Wed, 21 Oct 2015 07:28:00 GMT"), 0);  // in the past
  double future = ParseRetryAfter("Fri, 01 Jan 2100 00:00:00 GMT");
  EXPECT_GT(future, 1e8);
}

TEST(HttpTest, HeaderHelpers) {
  std::string v;
  const char line[] = "Content-Range:  bytes 0-1/2\r\n";
  EXPECT_TRUE(HeaderValue(line, sizeof line - 1, "content-range", &v));
  EXPECT_EQ(v, "bytes 0-1/2");
  EXPECT_FALSE(HeaderValue(line, sizeof line - 1, "content-type", &v));
  const char status[] = "HTTP/2 206 \r\n";
  EXPECT_EQ(StatusLineCode(status, sizeof status - 1), 206);
  const char bad[] = "HTTP/1.1 2x6 OK\r\n";
  EXPECT_EQ(StatusLineCode(bad, sizeof bad - 1), 0);
}

TEST(UrlTest, PartsRedactionAndOrigin) {
  auto p = ParseUrl("HTTPS://Example.COM:443/v2/x?y=1");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->scheme, "https");
  EXPECT_EQ(p->authority, "example.com");
  EXPECT_EQ(p->path, "/v2/x?y=1");
  EXPECT_EQ(ParseUrl("http://[::1]:5000/v2/")->authority, "[::1]:5000");
  EXPECT_FALSE(ParseUrl("ftp://x/"));
  EXPECT_FALSE(ParseUrl("https://user:pw@x/"));
  EXPECT_FALSE(ParseUrl("https:///x"));
  EXPECT_FALSE(ParseUrl("https://x:5a/"));
  EXPECT_EQ(RedactUrl("https://cdn/blob?X-Amz-Signature=abc"), "https://cdn/blob?…");
  EXPECT_EQ(RedactUrl("https://cdn/blob"), "https://cdn/blob");
  EXPECT_TRUE(SameOrigin("https://a:443/x", "https://A/y"));
  EXPECT_FALSE(SameOrigin("https://a/x", "http://a/x"));
  EXPECT_FALSE(SameOrigin("http://a:1/x", "http://a:2/x"));
  EXPECT_EQ(TrimRegistry("https://r:5000//"), "https://r:5000");
}

}  // namespace
}  // namespace modelfs::fetch
