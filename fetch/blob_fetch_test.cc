// Part-parallel blob fetches against TestServer with exact faults. The VecSink checks that no
// byte is written twice (outside Refetch), nothing lands past the end, and every write happens
// on the fetch loop thread.
#include <gtest/gtest.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <random>
#include <set>
#include <thread>

#include "base/range_set.h"
#include "fetch/registry.h"
#include "fetch/test_server.h"

namespace modelfs::fetch {
namespace {

using testing::TestConn;
using testing::TestRequest;
using testing::TestServer;
using Clock = std::chrono::steady_clock;

std::string RandomBlob(size_t size, uint64_t seed) {
  std::string s(size, '\0');
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i + 8 <= size; i += 8) {
    uint64_t v = rng();
    std::memcpy(&s[i], &v, 8);
  }
  for (size_t i = size / 8 * 8; i < size; ++i) s[i] = static_cast<char>(rng());
  return s;
}

class VecSink : public Sink {
 public:
  explicit VecSink(uint64_t size) : data_(size, '\0') {}

  Status Write(uint64_t offset, const void* p, size_t len) override {
    char name[32] = {};
    pthread_getname_np(pthread_self(), name, sizeof name);
    std::lock_guard<std::mutex> lock(mu_);
    if (std::string(name) != "modelfs-curl") violations_.push_back("write off the loop thread");
    if (offset + len > data_.size()) {
      violations_.push_back("write past the end at " + std::to_string(offset));
      return Internal("past end");
    }
    if (fail_writes_ > 0) {
      fail_writes_--;
      disk_full_hits_++;
      return ResourceExhausted("disk full (test)");
    }
    uint64_t fresh = 0;
    for (const auto& m : have_.Missing(offset, offset + len)) fresh += m.size();
    if (fresh != len && !rewrite_ok_.Contains(offset, offset + len)) {
      violations_.push_back("bytes written twice in " + std::to_string(offset) + "+" +
                            std::to_string(len));
    }
    std::memcpy(&data_[offset], p, len);
    have_.Add(offset, offset + len);
    written_ += len;
    cv_.notify_all();
    return Status::Ok();
  }
  void Failed(const Status& s) override {
    std::lock_guard<std::mutex> lock(mu_);
    failures_.push_back(s);
    cv_.notify_all();
  }

  // Waits until [b, e) is all written or the fetch failed.
  bool WaitFor(uint64_t b, uint64_t e, double timeout_s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] {
      return have_.Contains(b, e) || !failures_.empty();
    }) && failures_.empty();
  }
  bool WaitComplete(double timeout_s) { return WaitFor(0, data_.size(), timeout_s); }
  bool WaitFailed(double timeout_s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s),
                        [&] { return !failures_.empty(); });
  }
  void AllowRewrite(uint64_t b, uint64_t e) {
    std::lock_guard<std::mutex> lock(mu_);
    rewrite_ok_.Add(b, e);
  }
  void FailNextWrites(int n) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_writes_ = n;
  }
  std::string data() {
    std::lock_guard<std::mutex> lock(mu_);
    return data_;
  }
  std::vector<std::string> violations() {
    std::lock_guard<std::mutex> lock(mu_);
    return violations_;
  }
  std::vector<Status> failures() {
    std::lock_guard<std::mutex> lock(mu_);
    return failures_;
  }
  RangeSet have() {
    std::lock_guard<std::mutex> lock(mu_);
    return have_;
  }
  uint64_t written() {
    std::lock_guard<std::mutex> lock(mu_);
    return written_;
  }
  int disk_full_hits() {
    std::lock_guard<std::mutex> lock(mu_);
    return disk_full_hits_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::string data_;
  RangeSet have_;
  RangeSet rewrite_ok_;
  uint64_t written_ = 0;
  int fail_writes_ = 0;
  int disk_full_hits_ = 0;
  std::vector<std::string> violations_;
  std::vector<Status> failures_;
};

