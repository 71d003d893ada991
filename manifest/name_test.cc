#include "manifest/name.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace modelfs::manifest {
namespace {

constexpr std::string_view kDefaultHost = "registry.ollama.ai";

ModelName MustParse(std::string_view text) {
  StatusOr<ModelName> n = ParseModelName(text, kDefaultHost);
  EXPECT_TRUE(n.ok()) << text << ": " << n.status().ToString();
  return n.ok() ? *n : ModelName{};
}

// Expects rejection with a message containing `fragment`; also checks the code.
void ExpectInvalid(std::string_view text, std::string_view fragment) {
  StatusOr<ModelName> n = ParseModelName(text, kDefaultHost);
  ASSERT_FALSE(n.ok()) << "accepted " << text << " as " << n->ToString();
  EXPECT_EQ(n.status().code(), Code::kInvalidArgument);
  EXPECT_NE(n.status().message().find(fragment), std::string::npos)
      << "message: " << n.status().message() << " lacks: " << fragment;
}

TEST(NameTest, ParsesModelOnly) {
  ModelName n = MustParse("llama3.2");
  EXPECT_EQ(n.host, "registry.ollama.ai");
  EXPECT_EQ(n.ns, "library");
  EXPECT_EQ(n.model, "llama3.2");
  EXPECT_EQ(n.tag, "latest");
  EXPECT_EQ(n.Repository(), "library/llama3.2");
  EXPECT_EQ(n.ToString(), "registry.ollama.ai/library/llama3.2:latest");
  EXPECT_EQ(n.CacheKey(), "registry.ollama.ai/library/llama3.2/latest");
}

TEST(NameTest, ParsesModelAndTag) {
  ModelName n = MustParse("llama3.2:1b");
  EXPECT_EQ(n.model, "llama3.2");
  EXPECT_EQ(n.tag, "1b");
}

TEST(NameTest, ParsesNamespace) {
  ModelName n = MustParse("jmorganca/mistral:7b-instruct");
  EXPECT_EQ(n.host, "registry.ollama.ai");
  EXPECT_EQ(n.ns, "jmorganca");
  EXPECT_EQ(n.model, "mistral");
  EXPECT_EQ(n.tag, "7b-instruct");
}

TEST(NameTest, ParsesHuggingFace) {
  ModelName n = MustParse("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M");
  EXPECT_EQ(n.host, "hf.co");
  EXPECT_EQ(n.ns, "bartowski");
  EXPECT_EQ(n.model, "Llama-3.2-1B-Instruct-GGUF");
  EXPECT_EQ(n.tag, "Q4_K_M");
  EXPECT_EQ(n.RequestTag(), "Q4_K_M");
  EXPECT_EQ(n.Repository(), "bartowski/llama-3.2-1b-instruct-gguf");
  EXPECT_EQ(n.CacheKey(), "hf.co/bartowski/llama-3.2-1b-instruct-gguf/q4_k_m");
}

TEST(NameTest, ParsesHostWithPort) {
  ModelName n = MustParse("127.0.0.1:5000/ns/model");
  EXPECT_EQ(n.host, "127.0.0.1:5000");
  EXPECT_EQ(n.tag, "latest");
  n = MustParse("localhost:5000/ns/model:v1");
  EXPECT_EQ(n.host, "localhost:5000");
  EXPECT_EQ(n.tag, "v1");
  EXPECT_EQ(n.CacheKey(), "localhost:5000/ns/model/v1");
}

TEST(NameTest, StripsHttpSchemes) {
  EXPECT_EQ(MustParse("https://hf.co/a/b:c").ToString(), "hf.co/a/b:c");
  EXPECT_EQ(MustParse("http://localhost:8080/a/b").ToString(), "localhost:8080/a/b:latest");
  EXPECT_EQ(MustParse("HTTPS://x.io/a/b").host, "x.io");
}

TEST(NameTest, FoldsCaseInKeysOnly) {
  ModelName a = MustParse("Registry.Ollama.AI/Library/Llama3.2:Latest");
  ModelName b = MustParse("llama3.2");
  EXPECT_EQ(a.CacheKey(), b.CacheKey());
  EXPECT_EQ(a.Repository(), b.Repository());
  EXPECT_EQ(a.model, "Llama3.2");
  EXPECT_EQ(a.RequestTag(), "Latest");
  EXPECT_FALSE(a == b);
}

TEST(NameTest, ToStringRoundTrips) {
  for (std::string_view text :
       {"llama3.2", "a/b:c", "hf.co/User/Repo:Q4_K_M", "127.0.0.1:5000/x/y:z", "_a/_b:_c"}) {
    ModelName n = MustParse(text);
    EXPECT_EQ(MustParse(n.ToString()), n) << text;
  }
}

TEST(NameTest, DisplayNameIsShortest) {
  EXPECT_EQ(MustParse("llama3.2").DisplayName(kDefaultHost), "llama3.2:latest");
  EXPECT_EQ(MustParse("REGISTRY.ollama.ai/Library/m:1b").DisplayName(kDefaultHost), "m:1b");
  EXPECT_EQ(MustParse("user/m").DisplayName(kDefaultHost), "user/m:latest");
  EXPECT_EQ(MustParse("hf.co/library/m:q").DisplayName(kDefaultHost), "hf.co/library/m:q");
}

TEST(NameTest, AcceptsMaximumLengths) {
  std::string p80(80, 'a');
  std::string host(350, 'h');
  ModelName n = MustParse(host + "/" + p80 + "/" + p80 + ":" + p80);
  EXPECT_EQ(n.host.size(), 350u);
  EXPECT_EQ(n.tag.size(), 80u);
}

TEST(NameTest, AcceptsGgufFileNameTag) {
  EXPECT_EQ(MustParse("hf.co/u/r:model-Q4_K_M.gguf").tag, "model-Q4_K_M.gguf");
}

TEST(NameTest, RejectsDotDot) {
  ExpectInvalid("..", "model");
  ExpectInvalid("../etc", "namespace");
  ExpectInvalid("a/..", "model");
  ExpectInvalid("a/b:..", "tag");
  ExpectInvalid("../a/b", "host");
  ExpectInvalid(".", "model");
  ExpectInvalid("a/.:x", "model");
  ExpectInvalid("x:.", "tag");
}

TEST(NameTest, RejectsSlashes) {
  ExpectInvalid("/a", "empty part");
  ExpectInvalid("a/", "empty part");
  ExpectInvalid("a//b", "empty part");
  ExpectInvalid("a/b/c/d", "too many");
  ExpectInvalid("a/b/c/d/e/f/g/h", "too many");
  ExpectInvalid("a:b/c", "namespace");  // the tag only splits after the last '/'
}

TEST(NameTest, RejectsHostileBytes) {
  ExpectInvalid(std::string("llama\0x", 7), "NUL");
  ExpectInvalid("a\\b", "'\\'");
  ExpectInvalid("llama 3", "whitespace");
  ExpectInvalid(" llama", "whitespace");
  ExpectInvalid("llama\t", "whitespace");
  ExpectInvalid("a\x01", "control");
  ExpectInvalid("a\x7f", "control");
  ExpectInvalid("caf\xc3\xa9", "non-ASCII");
  ExpectInvalid("a/b:c$", "'$'");
  ExpectInvalid("a/b%2f:c", "'%'");
}

TEST(NameTest, RejectsDigestReferences) {
  ExpectInvalid("llama@sha256:" + std::string(64, 'a'), "digest references");
}

TEST(NameTest, RejectsLeadingDashOrDot) {
  ExpectInvalid("-model", "must start with");
  ExpectInvalid(".hidden", "must start with");
  ExpectInvalid("-ns/m", "namespace");
  ExpectInvalid("m:-tag", "tag");
  ExpectInvalid("-host.io/a/b", "may not start with");
  ExpectInvalid(".host.io/a/b", "may not start with");
}

TEST(NameTest, RejectsOverlongParts) {
  std::string p81(81, 'a');
  ExpectInvalid(p81, "model is 81 chars (limit 80)");
  ExpectInvalid(p81 + "/m", "namespace is 81 chars (limit 80)");
  ExpectInvalid("m:" + p81, "tag is 81 chars (limit 80)");
  ExpectInvalid(std::string(351, 'h') + "/a/b", "host is 351 chars (limit 350)");
  ExpectInvalid(std::string(5000, 'a'), "name is 5000 bytes (limit 1024)");
}

TEST(NameTest, RejectsColonEdgeCases) {
  ExpectInvalid("x:", "tag is empty");
  ExpectInvalid("a:b:c", "model");
  ExpectInvalid(":tag", "model is empty");
  ExpectInvalid("::", "tag is empty");
  ExpectInvalid("host:/a/b", "port");
  ExpectInvalid("host:99999/a/b", "port");
  ExpectInvalid("host:0/a/b", "port");
  ExpectInvalid("host:80:80/a/b", "port");
  ExpectInvalid(":80/a/b", "no hostname");
}

TEST(NameTest, RejectsDotsInNamespace) {
  ExpectInvalid("hf.co/model", "namespace \"hf.co\" may not contain '.'");
}

TEST(NameTest, RejectsEmptyAndOtherSchemes) {
  ExpectInvalid("", "empty");
  ExpectInvalid("ftp://a/b/c", "unsupported scheme");
  ExpectInvalid("https://", "empty");
  ExpectInvalid("https://https://a/b/c", "too many");
}

TEST(NameTest, RejectsInvalidDefaultHost) {
  StatusOr<ModelName> n = ParseModelName("llama", "bad host");
  ASSERT_FALSE(n.ok());
  EXPECT_NE(n.status().message().find("default host"), std::string::npos);
  // An explicit host makes the default irrelevant.
  EXPECT_TRUE(ParseModelName("a.io/b/c", "").ok());
}

TEST(NameTest, MessageQuotesTruncatedEscapedInput) {
  std::string hostile = std::string(200, 'x') + "\n";
  StatusOr<ModelName> n = ParseModelName("a\n" + hostile, kDefaultHost);
  ASSERT_FALSE(n.ok());
  const std::string& msg = n.status().message();
  EXPECT_NE(msg.find("\"a\\x0a"), std::string::npos) << msg;
  EXPECT_NE(msg.find("...\""), std::string::npos) << msg;
  EXPECT_LT(msg.size(), 150u) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos);
}

