// Mirrors: MirrorSet's order and memory (fake clock), and RegistryClient falling through
// mirrors to the origin on real sockets (dead, failing, lacking, warming and suspect mirrors).
#include "fetch/mirrors.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>

#include "base/range_set.h"
#include "fetch/registry.h"
#include "fetch/test_server.h"
#include "fetch/url.h"

namespace modelfs::fetch {
namespace {

using testing::TestConn;
using testing::TestRequest;
using testing::TestServer;

TEST(MirrorSetTest, MirrorsComeFirstInOrderThenTheOrigin) {
  MirrorSet m({"https://origin.example", {"http://m1:5000/", "http://m2:5000"}});
  auto s = m.Sources("https://origin.example/");
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[0].url, "http://m1:5000");
  EXPECT_TRUE(s[0].mirror);
  EXPECT_EQ(s[1].index, 1u);
  EXPECT_EQ(s[2].url, "https://origin.example");
  EXPECT_FALSE(s[2].mirror);
  EXPECT_EQ(s[2].index, 2u);
  EXPECT_EQ(m.Sources("https://origin.example", 1).size(), 2u);
  EXPECT_EQ(m.Sources("https://origin.example", SIZE_MAX).size(), 1u);
}

TEST(MirrorSetTest, OtherRegistriesAreNotMirrored) {
  MirrorSet m({"https://origin.example", {"http://m1"}});
  auto s = m.Sources("https://hf.co");
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].url, "https://hf.co");
  EXPECT_FALSE(MirrorSet({"https://origin.example", {}}).Applies("https://origin.example"));
}

TEST(MirrorSetTest, FailedMirrorIsSkippedForTheBackoff) {
  auto now = MirrorSet::Clock::now();
  MirrorSet m({"https://o", {"http://m1", "http://m2"}, /*backoff_s=*/30}, [&] { return now; });
  m.ReportFailure("http://m1/", "connection refused");
  EXPECT_FALSE(m.Healthy("http://m1"));
  auto s = m.Sources("https://o");
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].url, "http://m2");
  now += std::chrono::seconds(31);
  EXPECT_EQ(m.Sources("https://o").size(), 3u);
  m.ReportFailure("http://m2", "503");
  m.ReportSuccess("http://m2");
  EXPECT_TRUE(m.Healthy("http://m2"));
}

TEST(MirrorSetTest, SuspectBlobComesFromTheOriginOnly) {
  auto now = MirrorSet::Clock::now();
  MirrorSet m({"https://o", {"http://m1"}, 30, /*suspect_ttl_s=*/60}, [&] { return now; });
  Digest d = Sha256::Of("x"), other = Sha256::Of("y");
  m.MarkSuspect(d);
  EXPECT_EQ(m.Sources("https://o", 0, &d).size(), 1u);
  EXPECT_EQ(m.Sources("https://o", 0, &other).size(), 2u);
  now += std::chrono::seconds(61);
  EXPECT_FALSE(m.Suspect(d));
}

// ---- RegistryClient with mirrors, on real sockets -------------------------------------------

std::string RandomBlob(size_t size) {
  std::string s(size, '\0');
  std::mt19937_64 rng(7);
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

class BufSink : public Sink {
 public:
  explicit BufSink(size_t size) : data_(size, '\0') {}
  Status Write(uint64_t offset, const void* p, size_t len) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& m : have_.Missing(offset, offset + len)) fresh_ += m.size();
    if (fresh_ != written_ + len && !rewrite_ok_) twice_ = true;
    std::memcpy(&data_[offset], p, len);
    have_.Add(offset, offset + len);
    written_ += len;
    cv_.notify_all();
    return Status::Ok();
  }
  void Failed(const Status& s) override {
    std::lock_guard<std::mutex> lock(mu_);
    failure_ = s.ToString();
    cv_.notify_all();
  }
  bool WaitComplete(double s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(s), [&] {
      return have_.Contains(0, data_.size()) || !failure_.empty();
    }) && failure_.empty();
  }
  void Reset(uint64_t b, uint64_t e) {
    std::lock_guard<std::mutex> lock(mu_);
    have_.Remove(b, e);
    rewrite_ok_ = true;
  }
  std::string data() {
    std::lock_guard<std::mutex> lock(mu_);
    return data_;
  }
  bool twice() {
    std::lock_guard<std::mutex> lock(mu_);
    return twice_;
  }
  std::string failure() {
    std::lock_guard<std::mutex> lock(mu_);
    return failure_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::string data_;
  RangeSet have_;
  uint64_t written_ = 0, fresh_ = 0;
  bool twice_ = false, rewrite_ok_ = false;
  std::string failure_;
};