ClientOptions TestOptions() {
  ClientOptions o;
  o.request_timeout_s = 5;
  o.connect_timeout_s = 2;
  o.max_connections = 16;
  o.fetch.part_size = 1 << 20;
  o.fetch.concurrency = 8;
  o.fetch.stall_timeout_s = 2;
  o.fetch.retry_base_delay_s = 0.01;
  o.fetch.retry_max_delay_s = 0.05;
  o.fetch.slow_grace_s = 0.3;
  o.fetch.min_split_bytes = 64 << 10;
  o.fetch.disk_full_retry_s = 0.05;
  return o;
}

// A registry that serves the blob itself (like docker-registry with filesystem storage), with a
// fault hook that may take over a request (return true).
struct BlobServer {
  explicit BlobServer(size_t size, uint64_t seed = 1)
      : blob(RandomBlob(size, seed)), digest(Sha256::Of(blob)) {}

  using Fault = std::function<bool(const TestRequest&, TestConn&)>;
  void SetFault(Fault f) {
    std::lock_guard<std::mutex> lock(mu);
    fault = std::move(f);
  }
  std::vector<std::pair<uint64_t, uint64_t>> Ranges() {
    std::lock_guard<std::mutex> lock(mu);
    return ranges;
  }
  BlobLocation Where() { return {server.url(), "a/b", digest, blob.size()}; }

  std::string blob;
  Digest digest;
  std::mutex mu;
  Fault fault;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  std::atomic<bool> saw_auth{false};
  TestServer server{[this](const TestRequest& r, TestConn& c) {
    Fault f;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (r.range) ranges.push_back(*r.range);
      f = fault;
    }
    if (!r.Header("authorization").empty()) saw_auth = true;
    if (f && f(r, c)) return;
    TestServer::ServeBlob(r, c, blob);
  }};
};

std::unique_ptr<RegistryClient> NewClient(ClientOptions o = TestOptions()) {
  auto c = RegistryClient::Create(std::move(o));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return std::move(c).value();
}

std::string FirstFailure(VecSink& sink) {
  auto f = sink.failures();
  return f.empty() ? "(no failure reported)" : f[0].ToString();
}

void ExpectClean(VecSink& sink, const Digest& digest) {
  EXPECT_EQ(Sha256::Of(sink.data()), digest);
  auto v = sink.violations();
  EXPECT_TRUE(v.empty()) << v.front();
}

