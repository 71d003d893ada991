#include "cache/state_file.h"

#include <gtest/gtest.h>

namespace modelfs::cache {
namespace {

PartialState Sample() {
  PartialState s;
  s.digest = Sha256::Of("blob");
  s.size = 1000;
  s.present.Add(0, 128);
  s.present.Add(500, 700);
  Sha256 h;
  std::string zeros(64, 'x');
  h.Update(zeros.data(), zeros.size());
  s.frontier = 64;
  s.sha_state = h.SaveState();
  s.checkpoints[0] = Sha256().SaveState();
  Sha256 h32;
  h32.Update(zeros.data(), 32);
  s.checkpoints[32] = h32.SaveState();
  s.verified.Add(0, 100);
  s.verified.Add(550, 600);
  s.suspects[0] = 2;
  s.suspects[512] = 3;
  return s;
}

// Re-signs a body edited by a test, so only the edit (not the checksum) is what gets rejected.
std::string Resign(std::string text) {
  size_t last = text.rfind("checksum ");
  std::string body = text.substr(0, last);
  return body + "checksum " + Sha256::Of(body).Hex() + "\n";
}

std::string Replace(std::string text, const std::string& from, const std::string& to) {
  size_t pos = text.find(from);
  EXPECT_NE(pos, std::string::npos) << from;
  return text.replace(pos, from.size(), to);
}

TEST(StateFileTest, RoundTrips) {
  PartialState s = Sample();
  auto got = DecodeState(EncodeState(s), s.digest, s.size);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->present, s.present);
  EXPECT_EQ(got->frontier, 64u);
  EXPECT_EQ(got->sha_state, s.sha_state);
  EXPECT_EQ(got->checkpoints, s.checkpoints);
  EXPECT_EQ(got->verified, s.verified);
  EXPECT_EQ(got->suspects, s.suspects);
}

TEST(StateFileTest, ReadsVersionOneWithoutCheckpoints) {
  PartialState s = Sample();
  s.checkpoints.clear();
  s.verified.Clear();
  auto got =
      DecodeState(Resign(Replace(EncodeState(s), "state 3\n", "state 1\n")), s.digest, s.size);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->frontier, 64u);
  EXPECT_TRUE(got->checkpoints.empty());
}

TEST(StateFileTest, ReadsVersionTwoWithoutVerifiedRanges) {
  PartialState s = Sample();
  s.verified.Clear();
  auto got =
      DecodeState(Resign(Replace(EncodeState(s), "state 3\n", "state 2\n")), s.digest, s.size);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->checkpoints, s.checkpoints);
  EXPECT_TRUE(got->verified.empty());
}

TEST(StateFileTest, RejectsBadCheckpoints) {
  PartialState s = Sample();
  std::string text = EncodeState(s);
  // Past the frontier, out of order, not hex.
  EXPECT_EQ(DecodeState(Resign(Replace(text, "checkpoint 32 ", "checkpoint 65 ")), s.digest,
                        s.size)
                .status()
                .code(),
            Code::kDataLoss);
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "checkpoint 32 ", "checkpoint 0 ")), s.digest, s.size).ok());
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "checkpoint 32 ", "checkpoint 32 zz")), s.digest, s.size)
          .ok());
  // A state that does not match its offset: checkpoints dropped, the rest kept.
  auto got = DecodeState(Resign(Replace(text, "checkpoint 32 ", "checkpoint 31 ")), s.digest,
                         s.size);
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(got->checkpoints.empty());
  EXPECT_EQ(got->frontier, 64u);
  // After a range line, a checkpoint is an unexpected line.
  std::string moved = Replace(text, "checksum", "checkpoint 48 00\nchecksum");
  EXPECT_FALSE(DecodeState(Resign(moved), s.digest, s.size).ok());
}

TEST(StateFileTest, RejectsCorruptionAndTruncation) {
  PartialState s = Sample();
  std::string text = EncodeState(s);
  std::string flipped = text;
  flipped[text.find("range 500") + 6] = '6';
  EXPECT_EQ(DecodeState(flipped, s.digest, s.size).status().code(), Code::kDataLoss);
  for (size_t cut : {size_t{0}, size_t{1}, text.size() / 2, text.size() - 1}) {
    EXPECT_FALSE(DecodeState(text.substr(0, cut), s.digest, s.size).ok()) << cut;
  }
  EXPECT_FALSE(DecodeState("", s.digest, s.size).ok());
}

TEST(StateFileTest, RejectsOtherVersionBlobOrSize) {
  PartialState s = Sample();
  std::string text = EncodeState(s);
  EXPECT_EQ(DecodeState(Resign(Replace(text, "state 3\n", "state 9\n")), s.digest, s.size)
                .status()
                .code(),
            Code::kFailedPrecondition);
  EXPECT_EQ(DecodeState(text, s.digest, s.size + 1).status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(DecodeState(text, Sha256::Of("other"), s.size).status().code(),
            Code::kFailedPrecondition);
}

TEST(StateFileTest, RejectsInconsistentContents) {
  PartialState s = Sample();
  std::string text = EncodeState(s);
  // Range past the end, unsorted ranges, empty range, frontier past the present prefix, a hash
  // state that does not match the frontier.
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "range 500 700", "range 500 1001")), s.digest, s.size).ok());
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "range 500 700", "range 50 70")), s.digest, s.size).ok());
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "range 500 700", "range 500 500")), s.digest, s.size).ok());
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "range 0 128", "range 0 32")), s.digest, s.size).ok());
  // A hash state that does not fit the frontier: ranges kept, hashing restarts at 0.
  auto reset = DecodeState(Resign(Replace(text, "frontier 64", "frontier 128")), s.digest, s.size);
  ASSERT_TRUE(reset.ok());
  EXPECT_TRUE(reset->hash_reset);
  EXPECT_EQ(reset->frontier, 0u);
  EXPECT_EQ(reset->present, s.present);
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "frontier 64", "frontier 6x")), s.digest, s.size).ok());
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "checksum", "junk\nchecksum")), s.digest, s.size).ok());
  // Suspects past the end, out of order, all zero, or malformed.
  for (const char* bad : {"suspect 1000 3", "suspect 0 3", "suspect 512 0", "suspect 512",
                          "suspect 512 x", "suspect 512 3 1", "suspect 512 99999999999"}) {
    EXPECT_FALSE(DecodeState(Resign(Replace(text, "suspect 512 3", bad)), s.digest, s.size).ok())
        << bad;
  }
  // Verified bytes that are not present, out of order, or before the range lines.
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "verified 550 600", "verified 550 701")), s.digest, s.size)
          .ok());
  EXPECT_FALSE(
      DecodeState(Resign(Replace(text, "verified 550 600", "verified 50 60")), s.digest, s.size)
          .ok());
  EXPECT_FALSE(DecodeState(Resign(Replace(text, "range 0 128\n", "verified 0 100\nrange 0 128\n")),
                           s.digest, s.size)
                   .ok());
}

}  // namespace
}  // namespace modelfs::cache