TEST(NameTest, CacheKeyComponentsAreAlwaysSafe) {
  // Every accepted name from a mix of hostile inputs yields 4 safe components.
  const char kAlphabet[] = {'a', 'Z', '0', '_', '-', '.', ':', '/', '@', '\\', ' ', '\0'};
  std::vector<std::string> inputs, level = {""};
  for (int len = 1; len <= 5; ++len) {  // every string of up to 5 chars: ~271k inputs
    std::vector<std::string> next;
    for (const std::string& s : level) {
      for (char c : kAlphabet) next.push_back(s + c);
    }
    inputs.insert(inputs.end(), next.begin(), next.end());
    level = std::move(next);
  }
  size_t accepted = 0;
  for (const std::string& s : inputs) {
    StatusOr<ModelName> n = ParseModelName(s, kDefaultHost);
    if (!n.ok()) continue;
    ++accepted;
    std::string key = n->CacheKey();
    std::vector<std::string> parts;
    size_t start = 0;
    for (size_t slash; (slash = key.find('/', start)) != std::string::npos; start = slash + 1) {
      parts.push_back(key.substr(start, slash - start));
    }
    parts.push_back(key.substr(start));
    ASSERT_EQ(parts.size(), 4u) << s;
    for (const std::string& p : parts) {
      EXPECT_FALSE(p.empty() || p == "." || p == ".." || p[0] == '.' || p[0] == '-') << s;
      EXPECT_EQ(p.find('\0'), std::string::npos);
      EXPECT_EQ(p.find('\\'), std::string::npos);
    }
    EXPECT_EQ(MustParse(n->ToString()), *n) << s;
  }
  EXPECT_GT(accepted, 1000u);
}