// Stats are updated right after the Sink accepts bytes; wait for them to catch up.
uint64_t WaitBytesWritten(Fetch& f, uint64_t want) {
  auto deadline = Clock::now() + std::chrono::seconds(10);
  while (f.Stats().bytes_written < want && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return f.Stats().bytes_written;
}

// A response header for bytes [a, b] of a blob of `total` bytes.
std::string PartHead(uint64_t a, uint64_t b, uint64_t total, uint64_t content_length) {
  return "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes " + std::to_string(a) + "-" +
         std::to_string(b) + "/" + std::to_string(total) +
         "\r\nContent-Length: " + std::to_string(content_length) + "\r\n\r\n";
}

TEST(BlobFetchTest, PartsOutOfOrderGiveTheRightDigest) {
  BlobServer s((24 << 20) + 12345);
  s.SetFault([](const TestRequest& r, TestConn& c) {
    if (r.range) c.Sleep(((r.range->first >> 20) * 7919 % 13) / 1000.0);  // scrambled latency
    return false;
  });
  auto client = NewClient();
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  EXPECT_EQ(WaitBytesWritten(*f, s.blob.size()), s.blob.size());
  FetchStats st = f->Stats();
  EXPECT_GE(st.bytes_requested, s.blob.size());
  EXPECT_FALSE(s.saw_auth);  // anonymous registry: nothing to send
}

// Guided part sizes: parts shrink from unassigned / (4 × concurrency) to min_part_size, so the
// last bytes to land are a few small parts, not concurrency big ones.
TEST(BlobFetchTest, GuidedPartsShrinkTowardTheEnd) {
  BlobServer s(48 << 20);
  ClientOptions o = TestOptions();
  o.fetch.part_size = 8 << 20;
  o.fetch.min_part_size = 1 << 20;
  o.fetch.concurrency = 2;
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  auto ranges = s.Ranges();
  std::erase(ranges, std::make_pair(uint64_t{0}, uint64_t{0}));  // the URL probe
  std::sort(ranges.begin(), ranges.end());
  ASSERT_GE(ranges.size(), 3u);
  EXPECT_EQ(ranges.front(), std::make_pair(uint64_t{0}, uint64_t{(6 << 20) - 1}))
      << "48 MiB / (4 × 2)";
  uint64_t next = 0, last_size = ~uint64_t{0};
  for (const auto& [first, last] : ranges) {
    EXPECT_EQ(first, next) << "parts are contiguous, each asked for once";
    const uint64_t size = last - first + 1;
    EXPECT_LE(size, last_size) << "part at " << first << " is larger than the one before it";
    EXPECT_GE(size, uint64_t{1} << 20);
    last_size = size;
    next = last + 1;
  }
  EXPECT_EQ(next, s.blob.size());
  EXPECT_EQ(last_size, uint64_t{1} << 20);
}

TEST(BlobFetchTest, OnlyWantedRangesAreFetched) {
  BlobServer s(8 << 20);
  auto client = NewClient();
  VecSink sink(s.blob.size());
  std::vector<ByteRange> wanted = {{100, 300000}, {5000000, 5000001}, {(8 << 20) - 10, 8 << 20}};
  auto f = client->Start(s.Where(), wanted, &sink);
  for (auto r : wanted) ASSERT_TRUE(sink.WaitFor(r.begin, r.end, 10));
  // Let any stragglers land, then check nothing else was written.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  RangeSet expect;
  for (auto r : wanted) expect.Add(r);
  EXPECT_EQ(sink.have(), expect);
  auto d = sink.data();
  for (auto r : wanted) EXPECT_EQ(d.substr(r.begin, r.size()), s.blob.substr(r.begin, r.size()));
  EXPECT_TRUE(sink.violations().empty());
}

TEST(BlobFetchTest, StallMidBodyResumesWhereItStopped) {
  BlobServer s(12 << 20);
  std::atomic<bool> stalled{false};
  const uint64_t kPart = 5 << 20;
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->first != kPart || stalled.exchange(true)) return false;
    uint64_t half = 300000;
    c.Send(PartHead(r.range->first, r.range->second, s.blob.size(),
                    r.range->second - r.range->first + 1));
    c.SendBody(std::string_view(s.blob).substr(kPart, half));
    c.Sleep(30);  // hold the connection open, silent
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.stall_timeout_s = 0.3;
  o.fetch.slow_grace_s = 100;          // the stall rule, not the slow-part rule
  o.fetch.min_split_bytes = 64 << 20;  // no splitting: the part itself must resume
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  EXPECT_GE(f->Stats().stalls, 1);
  bool resumed = false;
  for (auto [a, b] : s.Ranges()) resumed |= (a == kPart + 300000 && b == kPart + (1 << 20) - 1);
  EXPECT_TRUE(resumed) << "the stalled part was not resumed from its next byte";
}

TEST(BlobFetchTest, SlowPartIsRefetched) {
  BlobServer s(16 << 20);
  std::atomic<int> slow_served{0};
  const uint64_t kPart = 3 << 20;
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->first != kPart || slow_served++ > 0) return false;
    c.Send(PartHead(r.range->first, r.range->second, s.blob.size(),
                    r.range->second - r.range->first + 1));
    for (uint64_t off = r.range->first; off <= r.range->second; off += 2048) {
      uint64_t n = std::min<uint64_t>(2048, r.range->second + 1 - off);
      if (!c.SendBody(std::string_view(s.blob).substr(off, n)) || !c.Sleep(0.02)) break;
    }
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.min_split_bytes = 64 << 20;  // isolate the slow-part rule from tail splitting
  o.fetch.concurrency = 4;
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto start = Clock::now();
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  EXPECT_GE(f->Stats().slow_refetches, 1);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));  // 1 MiB at 100 KB/s would be 10 s
}