// A registry serving one blob and one manifest; `mode` decides each blob answer.
struct FakeRegistry {
  enum Mode { kServe, kMissing, kUnavailable, kIgnoreRange };
  explicit FakeRegistry(const std::string* blob) : blob(blob) {}
  const std::string* blob;
  std::atomic<Mode> mode{kServe};
  std::atomic<int> fail_after{-1};       // >= 0: serve that many ranged GETs, then 503 forever
  std::atomic<int> ignore_range_for{0};  // the first N blob GETs answer a full 200
  std::atomic<int> blob_requests{0}, manifest_requests{0};
  std::atomic<uint64_t> ranged_bytes{0};
  TestServer server{[this](const TestRequest& r, TestConn& c) {
    if (r.path.find("/manifests/") != std::string::npos) {
      manifest_requests++;
      if (mode == kUnavailable) return void(c.Send(TestServer::Response(503, "")));
      if (mode == kMissing) return void(c.Send(TestServer::Response(404, "")));
      c.Send(TestServer::Response(200, "{\"m\":1}", {"Content-Type: application/json"}));
      return;
    }
    int n = blob_requests++;
    if (mode == kUnavailable) return void(c.Send(TestServer::Response(503, "")));
    if (mode == kMissing) return void(c.Send(TestServer::Response(404, "")));
    if (fail_after >= 0 && r.range && r.range->second > 0 && fail_after-- <= 0) {
      fail_after = 0;
      return void(c.Send(TestServer::Response(503, "")));
    }
    if (n < ignore_range_for || mode == kIgnoreRange) {
      c.Send(TestServer::Response(200, *blob));
      return;
    }
    if (r.range && r.range->second > 0) ranged_bytes += r.range->second - r.range->first + 1;
    TestServer::ServeBlob(r, c, *blob);
  }};
};

ClientOptions MirrorOptionsFor(const std::string& origin, std::vector<std::string> mirrors) {
  ClientOptions o;
  o.request_timeout_s = 5;
  o.connect_timeout_s = 2;
  o.fetch.part_size = 1 << 20;
  o.fetch.concurrency = 4;
  o.fetch.retry_base_delay_s = 0.01;
  o.fetch.retry_max_delay_s = 0.05;
  o.fetch.min_split_bytes = 256 << 10;
  o.fetch.align_bytes = 256 << 10;
  o.mirror.origin = origin;
  o.mirror.mirrors = std::move(mirrors);
  return o;
}

std::unique_ptr<RegistryClient> NewClient(ClientOptions o) {
  auto c = RegistryClient::Create(std::move(o));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return std::move(c).value();
}

std::string DeadUrl() {
  TestServer s([](const TestRequest&, TestConn&) {});
  std::string url = s.url();
  s.Stop();
  return url;  // nothing listens there any more
}

struct MirrorFetchTest : ::testing::Test {
  std::string blob = RandomBlob((6 << 20) + 4321);
  Digest digest = Sha256::Of(blob);
  FakeRegistry origin{&blob}, mirror{&blob};
  BlobLocation Where() { return {origin.server.url(), "a/b", digest, blob.size()}; }
};

