#include "fetch/auth.h"

#include <gtest/gtest.h>

#include <random>

namespace modelfs::fetch {
namespace {

TEST(ChallengeTest, ParsesDockerBearer) {
  auto c = ParseChallenge(
      R"(Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull")");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->scheme, AuthScheme::kBearer);
  EXPECT_EQ(c->realm, "https://auth.docker.io/token");
  EXPECT_EQ(c->service, "registry.docker.io");
  EXPECT_EQ(c->scope, "repository:library/ubuntu:pull");
}

TEST(ChallengeTest, CaseInsensitiveSpacesTokensAndEscapes) {
  auto c = ParseChallenge(
      "bEaReR  REALM = \"https://x/t?a=1\" , Service=svc,scope=\"a \\\"b\\\" \\\\c\"  ");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->realm, "https://x/t?a=1");
  EXPECT_EQ(c->service, "svc");
  EXPECT_EQ(c->scope, "a \"b\" \\c");
}

TEST(ChallengeTest, PrefersBearerAmongSeveral) {
  auto c = ParseChallenge(R"(Basic realm="reg", Bearer realm="https://a/token",service="s")");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->scheme, AuthScheme::kBearer);
  EXPECT_EQ(c->service, "s");
  auto b = ParseChallenge(R"(Negotiate abc==, Basic realm="Registry Realm")");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->scheme, AuthScheme::kBasic);
  EXPECT_EQ(b->realm, "Registry Realm");
}

TEST(ChallengeTest, ParamsDoNotLeakAcrossChallenges) {
  auto c = ParseChallenge(R"(Bearer realm="https://a/t", Foo service="leak", scope="x")");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->service, "");
}

TEST(ChallengeTest, RejectsUnusable) {
  EXPECT_FALSE(ParseChallenge("").ok());
  EXPECT_FALSE(ParseChallenge("Bearer").ok());  // no realm
  EXPECT_FALSE(ParseChallenge("Digest realm=\"x\"").ok());
  EXPECT_FALSE(ParseChallenge("===,,,\"\"\"").ok());
}

TEST(ChallengeTest, HostileInputNeverCrashes) {
  std::mt19937 rng(42);
  const std::string alphabet = "Bearer Basic realm=\"\\,= \t\r\nxyz";
  for (int i = 0; i < 20000; ++i) {
    std::string s;
    int len = static_cast<int>(rng() % 64);
    for (int j = 0; j < len; ++j) s += alphabet[rng() % alphabet.size()];
    (void)ParseChallenge(s);
  }
  (void)ParseChallenge(std::string(1 << 20, '"'));
  (void)ParseChallenge("Bearer realm=\"" + std::string(1 << 20, '\\'));
  std::string nul("Bearer realm=\"a\0b\"", 18);
  auto c = ParseChallenge(nul);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->realm.size(), 3u);
}

TEST(TokenTest, BuildsUrlWithEncodedParams) {
  Challenge c{AuthScheme::kBearer, "https://auth/token", "my service",
              "repository:a/b:pull repository:c:pull"};
  auto u = TokenUrl(c);
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(*u,
            "https://auth/token?service=my%20service&scope=repository%3Aa%2Fb%3Apull&scope="
            "repository%3Ac%3Apull");
  c.realm = "https://auth/token?x=1";
  EXPECT_EQ(TokenUrl(c)->find("?x=1&service="), std::string("https://auth/token").size());
  c.realm = "ftp://auth/token";
  EXPECT_FALSE(TokenUrl(c).ok());
  c.realm = "/relative";
  EXPECT_FALSE(TokenUrl(c).ok());
}

TEST(TokenTest, ParsesResponses) {
  auto a = ParseTokenResponse(R"({"token":"abc","expires_in":300})");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->token, "abc");
  EXPECT_EQ(a->expires_in_s, 300);
  auto b = ParseTokenResponse(R"({"access_token":"xyz"})");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->token, "xyz");
  EXPECT_EQ(b->expires_in_s, 60);
  EXPECT_FALSE(ParseTokenResponse("not json").ok());
  EXPECT_FALSE(ParseTokenResponse(R"({"token":""})").ok());
  EXPECT_FALSE(ParseTokenResponse(R"([1,2])").ok());
}

TEST(Base64Test, RoundTrips) {
  for (std::string s : {"", "a", "ab", "abc", "abcd", "user:pa ss:w\xff"}) {
    auto d = Base64Decode(Base64Encode(s));
    ASSERT_TRUE(d);
    EXPECT_EQ(*d, s);
  }
  EXPECT_EQ(Base64Encode("user:pass"), "dXNlcjpwYXNz");
  EXPECT_EQ(*Base64Decode("dXNlcjpwYXNz"), "user:pass");
  EXPECT_EQ(*Base64Decode("dXNl\ncjpwYXNz"), "user:pass");
  EXPECT_FALSE(Base64Decode("dX*l"));
  EXPECT_FALSE(Base64Decode("d"));
  EXPECT_EQ(BasicAuthHeaderValue("user", "pass"), "Basic dXNlcjpwYXNz");
}

TEST(HostTest, Normalizes) {
  EXPECT_EQ(NormalizeRegistryHost("registry.example.com"), "registry.example.com");
  EXPECT_EQ(NormalizeRegistryHost("https://Registry.Example.com"), "registry.example.com");
  EXPECT_EQ(NormalizeRegistryHost("https://index.docker.io/v1/"), "index.docker.io");
  EXPECT_EQ(NormalizeRegistryHost("host:5000"), "host:5000");
  EXPECT_EQ(NormalizeRegistryHost("http://host:5000/v2/"), "host:5000");
  EXPECT_EQ(NormalizeRegistryHost("https://host:443"), "host");
  EXPECT_EQ(NormalizeRegistryHost(""), "");
}

}  // namespace
}  // namespace modelfs::fetch