TEST(BlobFetchTest, ConnectionResetMidPartResumes) {
  BlobServer s(12 << 20);
  std::mutex mu;
  std::set<uint64_t> reset_once;
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->second - r.range->first < 500000) return false;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!reset_once.insert(r.range->first).second) return false;
    }
    c.Send(PartHead(r.range->first, r.range->second, s.blob.size(),
                    r.range->second - r.range->first + 1));
    c.SendBody(std::string_view(s.blob).substr(r.range->first, 400000));
    c.Sleep(0.05);  // let the client read what was sent before the reset
    c.Reset();
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.min_split_bytes = 64 << 20;
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  EXPECT_GE(f->Stats().retries, 12);
  // Resumed, not restarted: the server sent about the blob once (1 byte for the resolve).
  EXPECT_LE(s.server.body_bytes_sent(), s.blob.size() + 16);
  EXPECT_GE(s.server.body_bytes_sent(), s.blob.size());
}

TEST(BlobFetchTest, ServerErrorsAreRetried) {
  BlobServer s(6 << 20);
  std::atomic<int> errors{0};
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->second == 0 || errors++ >= 5) return false;
    c.Send(TestServer::Response(500, "oops"));
    return true;
  });
  auto client = NewClient();
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  EXPECT_GE(f->Stats().retries, 5);
}

TEST(BlobFetchTest, TooManyServerErrorsFailWithStatusAndUrl) {
  BlobServer s(2 << 20);
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->second == 0) return false;
    c.Send(TestServer::Response(502, "bad gateway"));
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.max_tries = 3;
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitFailed(20));
  auto fails = sink.failures();
  ASSERT_EQ(fails.size(), 1u);
  EXPECT_EQ(fails[0].code(), Code::kUnavailable);
  EXPECT_NE(fails[0].message().find("HTTP 502"), std::string::npos) << fails[0].message();
  EXPECT_NE(fails[0].message().find(s.server.url() + "/v2/a/b/blobs/"), std::string::npos);
}

TEST(BlobFetchTest, HonoursRetryAfter) {
  BlobServer s(3 << 20);
  std::mutex mu;
  std::vector<Clock::time_point> hits;
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->first != (1 << 20)) return false;
    std::lock_guard<std::mutex> lock(mu);
    hits.push_back(Clock::now());
    if (hits.size() > 1) return false;
    c.Send(TestServer::Response(429, "", {"Retry-After: 1"}));
    return true;
  });
  auto client = NewClient();
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_GE(hits.size(), 2u);
  EXPECT_GE(hits[1] - hits[0], std::chrono::milliseconds(950));
}

TEST(BlobFetchTest, ServerIgnoringRangesFallsBackToOneStream) {
  BlobServer s((5 << 20) + 7);
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    c.Send(TestServer::Response(200, s.blob));  // Range ignored
    return true;
  });
  auto client = NewClient();
  VecSink sink(s.blob.size());
  std::vector<ByteRange> wanted = {{1000, 2 << 20}, {3 << 20, (5 << 20) + 7}};
  auto f = client->Start(s.Where(), wanted, &sink);
  for (auto r : wanted) ASSERT_TRUE(sink.WaitFor(r.begin, r.end, 10));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  RangeSet expect;
  for (auto r : wanted) expect.Add(r);
  EXPECT_EQ(sink.have(), expect);  // unwanted bytes of the stream are not written
  auto d = sink.data();
  for (auto r : wanted) EXPECT_EQ(d.substr(r.begin, r.size()), s.blob.substr(r.begin, r.size()));
  EXPECT_TRUE(sink.violations().empty());
  // A later demand behind the stream is served by a new stream.
  f->Demand(0, 1000);
  ASSERT_TRUE(sink.WaitFor(0, 1000, 10));
  EXPECT_EQ(sink.data().substr(0, 1000), s.blob.substr(0, 1000));
  EXPECT_TRUE(sink.violations().empty());
}