TEST(NameTest, ValidatesHostAndNamespacePredicates) {
  EXPECT_TRUE(IsValidHost("registry.ollama.ai"));
  EXPECT_TRUE(IsValidHost("hf.co"));
  EXPECT_TRUE(IsValidHost("127.0.0.1:5000"));
  EXPECT_TRUE(IsValidHost("localhost"));
  EXPECT_FALSE(IsValidHost(""));
  EXPECT_FALSE(IsValidHost(".."));
  EXPECT_FALSE(IsValidHost("a/b"));
  EXPECT_FALSE(IsValidHost("a:b"));
  EXPECT_FALSE(IsValidHost("a:"));
  EXPECT_FALSE(IsValidHost(std::string(351, 'a')));
  EXPECT_TRUE(IsValidNamespace("library"));
  EXPECT_TRUE(IsValidNamespace("my-user_1"));
  EXPECT_FALSE(IsValidNamespace("hf.co"));
  EXPECT_FALSE(IsValidNamespace("-x"));
  EXPECT_FALSE(IsValidNamespace(""));
  EXPECT_FALSE(IsValidNamespace(std::string(81, 'a')));
}

TEST(NameTest, ParsesModelPathForms) {
  StatusOr<ModelName> n = ParseModelPath({"llama3.2:1b"}, kDefaultHost);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(n->ToString(), "registry.ollama.ai/library/llama3.2:1b");

  n = ParseModelPath({"user", "model"}, kDefaultHost);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(n->ToString(), "registry.ollama.ai/user/model:latest");

  n = ParseModelPath({"localhost:5000", "ns", "m:Q4_K_M"}, kDefaultHost);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(n->host, "localhost:5000");
  EXPECT_EQ(n->tag, "Q4_K_M");

  n = ParseModelPath({"hf.co", "u", "r"}, kDefaultHost);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(n->CacheKey(), "hf.co/u/r/latest");
}