TEST_F(MirrorFetchTest, ManifestFallsThroughDeadMissingAndFailingMirrors) {
  FakeRegistry missing{&blob}, failing{&blob};
  missing.mode = FakeRegistry::kMissing;
  failing.mode = FakeRegistry::kUnavailable;
  auto c = NewClient(MirrorOptionsFor(origin.server.url(),
                                      {DeadUrl(), missing.server.url(), failing.server.url()}));
  for (int i = 0; i < 3; ++i) {
    auto m = c->GetManifest(origin.server.url(), "a/b", "latest");
    ASSERT_TRUE(m.ok()) << m.status().ToString();
  }
  EXPECT_EQ(origin.manifest_requests, 3);
  EXPECT_EQ(missing.manifest_requests, 3);  // lacking is not failing: asked every time
  EXPECT_EQ(failing.manifest_requests, 1);  // failing: remembered as down
}

TEST_F(MirrorFetchTest, BlobComesFromTheMirror) {
  auto c = NewClient(MirrorOptionsFor(origin.server.url(), {DeadUrl(), mirror.server.url()}));
  BufSink sink(blob.size());
  auto f = c->Start(Where(), {{0, blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20)) << sink.failure();
  EXPECT_EQ(Sha256::Of(sink.data()), digest);
  EXPECT_EQ(origin.blob_requests, 0);
  EXPECT_FALSE(sink.twice());
}

TEST_F(MirrorFetchTest, MirrorFailingMidwayFallsThroughWithoutLosingBytes) {
  mirror.fail_after = 5;
  auto c = NewClient(MirrorOptionsFor(origin.server.url(), {mirror.server.url()}));
  BufSink sink(blob.size());
  auto f = c->Start(Where(), {{0, blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20)) << sink.failure();
  EXPECT_EQ(Sha256::Of(sink.data()), digest);
  EXPECT_GT(origin.ranged_bytes, 0u);
  EXPECT_LT(origin.ranged_bytes, blob.size());  // what the mirror served is kept
  EXPECT_FALSE(sink.twice());
}

TEST_F(MirrorFetchTest, WarmingMirrorIsWaitedFor) {
  mirror.ignore_range_for = 2;  // a pull-through cache still pulling: full 200s, then 206s
  auto c = NewClient(MirrorOptionsFor(origin.server.url(), {mirror.server.url()}));
  BufSink sink(blob.size());
  auto f = c->Start(Where(), {{0, blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20)) << sink.failure();
  EXPECT_EQ(Sha256::Of(sink.data()), digest);
  EXPECT_EQ(origin.blob_requests, 0);
}

TEST_F(MirrorFetchTest, RefetchGoesToTheOrigin) {
  auto c = NewClient(MirrorOptionsFor(origin.server.url(), {mirror.server.url()}));
  BufSink sink(blob.size());
  auto f = c->Start(Where(), {{0, blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20)) << sink.failure();
  EXPECT_EQ(origin.blob_requests, 0);
  sink.Reset(1 << 20, 2 << 20);
  f->Refetch(1 << 20, 1 << 20);
  ASSERT_TRUE(sink.WaitComplete(20)) << sink.failure();
  EXPECT_EQ(origin.ranged_bytes, 1u << 20);
}

TEST_F(MirrorFetchTest, BlobFetchedAgainAfterAMirrorCompletedItComesFromTheOrigin) {
  auto c = NewClient(MirrorOptionsFor(origin.server.url(), {mirror.server.url()}));
  {
    BufSink sink(blob.size());
    auto f = c->Start(Where(), {{0, blob.size()}}, &sink);
    ASSERT_TRUE(sink.WaitComplete(20)) << sink.failure();
  }
  int before = mirror.blob_requests;
  BufSink again(blob.size());  // the cache did not commit it: its digest did not match
  auto f = c->Start(Where(), {{0, blob.size()}}, &again);
  ASSERT_TRUE(again.WaitComplete(20)) << again.failure();
  EXPECT_EQ(mirror.blob_requests, before);
  EXPECT_GE(origin.ranged_bytes, blob.size());
}

}  // namespace
}  // namespace modelfs::fetch