TEST(BlobFetchTest, WrongContentRangeIsRejected) {
  BlobServer s(4 << 20);
  std::mutex mu;
  std::set<uint64_t> lied;
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->second == 0) return false;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!lied.insert(r.range->first).second) return false;
    }
    uint64_t a = r.range->first + 1, b = r.range->second;  // shifted by one byte
    c.Send(PartHead(a, b, s.blob.size(), b - a + 1));
    c.SendBody(std::string_view(s.blob).substr(a, b - a + 1));
    return true;
  });
  auto client = NewClient();
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  EXPECT_GE(f->Stats().retries, 4);

  // A server that always lies fails the fetch with a message that says why.
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->second == 0) return false;
    c.Send(PartHead(r.range->first, r.range->second, s.blob.size() + 1,
                    r.range->second - r.range->first + 1));
    c.SendBody(
        std::string_view(s.blob).substr(r.range->first, r.range->second - r.range->first + 1));
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.max_tries = 2;
  auto client2 = NewClient(o);
  VecSink sink2(s.blob.size());
  auto f2 = client2->Start(s.Where(), {{0, s.blob.size()}}, &sink2);
  ASSERT_TRUE(sink2.WaitFailed(20));
  EXPECT_NE(sink2.failures()[0].message().find("Content-Range"), std::string::npos)
      << sink2.failures()[0].message();
  EXPECT_EQ(sink2.written(), 0u);
}

TEST(BlobFetchTest, TruncatedBodyResumes) {
  BlobServer s(6 << 20);
  std::mutex mu;
  std::set<uint64_t> cut;
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->second - r.range->first < 200000) return false;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!cut.insert(r.range->first).second) return false;
    }
    c.Send(PartHead(r.range->first, r.range->second, s.blob.size(),
                    r.range->second - r.range->first + 1));
    c.SendBody(std::string_view(s.blob).substr(r.range->first, 100000));
    c.Close();  // clean FIN, short of Content-Length
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.min_split_bytes = 64 << 20;
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  EXPECT_LE(s.server.body_bytes_sent(), s.blob.size() + 16);
  bool resumed = false;
  for (auto [a, b] : s.Ranges()) resumed |= (a % (1 << 20) == 100000);
  EXPECT_TRUE(resumed);
}

TEST(BlobFetchTest, ExtraBytesAreNeverWritten) {
  BlobServer s(3 << 20);
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->second == 0) return false;
    uint64_t a = r.range->first, b = r.range->second, len = b - a + 1;
    std::string body = s.blob.substr(a, len) + std::string(100, '\xAA');  // 100 bytes too many
    c.Send(PartHead(a, b, s.blob.size(), body.size()));
    c.SendBody(body);
    return true;
  });
  auto client = NewClient();
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  EXPECT_EQ(WaitBytesWritten(*f, s.blob.size()), s.blob.size());
}

