#include "cache/admin.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "base/unique_fd.h"
#include "cache/state_file.h"

namespace modelfs::cache {
namespace {

namespace fsys = std::filesystem;

class AdminTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/modelfs-admin-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    for (const char* sub : {"blobs", "partial", "manifests"})
      fsys::create_directory(dir_ + "/" + sub);
  }
  void TearDown() override { fsys::remove_all(dir_); }

  // A complete blob with these bytes; returns its digest.
  Digest PutBlob(const std::string& bytes) {
    Digest d = Sha256::Of(bytes);
    std::ofstream(dir_ + "/blobs/" + d.FileName(), std::ios::binary) << bytes;
    return d;
  }
  void Write(const std::string& rel, const std::string& bytes) {
    fsys::create_directories(fsys::path(dir_ + "/" + rel).parent_path());
    std::ofstream(dir_ + "/" + rel, std::ios::binary) << bytes;
  }

  std::string dir_;
};

TEST_F(AdminTest, ListsCompleteAndPartialBlobsWithStateProgress) {
  Digest done = PutBlob(std::string(10000, 'a'));
  Digest partial = Sha256::Of("some other blob");
  const uint64_t size = 1 << 20;
  UniqueFd fd(::open((dir_ + "/partial/" + partial.FileName()).c_str(), O_RDWR | O_CREAT, 0644));
  ASSERT_EQ(::ftruncate(fd.get(), size), 0);
  ASSERT_EQ(::pwrite(fd.get(), std::string(4096, 'x').data(), 4096, 0), 4096);
  PartialState state;
  state.digest = partial;
  state.size = size;
  state.present.Add(0, 4096);
  state.sha_state = Sha256().SaveState();
  Write("partial/" + partial.FileName() + ".state", EncodeState(state));

  auto list = ListCacheBlobs(dir_);
  ASSERT_TRUE(list.ok()) << list.status().ToString();
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].digest, done);
  EXPECT_TRUE((*list)[0].complete);
  EXPECT_EQ((*list)[0].size, 10000u);
  EXPECT_FALSE((*list)[0].in_use);
  EXPECT_EQ((*list)[1].digest, partial);
  EXPECT_FALSE((*list)[1].complete);
  EXPECT_EQ((*list)[1].size, size);
  EXPECT_EQ((*list)[1].bytes_present, 4096u);
  EXPECT_LT((*list)[1].disk_bytes, size);  // sparse

  ASSERT_EQ(::flock(fd.get(), LOCK_EX), 0);  // what a fetching mount holds
  list = ListCacheBlobs(dir_);
  EXPECT_TRUE((*list)[1].in_use);
}

TEST_F(AdminTest, RemoveRefusesABlobSomeoneHasOpenAndReportsBytesFreed) {
  Digest d = PutBlob(std::string(100000, 'b'));
  const std::string path = dir_ + "/blobs/" + d.FileName();
  {
    UniqueFd reader(::open(path.c_str(), O_RDONLY));
    ASSERT_EQ(::flock(reader.get(), LOCK_SH | LOCK_NB), 0);  // what a mount holds
    auto r = RemoveCacheBlob(dir_, d);
    EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
    EXPECT_TRUE(fsys::exists(path));
  }
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  auto r = RemoveCacheBlob(dir_, d);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, static_cast<uint64_t>(st.st_blocks) * 512);
  EXPECT_FALSE(fsys::exists(path));
  EXPECT_EQ(RemoveCacheBlob(dir_, d).status().code(), Code::kNotFound);
}

TEST_F(AdminTest, VerifyFindsACorruptedBlob) {
  Digest d = PutBlob("the right bytes");
  EXPECT_TRUE(VerifyCacheBlob(dir_, d).ok());
  Write("blobs/" + d.FileName(), "the wrong bytes");
  EXPECT_EQ(VerifyCacheBlob(dir_, d).code(), Code::kDataLoss);
}

TEST_F(AdminTest, ManifestsListAndRemoveWithEmptyParents) {
  Write("manifests/h/library/a/1b", "one");
  Write("manifests/h/library/b/latest", "two");
  auto list = ListCacheManifests(dir_);
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].key, "h/library/a/1b");
  EXPECT_EQ((*list)[1].bytes, "two");
  ASSERT_TRUE(RemoveCacheManifest(dir_, "h/library/a/1b").ok());
  EXPECT_FALSE(fsys::exists(dir_ + "/manifests/h/library/a"));
  EXPECT_TRUE(fsys::exists(dir_ + "/manifests/h/library/b/latest"));
  EXPECT_EQ(RemoveCacheManifest(dir_, "h/library/a/1b").status().code(), Code::kNotFound);
}

}  // namespace
}  // namespace modelfs::cache
