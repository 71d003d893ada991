#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "fetch/registry.h"

namespace modelfs::fetch {
namespace {

class CredentialsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/modelfs-creds-XXXXXX";
    int fd = mkstemp(tmpl);
    ASSERT_GE(fd, 0);
    close(fd);
    path_ = tmpl;
  }
  void TearDown() override { std::remove(path_.c_str()); }
  void Write(const std::string& s) { std::ofstream(path_) << s; }
  std::string path_;
};

TEST_F(CredentialsTest, ParsesAuthAndUsernamePassword) {
  Write(R"({"auths": {
    "https://index.docker.io/v1/": {"auth": "dXNlcjpwYTpzcw=="},
    "Registry.Example.com:5000": {"username": "bob", "password": "secret"},
    "https://ghcr.io": {"auth": "YTpi"},
    "helper.example.com": {}
  }, "credsStore": "desktop"})");
  auto c = LoadCredentials(path_, false);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->size(), 3u);
  EXPECT_EQ(c->at("index.docker.io").username, "user");
  EXPECT_EQ(c->at("index.docker.io").password, "pa:ss");  // split at the first colon
  EXPECT_EQ(c->at("registry.example.com:5000").username, "bob");
  EXPECT_EQ(c->at("registry.example.com:5000").password, "secret");
  EXPECT_EQ(c->at("ghcr.io").username, "a");
}

TEST_F(CredentialsTest, MissingFile) {
  auto opt = LoadCredentials("/nonexistent/modelfs/config.json", true);
  ASSERT_TRUE(opt.ok());
  EXPECT_TRUE(opt->empty());
  EXPECT_FALSE(LoadCredentials("/nonexistent/modelfs/config.json", false).ok());
}

TEST_F(CredentialsTest, RejectsMalformedWithoutLeakingSecrets) {
  Write("{not json");
  EXPECT_EQ(LoadCredentials(path_, false).status().code(), Code::kInvalidArgument);
  Write(R"({"auths": {"h": {"auth": "c2VjcmV0d2l0aG91dGNvbG9u"}}})");
  auto s = LoadCredentials(path_, false);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().message().find("c2VjcmV0"), std::string::npos);
  Write(R"({"auths": []})");
  EXPECT_FALSE(LoadCredentials(path_, false).ok());
  Write(R"({})");
  EXPECT_TRUE(LoadCredentials(path_, false).ok());
}

}  // namespace
}  // namespace modelfs::fetch