// Registry with bearer auth that redirects blobs to a CDN with signed URLs; the first
// signature expires (403) after a few requests and must be re-resolved.
TEST(BlobFetchTest, CdnRedirectReResolvedWithoutLeakingAuth) {
  BlobServer cdn(10 << 20);
  std::atomic<int> sig1_requests{0};
  cdn.SetFault([&](const TestRequest& r, TestConn& c) {
    if (r.query == "sig=1" && ++sig1_requests > 3) {
      c.Send(TestServer::Response(403, "<Error>expired</Error>"));
      return true;
    }
    if (r.query.rfind("sig=", 0) != 0) {
      c.Send(TestServer::Response(403, "unsigned"));
      return true;
    }
    return false;
  });
  std::atomic<int> resolves{0};
  std::atomic<int> port{0};
  TestServer reg([&](const TestRequest& r, TestConn& c) {
    if (r.path == "/token") {
      c.Send(TestServer::Response(200, R"({"token":"tok"})"));
      return;
    }
    if (r.Header("authorization") != "Bearer tok") {
      c.Send(TestServer::Response(
          401, "",
          {"WWW-Authenticate: Bearer realm=\"http://127.0.0.1:" + std::to_string(port.load()) +
           "/token\",scope=\"repository:a/b:pull\""}));
      return;
    }
    // One same-host hop first, then the CDN.
    if (r.path.find("/hop") == std::string::npos) {
      c.Send(TestServer::Response(307, "", {"Location: " + r.path + "/hop"}));
      return;
    }
    int n = ++resolves;
    c.Send(TestServer::Response(
        307, "", {"Location: " + cdn.server.url() + "/data?sig=" + std::to_string(n)}));
  });
  port = reg.port();
  auto client = NewClient();
  VecSink sink(cdn.blob.size());
  BlobLocation where{reg.url(), "a/b", cdn.digest, cdn.blob.size()};
  auto f = client->Start(where, {{0, cdn.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20)) << FirstFailure(sink);
  ExpectClean(sink, cdn.digest);
  EXPECT_GE(resolves.load(), 2);
  EXPECT_FALSE(cdn.saw_auth) << "Authorization reached the CDN";
}

TEST(BlobFetchTest, ServerThatNeverAnswersFailsClearly) {
  TestServer cdn([](const TestRequest&, TestConn& c) { c.Sleep(30); });
  TestServer reg([&](const TestRequest&, TestConn& c) {
    c.Send(
        TestServer::Response(307, "", {"Location: " + cdn.url() + "/blob?X-Amz-Signature=s3cr3t"}));
  });
  ClientOptions o = TestOptions();
  o.fetch.stall_timeout_s = 0.2;
  o.fetch.max_tries = 3;
  auto client = NewClient(o);
  VecSink sink(1 << 20);
  auto f = client->Start({reg.url(), "a/b", Sha256::Of("z"), 1 << 20}, {{0, 1 << 20}}, &sink);
  ASSERT_TRUE(sink.WaitFailed(20));
  auto fails = sink.failures();
  ASSERT_FALSE(fails.empty());
  EXPECT_NE(fails[0].message().find("stalled"), std::string::npos) << fails[0].message();
  EXPECT_NE(fails[0].message().find(cdn.url() + "/blob"), std::string::npos) << fails[0].message();
  EXPECT_EQ(fails[0].message().find("s3cr3t"), std::string::npos) << "query leaked";
  EXPECT_GE(f->Stats().stalls, 3);
}

TEST(BlobFetchTest, LazyFetchServesDemandOnly) {
  BlobServer s(8 << 20);
  auto client = NewClient();
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {}, &sink);
  f->Demand(3000000, 70000);
  ASSERT_TRUE(sink.WaitFor(3000000, 3070000, 10));
  f->Demand(3000000, 70000);      // already written: nothing new
  f->Demand((8 << 20) - 5, 100);  // clipped at the end
  ASSERT_TRUE(sink.WaitFor((8 << 20) - 5, 8 << 20, 10));
  EXPECT_EQ(WaitBytesWritten(*f, 70005), 70005u);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(f->Stats().bytes_written, 70005u);
  EXPECT_TRUE(sink.violations().empty());
  EXPECT_EQ(sink.data().substr(3000000, 70000), s.blob.substr(3000000, 70000));
}

TEST(BlobFetchTest, DemandSplitsTheTailOfAnInFlightPart) {
  BlobServer s(4 << 20);
  // Every request from offset 0 trickles; others are fast.
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->first != 0 || r.range->second == 0) return false;
    c.Send(PartHead(r.range->first, r.range->second, s.blob.size(),
                    r.range->second - r.range->first + 1));
    for (uint64_t off = 0; off <= r.range->second; off += 4096) {
      uint64_t n = std::min<uint64_t>(4096, r.range->second + 1 - off);
      if (!c.SendBody(std::string_view(s.blob).substr(off, n)) || !c.Sleep(0.01)) break;
    }
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.part_size = 4 << 20;  // one part covers everything
  o.fetch.concurrency = 1;      // and no tail splitting can help
  o.fetch.slow_grace_s = 100;
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitFor(0, 4096, 10));
  auto start = Clock::now();
  f->Demand(3 << 20, 100000);
  ASSERT_TRUE(sink.WaitFor(3 << 20, (3 << 20) + 100000, 10));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));  // not after 3 MiB of trickle
  EXPECT_GE(f->Stats().splits, 1);
  EXPECT_TRUE(sink.violations().empty());
  EXPECT_EQ(sink.data().substr(3 << 20, 100000), s.blob.substr(3 << 20, 100000));
}

