#include "fetch/chunksums.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace modelfs::fetch {
namespace {

const std::string kA = "sha256:" + std::string(64, 'a');
const std::string kB = "sha256:" + std::string(64, 'b');

TEST(ChunksumsTest, ParsesContiguousChunksCoveringTheBlob) {
  auto c = ParseChunksums(kA + " 0-9\n" + kB + " 10-14\n", 15);
  ASSERT_TRUE(c.ok()) << c.status().message();
  ASSERT_EQ(c->size(), 2u);
  EXPECT_EQ((*c)[0].begin, 0u);
  EXPECT_EQ((*c)[0].end, 10u);
  EXPECT_EQ((*c)[1].begin, 10u);
  EXPECT_EQ((*c)[1].end, 15u);
  EXPECT_EQ((*c)[1].digest.ToString(), kB);
}

TEST(ChunksumsTest, AcceptsCrlfAndNoTrailingNewline) {
  EXPECT_TRUE(ParseChunksums(kA + " 0-9\r\n" + kB + " 10-14", 15).ok());
}

TEST(ChunksumsTest, AcceptsRunsOfBlanksBetweenAndAfterTheFields) {
  auto c = ParseChunksums(kA + "  \t 0-9 \t\n" + kB + "\t10-14  \r\n", 15);
  ASSERT_TRUE(c.ok()) << c.status().message();
  ASSERT_EQ(c->size(), 2u);
  EXPECT_EQ((*c)[1].begin, 10u);
  EXPECT_EQ((*c)[1].digest.ToString(), kB);
}

TEST(ChunksumsTest, EmptyBlobHasNoChunks) {
  auto c = ParseChunksums("", 0);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->empty());
  EXPECT_FALSE(ParseChunksums("", 1).ok());
}

TEST(ChunksumsTest, RejectsGapsOverlapsAndShortCoverage) {
  EXPECT_FALSE(ParseChunksums(kA + " 0-9\n" + kB + " 11-14\n", 15).ok());  // gap
  EXPECT_FALSE(ParseChunksums(kA + " 0-9\n" + kB + " 9-14\n", 15).ok());   // overlap
  EXPECT_FALSE(ParseChunksums(kA + " 0-9\n", 15).ok());                    // short
  EXPECT_FALSE(ParseChunksums(kA + " 0-15\n", 15).ok());                   // past the end
  EXPECT_FALSE(ParseChunksums(kA + " 1-14\n", 15).ok());                   // not from 0
}

TEST(ChunksumsTest, RejectsMalformedLines) {
  for (const std::string& bad : std::vector<std::string>{
           kA + " 0-", kA + " -9", kA + " 9-0", kA + " 0-9 x", kA + " +0-9", kA + " 00-9",
           kA + " 0-99999999999999999999999", "sha512:" + std::string(128, 'a') + " 0-9",
           "sha256:abc 0-9", kA, kA + " 0-9\n\n", std::string("\n") + kA + " 0-9",
           kA.substr(0, 20) + std::string(1, '\0') + kA.substr(21) + " 0-9"}) {
    EXPECT_FALSE(ParseChunksums(bad, 10).ok()) << bad;
  }
}

TEST(ChunksumsTest, BlanksOnlyBetweenTheFieldsAndAtTheEnd) {
  for (const std::string& bad : std::vector<std::string>{
           " " + kA + " 0-9", "\t" + kA + " 0-9",        // leading
           kA + " 0 -9", kA + " 0- 9", kA + "\t0-9\tx",  // inside the range, extra field
           kA + "\v0-9", kA + " 0-9\r ",                 // other whitespace, blank after \r
           kA + " 0-9\n \t", kA + " 0-9\n \n"}) {        // a line of blanks
    EXPECT_FALSE(ParseChunksums(bad, 10).ok()) << bad;
  }
}

TEST(ChunksumsTest, ErrorsNameTheLine) {
  auto c = ParseChunksums(kA + " 0-4\n" + kB + " 6-9\n", 10);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("line 2"), std::string::npos) << c.status().message();
}

}  // namespace
}  // namespace modelfs::fetch
