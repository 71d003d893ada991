#include "base/digest.h"

#include <gtest/gtest.h>

namespace modelfs {
namespace {

constexpr char kEmpty[] = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

TEST(DigestTest, ParsesCanonicalForm) {
  auto d = Digest::Parse(std::string("sha256:") + kEmpty);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->Hex(), kEmpty);
  EXPECT_EQ(d->FileName(), std::string("sha256-") + kEmpty);
}

TEST(DigestTest, RejectsOtherAlgorithmsAndLengths) {
  EXPECT_FALSE(Digest::Parse(std::string("sha512:") + kEmpty).ok());
  EXPECT_FALSE(Digest::Parse("sha256:abc").ok());
  EXPECT_FALSE(Digest::Parse(std::string("sha256:") + kEmpty + "00").ok());
  EXPECT_FALSE(Digest::Parse("sha256:../../../../etc/passwd").ok());
  std::string bad = std::string("sha256:") + kEmpty;
  bad[10] = 'g';
  EXPECT_FALSE(Digest::Parse(bad).ok());
}

TEST(DigestTest, Sha256OfKnownInputs) {
  EXPECT_EQ(Sha256::Of("").Hex(), kEmpty);
  EXPECT_EQ(Sha256::Of("abc").Hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(DigestTest, SavedStateResumesMidStream) {
  std::string data(100000, 'x');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 31);
  Sha256 a;
  a.Update(data.data(), 12345);
  auto b = Sha256::LoadState(a.SaveState());
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->bytes_hashed(), 12345u);
  b->Update(data.data() + 12345, data.size() - 12345);
  EXPECT_EQ(b->Peek(), Sha256::Of(data));
}

TEST(DigestTest, RejectsGarbageState) {
  EXPECT_FALSE(Sha256::LoadState("short").ok());
  std::string junk(Sha256::kStateSize, '\xff');
  EXPECT_FALSE(Sha256::LoadState(junk).ok());
}

}  // namespace
}  // namespace modelfs