TEST(BlobFetchTest, NewDemandOvertakesABulkDemand) {
  BlobServer s(16 << 20);
  s.SetFault([&](const TestRequest& r, TestConn& c) {  // every part trickles at ~1 MiB/s
    if (!r.range || r.range->second == 0) return false;
    c.Send(PartHead(r.range->first, r.range->second, s.blob.size(),
                    r.range->second - r.range->first + 1));
    for (uint64_t off = r.range->first; off <= r.range->second; off += 16384) {
      uint64_t n = std::min<uint64_t>(16384, r.range->second + 1 - off);
      if (!c.SendBody(std::string_view(s.blob).substr(off, n)) || !c.Sleep(0.015)) break;
    }
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.concurrency = 2;
  o.fetch.slow_grace_s = 100;
  o.fetch.min_split_bytes = 64 << 20;
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {}, &sink);
  f->Demand(0, s.blob.size());  // "fetch everything", e.g. a lazy blob turned eager
  ASSERT_TRUE(sink.WaitFor(0, 1, 10));
  auto start = Clock::now();
  f->Demand((15 << 20) + 5, 1000);  // a reader far ahead
  ASSERT_TRUE(sink.WaitFor((15 << 20) + 5, (15 << 20) + 1005, 10));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));  // not after 15 MiB of trickle
  EXPECT_EQ(sink.data().substr((15 << 20) + 5, 1000), s.blob.substr((15 << 20) + 5, 1000));
  EXPECT_TRUE(sink.violations().empty());
}

TEST(BlobFetchTest, IdleSlotsSplitTheSlowTail) {
  BlobServer s(4 << 20);
  std::atomic<bool> trickled{false};
  s.SetFault([&](const TestRequest& r, TestConn& c) {  // the first request of part 0 trickles
    if (!r.range || r.range->first != 0 || r.range->second == 0 || trickled.exchange(true)) {
      return false;
    }
    c.Send(PartHead(r.range->first, r.range->second, s.blob.size(),
                    r.range->second - r.range->first + 1));
    for (uint64_t off = 0; off <= r.range->second; off += 4096) {
      uint64_t n = std::min<uint64_t>(4096, r.range->second + 1 - off);
      if (!c.SendBody(std::string_view(s.blob).substr(off, n)) || !c.Sleep(0.02)) break;
    }
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.concurrency = 4;
  o.fetch.slow_grace_s = 100;  // only tail splitting can help
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto start = Clock::now();
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3));  // 1 MiB at 200 KB/s would be 5 s
  ExpectClean(sink, s.digest);
  EXPECT_GE(f->Stats().splits, 1);
}

TEST(BlobFetchTest, RefetchRewritesWrittenBytes) {
  BlobServer s(2 << 20);
  auto client = NewClient();
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(10));
  uint64_t before = WaitBytesWritten(*f, s.blob.size());
  ASSERT_EQ(before, s.blob.size());
  sink.AllowRewrite(500000, 600000);
  f->Refetch(500000, 100000);
  EXPECT_EQ(WaitBytesWritten(*f, before + 100000), before + 100000);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(f->Stats().bytes_written, before + 100000);
  ExpectClean(sink, s.digest);
}

TEST(BlobFetchTest, DiskFullPausesAndResumes) {
  BlobServer s(3 << 20);
  auto client = NewClient();
  VecSink sink(s.blob.size());
  sink.FailNextWrites(5);
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20));
  ExpectClean(sink, s.digest);
  EXPECT_EQ(sink.disk_full_hits(), 5);
  EXPECT_TRUE(sink.failures().empty());
}

TEST(BlobFetchTest, DestroyingTheFetchStopsSinkCalls) {
  BlobServer s(8 << 20);
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->second == 0) return false;
    c.Send(PartHead(r.range->first, r.range->second, s.blob.size(),
                    r.range->second - r.range->first + 1));
    for (uint64_t off = r.range->first; off <= r.range->second; off += 8192) {
      uint64_t n = std::min<uint64_t>(8192, r.range->second + 1 - off);
      if (!c.SendBody(std::string_view(s.blob).substr(off, n)) || !c.Sleep(0.002)) break;
    }
    return true;
  });
  auto client = NewClient();
  auto sink = std::make_unique<VecSink>(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, sink.get());
  ASSERT_TRUE(sink->WaitFor(0, 8192, 10));
  f.reset();
  uint64_t at_reset = sink->written();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(sink->written(), at_reset);
  EXPECT_TRUE(sink->failures().empty());
  sink.reset();  // would crash any later Sink call
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
}