TEST(NameTest, RejectsBadModelPaths) {
  auto expect_invalid = [](const std::vector<std::string>& c, std::string_view fragment) {
    StatusOr<ModelName> n = ParseModelPath(c, kDefaultHost);
    ASSERT_FALSE(n.ok()) << "accepted " << n->ToString();
    EXPECT_EQ(n.status().code(), Code::kInvalidArgument);
    EXPECT_NE(n.status().message().find(fragment), std::string::npos) << n.status().message();
  };
  expect_invalid({}, "1 to 3");
  expect_invalid({"a", "b", "c", "d"}, "1 to 3");
  expect_invalid({"ns:tag", "m"}, "last component");
  expect_invalid({"h", "ns:1", "m"}, "last component");
  expect_invalid({"a/b"}, "'/'");
  expect_invalid({".."}, "model");
  expect_invalid({"ns", ".."}, "model");
  expect_invalid({"..", "m"}, "namespace");
  expect_invalid({"m:"}, "tag is empty");
  expect_invalid({"m:.."}, "tag");
  expect_invalid({""}, "empty");
  expect_invalid({std::string("a\0b", 3)}, "NUL");
  expect_invalid({"h:x", "n", "m"}, "port");
  expect_invalid({"a", "b:c:d"}, "model");
  expect_invalid({std::string(400, 'a')}, "limit");
}

}  // namespace
}  // namespace modelfs::manifest