TEST(BlobFetchTest, ClientShutdownTellsPendingSinks) {
  TestServer slow([](const TestRequest&, TestConn& c) { c.Sleep(30); });
  auto client = NewClient();
  VecSink sink(1 << 20);
  auto f = client->Start({slow.url(), "a/b", Sha256::Of("q"), 1 << 20}, {{0, 1 << 20}}, &sink);
  while (slow.requests() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  client.reset();
  ASSERT_EQ(sink.failures().size(), 1u);
  EXPECT_EQ(sink.failures()[0].code(), Code::kCancelled);
  f.reset();  // after the client: must not touch it
}

TEST(BlobFetchTest, ClientErrorFailsAtOnce) {
  BlobServer s(2 << 20);
  std::atomic<int> bad{0};
  s.SetFault([&](const TestRequest& r, TestConn& c) {
    if (!r.range || r.range->second == 0) return false;
    bad++;
    c.Send(TestServer::Response(400, "no"));
    return true;
  });
  ClientOptions o = TestOptions();
  o.fetch.concurrency = 1;
  o.fetch.min_split_bytes = 64 << 20;
  auto client = NewClient(o);
  VecSink sink(s.blob.size());
  auto f = client->Start(s.Where(), {{0, s.blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitFailed(10));
  EXPECT_EQ(bad.load(), 1);
  EXPECT_NE(sink.failures()[0].message().find("HTTP 400"), std::string::npos);
  EXPECT_EQ(f->Stats().retries, 0);
}

// The registry serves the blob itself with Bearer auth; its token is revoked mid-download.
TEST(BlobFetchTest, RegistryTokenRefreshedMidDownload) {
  std::string blob = RandomBlob(6 << 20, 3);
  std::atomic<int> token_gen{1};
  std::atomic<int> ranged{0};
  std::atomic<int> port{0};
  TestServer reg([&](const TestRequest& r, TestConn& c) {
    if (r.path == "/token") {
      c.Send(TestServer::Response(
          200, "{\"token\":\"tok" + std::to_string(token_gen.load()) + "\",\"expires_in\":300}"));
      return;
    }
    if (r.range && r.range->second > 0 && ++ranged == 3) token_gen = 2;  // revoke tok1
    if (r.Header("authorization") != "Bearer tok" + std::to_string(token_gen.load())) {
      c.Send(TestServer::Response(401, "",
                                  {"WWW-Authenticate: Bearer realm=\"http://127.0.0.1:" +
                                   std::to_string(port.load()) + "/token\""}));
      return;
    }
    TestServer::ServeBlob(r, c, blob);
  });
  port = reg.port();
  auto client = NewClient();
  VecSink sink(blob.size());
  auto f =
      client->Start({reg.url(), "a/b", Sha256::Of(blob), blob.size()}, {{0, blob.size()}}, &sink);
  ASSERT_TRUE(sink.WaitComplete(20)) << FirstFailure(sink);
  ExpectClean(sink, Sha256::Of(blob));
}

TEST(BlobFetchTest, SeveralBlobsInParallel) {
  BlobServer a(3 << 20, 7), b(5 << 20, 8);
  auto client = NewClient();
  VecSink sa(a.blob.size()), sb(b.blob.size());
  auto fa = client->Start(a.Where(), {{0, a.blob.size()}}, &sa);
  auto fb = client->Start(b.Where(), {{0, b.blob.size()}}, &sb);
  ASSERT_TRUE(sa.WaitComplete(20));
  ASSERT_TRUE(sb.WaitComplete(20));
  ExpectClean(sa, a.digest);
  ExpectClean(sb, b.digest);
}

}  // namespace
}  // namespace modelfs::fetch
