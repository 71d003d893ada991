#include "cache/cache.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "cache/blob.h"
#include "cache/file_util.h"
#include "cache/state_file.h"

namespace modelfs::cache {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;

// ---------------------------------------------------------------------------------------------
// A scripted fetcher: Sink calls run on its own "loop" thread, as with the real one, but only
// when the test says so (Write/Fail), in whatever order and pieces the test chooses.

class FakeFetcher : public fetch::Fetcher {
 public:
  FakeFetcher() : loop_([this] { Run(); }) {}
  ~FakeFetcher() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    loop_.join();
  }

  std::unique_ptr<fetch::Fetch> Start(const fetch::BlobLocation& where,
                                      std::vector<ByteRange> wanted, fetch::Sink* sink) override;

  // Answers with what set_chunks() gave for the digest (NotFound otherwise), on the loop
  // thread; while hold_chunks(true), answers wait for release_chunks().
  void GetChunksums(const fetch::BlobLocation& where, ChunksumsFn done) override {
    std::lock_guard<std::mutex> l(mu_);
    ++chunk_asks_;
    StatusOr<std::vector<fetch::Chunk>> r = NotFound("no chunksums here");
    if (auto it = chunks_.find(where.digest); it != chunks_.end()) r = it->second;
    auto answer = [r, done = std::move(done)]() mutable { done(std::move(r)); };
    if (hold_chunks_) {
      held_chunks_.push_back(std::move(answer));
      return;
    }
    tasks_.push_back(std::move(answer));
    cv_.notify_all();
  }
  void set_chunks(const Digest& d, std::vector<fetch::Chunk> chunks) {
    std::lock_guard<std::mutex> l(mu_);
    chunks_[d] = std::move(chunks);
  }
  void hold_chunks(bool hold) {
    std::lock_guard<std::mutex> l(mu_);
    hold_chunks_ = hold;
  }
  void release_chunks() {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& a : held_chunks_) tasks_.push_back(std::move(a));
    held_chunks_.clear();
    cv_.notify_all();
  }
  int chunk_asks() {
    std::lock_guard<std::mutex> l(mu_);
    return chunk_asks_;
  }

  // Runs sink->Write on the loop thread and returns what it said.
  Status Write(const Digest& d, uint64_t offset, std::string_view data) {
    return Call(d, [=](fetch::Sink* s) { return s->Write(offset, data.data(), data.size()); });
  }
  Status Fail(const Digest& d, const Status& st) {
    return Call(d, [=](fetch::Sink* s) {
      s->Failed(st);
      return Status::Ok();
    });
  }

  int starts() {
    std::lock_guard<std::mutex> l(mu_);
    return starts_;
  }
  int live() {
    std::lock_guard<std::mutex> l(mu_);
    return static_cast<int>(sinks_.size());
  }
  std::vector<ByteRange> demands(const Digest& d) {
    std::lock_guard<std::mutex> l(mu_);
    return demands_[d];
  }
  std::vector<ByteRange> wanted(const Digest& d) {
    std::lock_guard<std::mutex> l(mu_);
    return wanted_[d];
  }
  std::vector<ByteRange> refetches(const Digest& d) {
    std::lock_guard<std::mutex> l(mu_);
    return refetches_[d];
  }
  // What every Fetch's Stats() reports as retries (a fetch trouble the cache ranks by).
  void set_retries(int n) {
    std::lock_guard<std::mutex> l(mu_);
    retries_ = n;
  }

 private:
  friend class FakeFetch;
  Status Call(const Digest& d, std::function<Status(fetch::Sink*)> fn) {
    std::promise<Status> done;
    auto f = done.get_future();
    Post([&] {
      fetch::Sink* sink = nullptr;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (auto it = sinks_.find(d); it != sinks_.end()) sink = it->second;
      }
      // A FakeFetch destructor waits for this task to end, so sink stays valid meanwhile.
      done.set_value(sink ? fn(sink) : NotFound("no fetch for this blob"));
    });
    return f.get();
  }
  void Post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> l(mu_);
      tasks_.push_back(std::move(task));
    }
    cv_.notify_all();
  }
  void Run() {
    std::unique_lock<std::mutex> l(mu_);
    while (true) {
      cv_.wait(l, [&] { return stop_ || !tasks_.empty(); });
      if (tasks_.empty()) return;
      auto task = std::move(tasks_.front());
      tasks_.pop_front();
      l.unlock();
      task();
      task = nullptr;
      l.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  int starts_ = 0;
  std::map<Digest, fetch::Sink*> sinks_;
  std::map<Digest, std::vector<ByteRange>> demands_, wanted_, refetches_;
  int retries_ = 0;
  std::map<Digest, std::vector<fetch::Chunk>> chunks_;
  bool hold_chunks_ = false;
  std::vector<std::function<void()>> held_chunks_;
  int chunk_asks_ = 0;
  std::thread loop_;
};

class FakeFetch : public fetch::Fetch {
 public:
  FakeFetch(FakeFetcher* f, Digest d) : f_(f), d_(d) {}
  ~FakeFetch() override {
    // Like the real fetch: stopping with work pending tells the sink it was cancelled.
    (void)f_->Call(d_, [](fetch::Sink* s) {
      s->Failed(Cancelled("fetch stopped: shutting down"));
      return Status::Ok();
    });
    {
      std::lock_guard<std::mutex> l(f_->mu_);
      f_->sinks_.erase(d_);
    }
    // Barrier: a Sink call already running on the loop thread finishes before we return.
    std::promise<void> done;
    auto fut = done.get_future();
    f_->Post([&] { done.set_value(); });
    fut.wait();
  }
  void Demand(uint64_t offset, uint64_t len) override {
    std::lock_guard<std::mutex> l(f_->mu_);
    f_->demands_[d_].push_back({offset, offset + len});
  }
  void Refetch(uint64_t offset, uint64_t len) override {
    std::lock_guard<std::mutex> l(f_->mu_);
    f_->refetches_[d_].push_back({offset, offset + len});
  }
  fetch::FetchStats Stats() const override {
    std::lock_guard<std::mutex> l(f_->mu_);
    fetch::FetchStats st;
    st.retries = f_->retries_;
    return st;
  }

 private:
  FakeFetcher* f_;
  Digest d_;
};

std::unique_ptr<fetch::Fetch> FakeFetcher::Start(const fetch::BlobLocation& where,
                                                 std::vector<ByteRange> wanted, fetch::Sink* sink) {
  std::lock_guard<std::mutex> l(mu_);
  ++starts_;
  sinks_[where.digest] = sink;
  wanted_[where.digest] = wanted;
  return std::make_unique<FakeFetch>(this, where.digest);
}

// ---------------------------------------------------------------------------------------------
// Helpers

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

template <typename Pred>
bool WaitFor(Pred pred, std::chrono::milliseconds limit = std::chrono::milliseconds(10000)) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

std::string ReadAll(const fs::path& p) {
  std::string out;
  UniqueFd fd(::open(p.c_str(), O_RDONLY));
  char buf[65536];
  ssize_t n;
  while (fd.valid() && (n = ::read(fd.get(), buf, sizeof buf)) > 0) out.append(buf, n);
  return out;
}

std::string PreadAll(int fd, uint64_t off, size_t len) {
  std::string out(len, '\0');
  EXPECT_TRUE(PreadFull(fd, out.data(), len, off).ok());
  return out;
}

// The chunk digests of data in chunks of `chunk` bytes (the last one short).
std::vector<fetch::Chunk> ChunksOf(const std::string& data, uint64_t chunk) {
  std::vector<fetch::Chunk> out;
  for (uint64_t b = 0; b < data.size(); b += chunk) {
    const uint64_t e = std::min<uint64_t>(b + chunk, data.size());
    out.push_back({Sha256::Of(std::string_view(data).substr(b, e - b)), b, e});
  }
  return out;
}

// Records Cache::OnBytesReplaced calls.
struct Replaced {
  std::mutex mu;
  std::vector<std::pair<Digest, ByteRange>> calls;
  Cache::ReplacedFn Fn() {
    return [this](const Digest& d, uint64_t b, uint64_t e) {
      std::lock_guard<std::mutex> l(mu);
      calls.push_back({d, {b, e}});
    };
  }
  std::vector<std::pair<Digest, ByteRange>> Get() {
    std::lock_guard<std::mutex> l(mu);
    return calls;
  }
};

// Records one ReadyFn answer.
struct Answer {
  std::mutex mu;
  bool called = false;
  Status status;
  int fd = -1;
  Blob::ReadyFn Fn() {
    return [this](const Status& st, int f) {
      std::lock_guard<std::mutex> l(mu);
      EXPECT_FALSE(called) << "ReadyFn called twice";
      called = true;
      status = st;
      fd = f;
    };
  }
  bool Called() {
    std::lock_guard<std::mutex> l(mu);
    return called;
  }
};

class CacheTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kPart = 64 << 10;  // a multiple of the fs block, for hole checks

  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string tmpl = std::string(base ? base : "/tmp") + "/cache_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    dir_ = root_ / "c";
  }
  void TearDown() override { fs::remove_all(root_); }

  std::unique_ptr<Cache> OpenCache(CacheOptions options = {}) {
    auto c = Cache::Open(dir_, &fetcher_, options);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? std::move(c).value() : nullptr;
  }
  fetch::BlobLocation Where(const std::string& data) {
    return {"http://127.0.0.1:1", "library/x", Sha256::Of(data), data.size()};
  }
  std::shared_ptr<Blob> Open(Cache* c, const fetch::BlobLocation& w) {
    auto b = c->OpenBlob(w);
    EXPECT_TRUE(b.ok()) << b.status().ToString();
    return b.ok() ? *b : nullptr;
  }
  static BlobImpl* Impl(const std::shared_ptr<Blob>& b) { return static_cast<BlobImpl*>(b.get()); }
  Status WritePart(const std::string& data, const Digest& d, int part) {
    uint64_t off = part * kPart;
    return fetcher_.Write(d, off, std::string_view(data).substr(off, kPart));
  }
  fs::path PartialPath(const Digest& d) { return dir_ / "partial" / d.FileName(); }
  fs::path StatePath(const Digest& d) { return dir_ / "partial" / (d.FileName() + ".state"); }
  fs::path BlobPath(const Digest& d) { return dir_ / "blobs" / d.FileName(); }

  FakeFetcher fetcher_;
  fs::path root_, dir_;
};

// ---------------------------------------------------------------------------------------------
// Hashing, commit, ordering

TEST_F(CacheTest, EveryPartOrderCommitsTheSameBlob) {
  const std::string data = RandomBytes(4 * kPart + 1234, 1);  // 5 parts, the last one short
  const auto where = Where(data);
  std::vector<int> order = {0, 1, 2, 3, 4};
  int runs = 0;
  do {
    dir_ = root_ / ("perm" + std::to_string(runs++));
    auto cache = OpenCache();
    auto blob = Open(cache.get(), where);
    blob->Materialize();
    ASSERT_EQ(fetcher_.wanted(where.digest), (std::vector<ByteRange>{{0, data.size()}}));
    for (int p : order) {
      uint64_t off = p * kPart;
      ASSERT_TRUE(
          fetcher_.Write(where.digest, off, std::string_view(data).substr(off, kPart)).ok());
    }
    ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
    BlobStatus st = blob->GetStatus();
    EXPECT_EQ(st.hash_frontier, data.size());
    EXPECT_EQ(st.bytes_present, data.size());
    EXPECT_TRUE(cache->HasBlob(where.digest));
    EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
    EXPECT_FALSE(fs::exists(PartialPath(where.digest)));
    EXPECT_FALSE(fs::exists(StatePath(where.digest)));
    // The fd handed to readers survived the rename.
    Answer a;
    blob->WhenReadable(100, 1000, a.Fn());
    ASSERT_TRUE(a.Called());
    EXPECT_EQ(PreadAll(a.fd, 100, 1000), data.substr(100, 1000));
    EXPECT_EQ(fetcher_.live(), 0) << "the Fetch is dropped after commit";
  } while (std::next_permutation(order.begin(), order.end()));
  EXPECT_EQ(runs, 120);
}

TEST_F(CacheTest, FrontierAdvancesOnlyOverContiguousBytes) {
  const std::string data = RandomBytes(5 * kPart, 2);
  const auto where = Where(data);
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  ASSERT_TRUE(WritePart(data, where.digest, 2).ok());
  Impl(blob)->SyncWorkerForTest();
  EXPECT_EQ(blob->GetStatus().hash_frontier, 0u);
  ASSERT_TRUE(WritePart(data, where.digest, 0).ok());
  Impl(blob)->SyncWorkerForTest();
  EXPECT_EQ(blob->GetStatus().hash_frontier, kPart);
  ASSERT_TRUE(WritePart(data, where.digest, 1).ok());
  Impl(blob)->SyncWorkerForTest();
  EXPECT_EQ(blob->GetStatus().hash_frontier, 3 * kPart);
  EXPECT_EQ(blob->GetStatus().bytes_present, 3 * kPart);
  EXPECT_EQ(blob->GetStatus().state, BlobState::kFetching);
  // Bytes arriving in small pieces inside a part.
  for (uint64_t off = 3 * kPart; off < data.size(); off += 1000) {
    ASSERT_TRUE(fetcher_.Write(where.digest, off, std::string_view(data).substr(off, 1000)).ok());
  }
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(Impl(blob)->BytesHashedForTest(), data.size()) << "each byte hashed once";
}

TEST_F(CacheTest, MaterializedBlobKeepsFetchingAfterTheLastReaderCloses) {
  const std::string data = RandomBytes(2 * kPart, 15);
  const auto where = Where(data);
  auto cache = OpenCache();
  Open(cache.get(), where)->Materialize();  // the only reference is dropped at once
  EXPECT_EQ(fetcher_.live(), 1);
  for (int p : {1, 0}) ASSERT_TRUE(WritePart(data, where.digest, p).ok());
  ASSERT_TRUE(WaitFor([&] { return cache->HasBlob(where.digest); }));
  ASSERT_TRUE(WaitFor([&] { return fetcher_.live() == 0; }));
  EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
}

TEST_F(CacheTest, LazyBlobStopsFetchingWhenClosed) {
  const std::string data = RandomBytes(2 * kPart, 16);
  const auto where = Where(data);
  CacheOptions opt;
  opt.lazy = true;
  auto cache = OpenCache(opt);
  {
    auto blob = Open(cache.get(), where);
    blob->Materialize();
    EXPECT_EQ(fetcher_.starts(), 0) << "lazy: only readers fetch";
    Answer a;
    blob->WhenReadable(0, 10, a.Fn());
    EXPECT_EQ(fetcher_.live(), 1);
    ASSERT_TRUE(WritePart(data, where.digest, 0).ok());
    ASSERT_TRUE(a.Called());
  }
  // The last reference may be a hash step in flight on the worker, so this is asynchronous.
  EXPECT_TRUE(WaitFor([&] { return fetcher_.live() == 0; }));
  EXPECT_TRUE(WaitFor([&] { return fs::exists(StatePath(where.digest)); }));
}

TEST_F(CacheTest, ReopenWhileTheOldBlobIsStillClosingDoesNotWait) {
  const std::string data = RandomBytes(2 * kPart, 18);
  const auto where = Where(data);
  CacheOptions opt;
  opt.lazy = true;
  auto cache = OpenCache(opt);
  for (int round = 0; round < 20; ++round) {
    auto blob = Open(cache.get(), where);
    Answer a;
    blob->WhenReadable(0, 10, a.Fn());
    if (round == 0) {
      ASSERT_TRUE(WritePart(data, where.digest, 0).ok());
    }
    // A Blob waiting on a lock holder (even a dying Blob of ours) would park this read.
    ASSERT_TRUE(a.Called()) << "round " << round;
  }
}

TEST_F(CacheTest, CompleteBlobIsServedWithoutFetching) {
  const std::string data = RandomBytes(3000, 3);
  const auto where = Where(data);
  {
    auto cache = OpenCache();
    ASSERT_NE(cache, nullptr);
  }
  UniqueFd fd(::open(BlobPath(where.digest).c_str(), O_WRONLY | O_CREAT, 0644));
  ASSERT_TRUE(PwriteFull(fd.get(), data.data(), data.size(), 0).ok());
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  EXPECT_EQ(blob->GetStatus().state, BlobState::kVerified);
  blob->Materialize();
  Answer a;
  blob->WhenReadable(10, 1 << 30, a.Fn());  // clamped to the end
  ASSERT_TRUE(a.Called());
  EXPECT_TRUE(a.status.ok());
  EXPECT_EQ(PreadAll(a.fd, 10, data.size() - 10), data.substr(10));
  EXPECT_EQ(fetcher_.starts(), 0);
  // One shared object per digest.
  EXPECT_EQ(Open(cache.get(), where).get(), blob.get());
}

TEST_F(CacheTest, EmptyBlobCommits) {
  const auto where = Where("");
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_TRUE(cache->HasBlob(where.digest));
}

// ---------------------------------------------------------------------------------------------
// Readers

TEST_F(CacheTest, MissingRangeParksDemandsAndIsAnsweredWhenBytesArrive) {
  const std::string data = RandomBytes(5 * kPart, 4);
  const auto where = Where(data);
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  Answer a;
  const uint64_t off = 2 * kPart + 100, len = kPart;  // spans parts 2 and 3
  blob->WhenReadable(off, len, a.Fn());
  EXPECT_FALSE(a.Called());
  EXPECT_EQ(fetcher_.starts(), 1);
  EXPECT_TRUE(fetcher_.wanted(where.digest).empty()) << "a reader starts a lazy fetch";
  EXPECT_EQ(fetcher_.demands(where.digest), (std::vector<ByteRange>{{off, off + len}}));
  ASSERT_TRUE(WritePart(data, where.digest, 2).ok());
  ASSERT_TRUE(WritePart(data, where.digest, 0).ok());
  EXPECT_FALSE(a.Called()) << "answered before its bytes were all there";
  ASSERT_TRUE(
      fetcher_.Write(where.digest, 3 * kPart, std::string_view(data).substr(3 * kPart, 99)).ok());
  EXPECT_FALSE(a.Called());
  ASSERT_TRUE(
      fetcher_.Write(where.digest, 3 * kPart + 99, std::string_view(data).substr(3 * kPart + 99, 2))
          .ok());
  ASSERT_TRUE(a.Called());  // answered on the loop thread, before Write returned
  EXPECT_TRUE(a.status.ok());
  EXPECT_EQ(PreadAll(a.fd, off, len), data.substr(off, len));
  // Present bytes answer at once; a partly present range demands only what is missing.
  Answer b;
  blob->WhenReadable(0, 10, b.Fn());
  EXPECT_TRUE(b.Called());
  Answer c;
  blob->WhenReadable(kPart - 10, 20, c.Fn());
  EXPECT_FALSE(c.Called());
  EXPECT_EQ(fetcher_.demands(where.digest).back(), (ByteRange{kPart, kPart + 10}));
  EXPECT_EQ(fetcher_.starts(), 1);
  cache->Shutdown();  // answers c before it goes out of scope
  ASSERT_TRUE(c.Called());
  EXPECT_EQ(c.status.code(), Code::kCancelled);
}

TEST_F(CacheTest, StrictReadersWaitForVerification) {
  const std::string data = RandomBytes(3 * kPart, 5);
  const auto where = Where(data);
  CacheOptions opt;
  opt.strict = true;
  opt.lazy = true;
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  Answer a;
  blob->WhenReadable(0, 10, a.Fn());
  // Strict readers need the whole blob hashed, so even a lazy cache wants all of it.
  EXPECT_EQ(fetcher_.wanted(where.digest), (std::vector<ByteRange>{{0, data.size()}}));
  ASSERT_TRUE(WritePart(data, where.digest, 0).ok());
  ASSERT_TRUE(WritePart(data, where.digest, 1).ok());
  Impl(blob)->SyncWorkerForTest();
  EXPECT_FALSE(a.Called());
  EXPECT_EQ(blob->GetStatus().hash_frontier, 2 * kPart);
  ASSERT_TRUE(WritePart(data, where.digest, 2).ok());
  ASSERT_TRUE(WaitFor([&] { return a.Called(); }));
  EXPECT_TRUE(a.status.ok());
  EXPECT_TRUE(cache->HasBlob(where.digest));
  EXPECT_EQ(PreadAll(a.fd, 0, 10), data.substr(0, 10));
}

TEST_F(CacheTest, DigestMismatchFailsReadersAndRemovesThePartial) {
  const std::string data = RandomBytes(2 * kPart, 6);
  auto where = Where(data);
  where.digest = Sha256::Of("something else");
  CacheOptions opt;
  opt.strict = true;
  opt.piece_size = kPart;
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  Answer a;
  blob->WhenReadable(0, 10, a.Fn());
  ASSERT_TRUE(WritePart(data, where.digest, 1).ok());
  ASSERT_TRUE(WritePart(data, where.digest, 0).ok());
  // Repair first: each piece is re-fetched once (and comes back the same) before giving up.
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(WaitFor([&] { return fetcher_.refetches(where.digest).size() == i + 1; }));
    const ByteRange r = fetcher_.refetches(where.digest)[i];
    EXPECT_EQ(r.size(), kPart);
    EXPECT_FALSE(a.Called()) << "strict readers wait during a repair";
    EXPECT_NE(blob->GetStatus().condition.find("repairing"), std::string::npos);
    ASSERT_TRUE(WritePart(data, where.digest, static_cast<int>(r.begin / kPart)).ok());
  }
  ASSERT_TRUE(WaitFor([&] { return a.Called(); }));
  EXPECT_EQ(fetcher_.refetches(where.digest).size(), 2u);
  EXPECT_EQ(a.status.code(), Code::kDataLoss);
  EXPECT_NE(a.status.message().find(where.digest.ToString()), std::string::npos);
  EXPECT_NE(a.status.message().find(Sha256::Of(data).ToString()), std::string::npos);
  EXPECT_EQ(blob->GetStatus().state, BlobState::kFailed);
  EXPECT_FALSE(fs::exists(PartialPath(where.digest)));
  EXPECT_FALSE(fs::exists(StatePath(where.digest)));
  EXPECT_FALSE(cache->HasBlob(where.digest));
  Answer b;
  blob->WhenReadable(0, 10, b.Fn());
  ASSERT_TRUE(b.Called());
  EXPECT_EQ(b.status.code(), Code::kDataLoss);
}

// A corrupted byte in a part whose transfer had trouble: that piece is re-fetched first, and only
// the pieces from it to the end are hashed again.
TEST_F(CacheTest, RepairRefetchesTheTroubledPieceFirst) {
  const std::string data = RandomBytes(6 * kPart, 21);
  const auto where = Where(data);
  CacheOptions opt;
  opt.piece_size = kPart;
  auto cache = OpenCache(opt);
  Replaced replaced;
  cache->OnBytesReplaced(replaced.Fn());
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  std::string bad = data;
  bad[3 * kPart + 100] ^= 0x20;
  for (int p : {0, 1, 2}) ASSERT_TRUE(WritePart(data, where.digest, p).ok());
  ASSERT_TRUE(
      fetcher_.Write(where.digest, 3 * kPart, std::string_view(bad).substr(3 * kPart, kPart / 2))
          .ok());
  fetcher_.set_retries(1);  // piece 3's transfer broke off and was retried
  const uint64_t half = 3 * kPart + kPart / 2;
  ASSERT_TRUE(fetcher_.Write(where.digest, half, std::string_view(bad).substr(half, kPart / 2)).ok());
  for (int p : {5, 4}) ASSERT_TRUE(WritePart(data, where.digest, p).ok());
  ASSERT_TRUE(WaitFor([&] { return !fetcher_.refetches(where.digest).empty(); }));
  EXPECT_EQ(fetcher_.refetches(where.digest)[0], (ByteRange{3 * kPart, 4 * kPart}));
  EXPECT_EQ(blob->GetStatus().state, BlobState::kFetching);
  // Default mode: present bytes are still served during the repair.
  Answer a;
  blob->WhenReadable(0, 10, a.Fn());
  EXPECT_TRUE(a.Called());
  const uint64_t hashed = Impl(blob)->BytesHashedForTest();
  EXPECT_EQ(hashed, data.size());
  // The server's bytes, in pieces.
  for (uint64_t off = 3 * kPart; off < 4 * kPart; off += 1000) {
    uint64_t n = std::min<uint64_t>(1000, 4 * kPart - off);
    ASSERT_TRUE(fetcher_.Write(where.digest, off, std::string_view(data).substr(off, n)).ok());
  }
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(fetcher_.refetches(where.digest).size(), 1u);
  EXPECT_EQ(Impl(blob)->BytesHashedForTest() - hashed, 3 * kPart) << "re-hashed from piece 3 on";
  ASSERT_EQ(replaced.Get().size(), 1u);
  EXPECT_EQ(replaced.Get()[0].second, (ByteRange{3 * kPart + 100, 4 * kPart}));
  EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
  EXPECT_EQ(blob->GetStatus().condition, "");
}

// Without any trouble seen, pieces are re-fetched in order; an identical piece is not re-hashed.
TEST_F(CacheTest, RepairSkipsIdenticalPiecesWithoutRehashing) {
  const std::string data = RandomBytes(5 * kPart + 7, 22);
  const auto where = Where(data);
  CacheOptions opt;
  opt.piece_size = kPart;
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  std::string bad = data;
  bad[5 * kPart + 3] ^= 1;  // in the short last piece
  ASSERT_TRUE(fetcher_.Write(where.digest, 0, bad).ok());
  const uint64_t hashed_once = data.size();
  for (uint64_t i = 0; i < 6; ++i) {
    ASSERT_TRUE(WaitFor([&] { return fetcher_.refetches(where.digest).size() == i + 1; })) << i;
    const ByteRange r = fetcher_.refetches(where.digest)[i];
    EXPECT_EQ(r.begin, i * kPart);
    if (i < 5) {
      EXPECT_EQ(Impl(blob)->BytesHashedForTest(), hashed_once);
    }
    ASSERT_TRUE(fetcher_.Write(where.digest, r.begin, std::string_view(data).substr(r.begin, r.size()))
                    .ok());
  }
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(Impl(blob)->BytesHashedForTest(), hashed_once + 7);
  EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
}

// Checkpoints survive a restart: a blob resumed complete but corrupt repairs from its piece.
TEST_F(CacheTest, RepairAfterARestartUsesSavedCheckpoints) {
  const std::string data = RandomBytes(4 * kPart, 23);
  const auto where = Where(data);
  CacheOptions opt;
  opt.piece_size = kPart;
  std::string bad = data;
  bad[2 * kPart + 5] ^= 1;
  {
    auto cache = OpenCache(opt);
    auto blob = Open(cache.get(), where);
    blob->Materialize();
    for (int p : {0, 1, 2}) {
      ASSERT_TRUE(fetcher_.Write(where.digest, p * kPart, std::string_view(bad).substr(p * kPart, kPart))
                      .ok());
    }
    Impl(blob)->SyncWorkerForTest();
  }
  auto text = ReadAll(StatePath(where.digest));
  auto st = DecodeState(text, where.digest, data.size());
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->checkpoints.size(), 3u);
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  ASSERT_TRUE(WritePart(data, where.digest, 3).ok());
  ASSERT_TRUE(WaitFor([&] { return !fetcher_.refetches(where.digest).empty(); }));
  // No trouble seen: in order. Pieces 0 and 1 come back identical.
  for (uint64_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(WaitFor([&] { return fetcher_.refetches(where.digest).size() == i + 1; }));
    ASSERT_TRUE(WritePart(data, where.digest, static_cast<int>(i)).ok());
  }
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(Impl(blob)->BytesHashedForTest(), kPart + 2 * kPart) << "piece 3, then 2 and 3 again";
}

// The repair ranking survives a restart: the piece whose transfer had trouble before the crash
// is still re-fetched first.
TEST_F(CacheTest, RepairAfterARestartStartsWithSavedSuspects) {
  const std::string data = RandomBytes(6 * kPart, 24);
  const auto where = Where(data);
  CacheOptions opt;
  opt.piece_size = kPart;
  std::string bad = data;
  bad[4 * kPart + 100] ^= 0x20;
  {
    auto cache = OpenCache(opt);
    auto blob = Open(cache.get(), where);
    blob->Materialize();
    for (int p : {0, 1, 2, 3}) ASSERT_TRUE(WritePart(data, where.digest, p).ok());
    ASSERT_TRUE(
        fetcher_.Write(where.digest, 4 * kPart, std::string_view(bad).substr(4 * kPart, kPart / 2))
            .ok());
    fetcher_.set_retries(1);  // piece 4's transfer broke off and was retried
    const uint64_t half = 4 * kPart + kPart / 2;
    ASSERT_TRUE(
        fetcher_.Write(where.digest, half, std::string_view(bad).substr(half, kPart / 2)).ok());
    Impl(blob)->SyncWorkerForTest();
  }
  fetcher_.set_retries(0);
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  ASSERT_TRUE(WritePart(data, where.digest, 5).ok());
  ASSERT_TRUE(WaitFor([&] { return !fetcher_.refetches(where.digest).empty(); }));
  EXPECT_EQ(fetcher_.refetches(where.digest)[0], (ByteRange{4 * kPart, 5 * kPart}));
  ASSERT_TRUE(WritePart(data, where.digest, 4).ok());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(fetcher_.refetches(where.digest).size(), 1u);
}

// ---------------------------------------------------------------------------------------------
// Chunk digests

// Chunks (not aligned to parts) are verified as their bytes complete; a strict reader is
// answered once its chunk matched, long before the blob's digest is known.
TEST_F(CacheTest, ChunksReleaseStrictReadersEarly) {
  const std::string data = RandomBytes(6 * kPart + 99, 30);
  const auto where = Where(data);
  const uint64_t chunk = kPart * 3 / 2;
  fetcher_.set_chunks(where.digest, ChunksOf(data, chunk));
  CacheOptions opt;
  opt.strict = true;
  opt.piece_size = kPart;
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  Answer first, third;
  blob->WhenReadable(10, 100, first.Fn());
  blob->WhenReadable(2 * chunk + 5, 10, third.Fn());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().chunks == 5; }));
  ASSERT_TRUE(fetcher_.Write(where.digest, 0, std::string_view(data).substr(0, kPart)).ok());
  Impl(blob)->SyncWorkerForTest();
  EXPECT_FALSE(first.Called()) << "its chunk is not complete yet";
  ASSERT_TRUE(
      fetcher_.Write(where.digest, kPart, std::string_view(data).substr(kPart, kPart)).ok());
  ASSERT_TRUE(WaitFor([&] { return first.Called(); }));
  EXPECT_TRUE(first.status.ok());
  EXPECT_EQ(PreadAll(first.fd, 10, 100), data.substr(10, 100));
  EXPECT_FALSE(third.Called());
  BlobStatus st = blob->GetStatus();
  EXPECT_EQ(st.state, BlobState::kFetching);
  EXPECT_EQ(st.chunks_verified, 1u);
  Answer again;  // a new strict read of verified bytes is answered at once
  blob->WhenReadable(chunk - 10, 10, again.Fn());
  EXPECT_TRUE(again.Called());
  ASSERT_TRUE(
      fetcher_.Write(where.digest, 2 * kPart, std::string_view(data).substr(2 * kPart)).ok());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  ASSERT_TRUE(WaitFor([&] { return third.Called(); }));
  EXPECT_EQ(fetcher_.chunk_asks(), 1);
  EXPECT_TRUE(fetcher_.refetches(where.digest).empty());
  EXPECT_LE(Impl(blob)->ChunkBytesHashedForTest(), data.size());
  EXPECT_FALSE(fs::exists(dir_ / "partial" / (where.digest.FileName() + ".chunks")));
}

// A bad chunk is re-fetched alone: its bytes stop being served, the frontier goes back to before
// it, and no piece repair happens.
TEST_F(CacheTest, BadChunkIsRefetchedAlone) {
  const std::string data = RandomBytes(6 * kPart, 31);
  const auto where = Where(data);
  const uint64_t chunk = kPart / 2;
  fetcher_.set_chunks(where.digest, ChunksOf(data, chunk));
  CacheOptions opt;
  opt.piece_size = kPart;
  auto cache = OpenCache(opt);
  Replaced replaced;
  cache->OnBytesReplaced(replaced.Fn());
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().chunks == 12; }));
  std::string bad = data;
  bad[7 * chunk + 3] ^= 0x40;  // chunk 7, in piece 3
  ASSERT_TRUE(fetcher_.Write(where.digest, 0, bad).ok());
  ASSERT_TRUE(WaitFor([&] { return !fetcher_.refetches(where.digest).empty(); }));
  EXPECT_EQ(fetcher_.refetches(where.digest)[0], (ByteRange{7 * chunk, 8 * chunk}));
  ASSERT_TRUE(WaitFor([&] { return !replaced.Get().empty(); }));
  EXPECT_EQ(replaced.Get()[0], std::make_pair(where.digest, ByteRange{7 * chunk, 8 * chunk}))
      << "readers' cached pages of the bad chunk are stale";
  Impl(blob)->SyncWorkerForTest();
  BlobStatus st = blob->GetStatus();
  EXPECT_EQ(st.chunk_refetches, 1);
  EXPECT_EQ(st.bytes_present, data.size() - chunk);
  EXPECT_LE(st.hash_frontier, 7 * chunk);
  Answer a;  // default mode: the bad chunk's bytes are not served until the server resends them
  blob->WhenReadable(7 * chunk, 10, a.Fn());
  EXPECT_FALSE(a.Called());
  const std::string_view good = std::string_view(data).substr(7 * chunk, chunk);
  ASSERT_TRUE(fetcher_.Write(where.digest, 7 * chunk, good).ok());
  ASSERT_TRUE(WaitFor([&] { return a.Called(); }));
  EXPECT_EQ(PreadAll(a.fd, 7 * chunk, 10), data.substr(7 * chunk, 10));
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
  st = blob->GetStatus();
  EXPECT_EQ(fetcher_.refetches(where.digest).size(), 1u);
  EXPECT_EQ(st.bytes_repaired, 1u);
  EXPECT_FALSE(st.chunks_distrusted);
  // The frontier either stopped at the bad chunk or went back to the checkpoint at its start
  // (in the middle of piece 3), not to the piece's.
  EXPECT_LE(Impl(blob)->BytesHashedForTest(), data.size() + (data.size() - 7 * chunk));
}

// A wrong chunk digest over good bytes: the re-fetched chunk comes back the same, the chunk
// digests are distrusted, and the blob's digest commits it.
TEST_F(CacheTest, WrongChunkDigestIsDistrusted) {
  const std::string data = RandomBytes(4 * kPart, 32);
  const auto where = Where(data);
  auto chunks = ChunksOf(data, kPart);
  chunks[1].digest = Sha256::Of("not chunk 1");
  fetcher_.set_chunks(where.digest, chunks);
  CacheOptions opt;
  opt.piece_size = kPart;
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().chunks == 4; }));
  ASSERT_TRUE(fetcher_.Write(where.digest, 0, std::string_view(data).substr(0, 3 * kPart)).ok());
  ASSERT_TRUE(WaitFor([&] { return fetcher_.refetches(where.digest).size() == 1; }));
  ASSERT_TRUE(WritePart(data, where.digest, 1).ok());  // the same bytes again
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().chunks_distrusted; }));
  ASSERT_TRUE(WritePart(data, where.digest, 3).ok());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(fetcher_.refetches(where.digest).size(), 1u);
  EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
}

// Chunk digests that match bytes the blob's digest rejects (a registry consistent with its own
// bad bytes): every chunk verifies, so they are distrusted and piece repair takes over.
TEST_F(CacheTest, ChunksAgreeingWithBadBytesFallBackToPieceRepair) {
  const std::string data = RandomBytes(3 * kPart, 33);
  const auto where = Where(data);
  std::string bad = data;
  bad[kPart + 1] ^= 1;
  fetcher_.set_chunks(where.digest, ChunksOf(bad, kPart));
  CacheOptions opt;
  opt.piece_size = kPart;
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().chunks == 3; }));
  ASSERT_TRUE(fetcher_.Write(where.digest, 0, bad).ok());
  ASSERT_TRUE(WaitFor([&] { return !fetcher_.refetches(where.digest).empty(); }));
  EXPECT_TRUE(blob->GetStatus().chunks_distrusted);
  EXPECT_NE(blob->GetStatus().condition.find("repairing"), std::string::npos);
  auto verified = [&] { return blob->GetStatus().state == BlobState::kVerified; };
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(
        WaitFor([&] { return fetcher_.refetches(where.digest).size() == i + 1 || verified(); }));
    if (verified()) break;
    const ByteRange r = fetcher_.refetches(where.digest)[i];
    ASSERT_TRUE(WritePart(data, where.digest, static_cast<int>(r.begin / kPart)).ok());
  }
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
}

// The chunk list arrives after the frontier hashed past a bad chunk: the frontier goes back.
TEST_F(CacheTest, LateChunksRewindTheFrontier) {
  const std::string data = RandomBytes(4 * kPart, 34);
  const auto where = Where(data);
  fetcher_.set_chunks(where.digest, ChunksOf(data, kPart));
  fetcher_.hold_chunks(true);
  CacheOptions opt;
  opt.piece_size = kPart;
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  std::string bad = data;
  bad[kPart + 5] ^= 1;
  ASSERT_TRUE(fetcher_.Write(where.digest, 0, std::string_view(bad).substr(0, 3 * kPart)).ok());
  Impl(blob)->SyncWorkerForTest();
  EXPECT_EQ(blob->GetStatus().hash_frontier, 3 * kPart);
  fetcher_.release_chunks();
  ASSERT_TRUE(WaitFor([&] { return !fetcher_.refetches(where.digest).empty(); }));
  EXPECT_EQ(fetcher_.refetches(where.digest)[0], (ByteRange{kPart, 2 * kPart}));
  Impl(blob)->SyncWorkerForTest();
  EXPECT_EQ(blob->GetStatus().hash_frontier, kPart);
  ASSERT_TRUE(WritePart(data, where.digest, 1).ok());
  ASSERT_TRUE(WritePart(data, where.digest, 3).ok());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
  EXPECT_EQ(Impl(blob)->BytesHashedForTest(), 3 * kPart + 3 * kPart);
}

// Verified chunks and the chunk list survive a restart: nothing is hashed or asked for again.
TEST_F(CacheTest, VerifiedChunksSurviveARestart) {
  const std::string data = RandomBytes(4 * kPart, 35);
  const auto where = Where(data);
  fetcher_.set_chunks(where.digest, ChunksOf(data, kPart));
  CacheOptions opt;
  opt.piece_size = kPart;
  opt.strict = true;
  {
    auto cache = OpenCache(opt);
    auto blob = Open(cache.get(), where);
    blob->Materialize();
    ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().chunks == 4; }));
    ASSERT_TRUE(fetcher_.Write(where.digest, 0, std::string_view(data).substr(0, 2 * kPart)).ok());
    ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().chunks_verified == 2; }));
    Impl(blob)->SyncWorkerForTest();
  }
  auto st = DecodeState(ReadAll(StatePath(where.digest)), where.digest, data.size());
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_TRUE(st->verified.Contains(0, 2 * kPart));
  auto cache = OpenCache(opt);
  auto blob = Open(cache.get(), where);
  Impl(blob)->SyncWorkerForTest();
  EXPECT_EQ(blob->GetStatus().chunks_verified, 2u);
  EXPECT_EQ(Impl(blob)->ChunkBytesHashedForTest(), 0u) << "verified chunks are not hashed again";
  Answer a;
  blob->WhenReadable(kPart, 10, a.Fn());
  EXPECT_TRUE(a.Called()) << "strict reader of a verified chunk, answered from the saved state";
  blob->Materialize();
  ASSERT_TRUE(
      fetcher_.Write(where.digest, 2 * kPart, std::string_view(data).substr(2 * kPart)).ok());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(fetcher_.chunk_asks(), 1);
  EXPECT_LE(Impl(blob)->ChunkBytesHashedForTest(), 2 * kPart) << "only the new chunks";
}

TEST_F(CacheTest, FetchFailureFailsReaders) {
  const std::string data = RandomBytes(2 * kPart, 7);
  const auto where = Where(data);
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  Answer a;
  blob->WhenReadable(0, 10, a.Fn());
  ASSERT_TRUE(fetcher_.Fail(where.digest, Unavailable("registry down")).ok());
  ASSERT_TRUE(WaitFor([&] { return a.Called(); }));  // answered on the hash thread
  EXPECT_EQ(a.status.code(), Code::kUnavailable);
  EXPECT_EQ(blob->GetStatus().state, BlobState::kFailed);
  Answer b;
  blob->WhenReadable(kPart, 10, b.Fn());
  ASSERT_TRUE(b.Called());
  EXPECT_EQ(b.status.code(), Code::kUnavailable);
}

TEST_F(CacheTest, FetchFailureKeepsProgressForTheNextBlob) {
  const std::string data = RandomBytes(2 * kPart, 20);
  const auto where = Where(data);
  auto cache = OpenCache();
  {
    auto blob = Open(cache.get(), where);
    blob->Materialize();
    ASSERT_TRUE(WritePart(data, where.digest, 0).ok());
    ASSERT_TRUE(fetcher_.Fail(where.digest, Unavailable("registry down")).ok());
    ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kFailed; }));
  }
  // The failed Blob was unpinned and dropped (possibly on the worker); a new one resumes.
  std::shared_ptr<Blob> blob;
  ASSERT_TRUE(WaitFor([&] {
    blob = Open(cache.get(), where);
    if (blob->GetStatus().state != BlobState::kFailed) return true;
    blob.reset();
    return false;
  }));
  EXPECT_EQ(blob->GetStatus().bytes_present, kPart);
  blob->Materialize();
  ASSERT_TRUE(WritePart(data, where.digest, 1).ok());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
}

TEST_F(CacheTest, ShutdownCancelsParkedReadersAndStopsFetches) {
  const std::string data = RandomBytes(2 * kPart, 8);
  const auto where = Where(data);
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  Answer a;
  blob->WhenReadable(kPart, 10, a.Fn());
  ASSERT_TRUE(WritePart(data, where.digest, 0).ok());
  EXPECT_EQ(fetcher_.live(), 1);
  cache->Shutdown();
  ASSERT_TRUE(a.Called());
  EXPECT_EQ(a.status.code(), Code::kCancelled);
  EXPECT_EQ(fetcher_.live(), 0);
  Answer b;
  blob->WhenReadable(kPart, 10, b.Fn());
  ASSERT_TRUE(b.Called());
  EXPECT_EQ(b.status.code(), Code::kCancelled);
  EXPECT_FALSE(cache->OpenBlob(where).ok());
  EXPECT_TRUE(fs::exists(StatePath(where.digest))) << "state saved on shutdown";
}

// ---------------------------------------------------------------------------------------------
// Resume state

TEST_F(CacheTest, StateRoundTripsWithoutRehashing) {
  const std::string data = RandomBytes(5 * kPart, 9);
  const auto where = Where(data);
  {
    auto cache = OpenCache();
    auto blob = Open(cache.get(), where);
    blob->Materialize();
    for (int p : {0, 1, 3}) ASSERT_TRUE(WritePart(data, where.digest, p).ok());
    Impl(blob)->SyncWorkerForTest();
    EXPECT_EQ(blob->GetStatus().hash_frontier, 2 * kPart);
  }  // clean shutdown persists
  ASSERT_TRUE(fs::exists(StatePath(where.digest)));
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  Impl(blob)->SyncWorkerForTest();
  BlobStatus st = blob->GetStatus();
  EXPECT_EQ(st.bytes_present, 3 * kPart);
  EXPECT_EQ(st.hash_frontier, 2 * kPart);
  EXPECT_EQ(Impl(blob)->BytesHashedForTest(), 0u) << "the hashed prefix was not re-hashed";
  blob->Materialize();
  EXPECT_EQ(fetcher_.wanted(where.digest),
            (std::vector<ByteRange>{{2 * kPart, 3 * kPart}, {4 * kPart, 5 * kPart}}));
  Answer a;
  blob->WhenReadable(3 * kPart, 10, a.Fn());
  ASSERT_TRUE(a.Called()) << "restored bytes are readable at once";
  for (int p : {4, 2}) ASSERT_TRUE(WritePart(data, where.digest, p).ok());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(Impl(blob)->BytesHashedForTest(), 3 * kPart);
  EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
}

TEST_F(CacheTest, StateIsSavedWhileFetchingAndSurvivesACrash) {
  const std::string data = RandomBytes(4 * kPart, 14);
  const auto where = Where(data);
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  for (int p : {0, 2}) ASSERT_TRUE(WritePart(data, where.digest, p).ok());
  // Saved within about a second, with no shutdown.
  ASSERT_TRUE(WaitFor([&] {
    auto text = ReadAll(StatePath(where.digest));
    auto st = DecodeState(text, where.digest, data.size());
    return st.ok() && st->present.TotalBytes() == 2 * kPart && st->frontier == kPart;
  }));
  // "Crash": copy the cache as it is now and open the copy.
  const fs::path copy = root_ / "copy";
  fs::copy(dir_, copy, fs::copy_options::recursive);
  dir_ = copy;
  auto cache2 = OpenCache();
  auto blob2 = Open(cache2.get(), where);
  EXPECT_EQ(blob2->GetStatus().bytes_present, 2 * kPart);
  EXPECT_EQ(blob2->GetStatus().hash_frontier, kPart);
}

TEST_F(CacheTest, ConcurrentReadersAndShuffledWritesAcrossBlobs) {
  constexpr int kBlobs = 3, kReaders = 4, kReadsEach = 200;
  constexpr size_t kChunk = 4096;
  std::vector<std::string> datas;
  std::vector<std::shared_ptr<Blob>> blobs;
  auto cache = OpenCache();
  for (int i = 0; i < kBlobs; ++i) {
    datas.push_back(RandomBytes(3 * kPart + 777 * i, 100 + i));
    blobs.push_back(Open(cache.get(), Where(datas.back())));
    blobs.back()->Materialize();
  }
  std::atomic<int> answered{0}, bad{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < kReaders; ++r) {
    readers.emplace_back([&, r] {
      std::mt19937 rng(r);
      for (int i = 0; i < kReadsEach; ++i) {
        int b = rng() % kBlobs;
        const std::string& d = datas[b];
        uint64_t off = rng() % d.size(), len = 1 + rng() % 20000;
        blobs[b]->WhenReadable(off, len, [&, b, off, len](const Status& st, int fd) {
          const std::string& d = datas[b];
          uint64_t n = std::min<uint64_t>(len, d.size() - off);
          std::string got(n, '\0');
          if (!st.ok() || !PreadFull(fd, got.data(), n, off).ok() || got != d.substr(off, n)) {
            ++bad;
          }
          ++answered;
        });
      }
    });
  }
  // Writes: every blob's chunks in one shuffled stream, as from many parts at once.
  std::vector<std::pair<int, uint64_t>> chunks;
  for (int b = 0; b < kBlobs; ++b) {
    for (uint64_t off = 0; off < datas[b].size(); off += kChunk) chunks.push_back({b, off});
  }
  std::shuffle(chunks.begin(), chunks.end(), std::mt19937(7));
  for (auto [b, off] : chunks) {
    const Digest d = Sha256::Of(datas[b]);
    ASSERT_TRUE(fetcher_.Write(d, off, std::string_view(datas[b]).substr(off, kChunk)).ok());
  }
  for (auto& t : readers) t.join();
  ASSERT_TRUE(WaitFor([&] { return answered == kReaders * kReadsEach; }));
  EXPECT_EQ(bad, 0);
  for (int b = 0; b < kBlobs; ++b) {
    ASSERT_TRUE(WaitFor([&] { return blobs[b]->GetStatus().state == BlobState::kVerified; }));
    EXPECT_EQ(ReadAll(BlobPath(Sha256::Of(datas[b]))), datas[b]);
  }
}

class BadStateTest : public CacheTest {
 protected:
  // A partial file holding only part 0 (the rest holes), and a state file with this text.
  void Plant(const std::string& data, const std::string& state_text) {
    { auto c = OpenCache(); }
    const Digest d = Sha256::Of(data);
    UniqueFd fd(::open(PartialPath(d).c_str(), O_RDWR | O_CREAT, 0644));
    ASSERT_TRUE(PwriteFull(fd.get(), data.data(), kPart, 0).ok());
    ASSERT_EQ(::ftruncate(fd.get(), data.size()), 0);
    UniqueFd sfd(::open(StatePath(d).c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644));
    ASSERT_TRUE(PwriteFull(sfd.get(), state_text.data(), state_text.size(), 0).ok());
  }
  PartialState Claim(const std::string& data, uint64_t present_end) {
    PartialState s;
    s.digest = Sha256::Of(data);
    s.size = data.size();
    s.present.Add(0, present_end);
    s.sha_state = Sha256().SaveState();
    return s;
  }
  uint64_t PresentAfterOpen(const std::string& data) {
    auto cache = OpenCache();
    auto blob = Open(cache.get(), Where(data));
    return blob->GetStatus().bytes_present;
  }
  const std::string data_ = RandomBytes(4 * kPart, 10);
};

TEST_F(BadStateTest, HonestStateIsTrusted) {
  Plant(data_, EncodeState(Claim(data_, kPart)));
  EXPECT_EQ(PresentAfterOpen(data_), kPart);
}

TEST_F(BadStateTest, CorruptStateIsIgnored) {
  std::string text = EncodeState(Claim(data_, kPart));
  text[text.find("range 0") + 6] = '1';
  Plant(data_, text);
  EXPECT_EQ(PresentAfterOpen(data_), 0u);
}

TEST_F(BadStateTest, TruncatedStateIsIgnored) {
  std::string text = EncodeState(Claim(data_, kPart));
  Plant(data_, text.substr(0, text.size() - 10));
  EXPECT_EQ(PresentAfterOpen(data_), 0u);
}

TEST_F(BadStateTest, StateForAnotherSizeOrVersionIsIgnored) {
  PartialState s = Claim(data_, kPart);
  s.size = data_.size() + 1;
  Plant(data_, EncodeState(s));
  EXPECT_EQ(PresentAfterOpen(data_), 0u);
  std::string text = EncodeState(Claim(data_, kPart));
  text.replace(text.find(" " + std::to_string(kStateVersion) + "\n"), 3, " 9\n");
  std::string body = text.substr(0, text.rfind("checksum "));
  Plant(data_, body + "checksum " + Sha256::Of(body).Hex() + "\n");
  EXPECT_EQ(PresentAfterOpen(data_), 0u);
}

TEST_F(BadStateTest, ClaimedHolesAreDropped) {
  // Claims everything; only part 0 was ever written. The rest must be fetched again.
  Plant(data_, EncodeState(Claim(data_, data_.size())));
  EXPECT_EQ(PresentAfterOpen(data_), kPart);
}

TEST_F(BadStateTest, ResumedBlobStillCommitsCorrectly) {
  Plant(data_, EncodeState(Claim(data_, data_.size())));
  auto cache = OpenCache();
  auto blob = Open(cache.get(), Where(data_));
  blob->Materialize();
  EXPECT_EQ(fetcher_.wanted(Sha256::Of(data_)), (std::vector<ByteRange>{{kPart, data_.size()}}));
  for (int p : {3, 1, 2}) ASSERT_TRUE(WritePart(data_, Sha256::Of(data_), p).ok());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(ReadAll(BlobPath(Sha256::Of(data_))), data_);
}

// ---------------------------------------------------------------------------------------------
// Another process fetching the same blob (flock on the partial file)

TEST_F(CacheTest, WaitsForAnotherProcessThatCommits) {
  const std::string data = RandomBytes(kPart, 11);
  const auto where = Where(data);
  { auto c = OpenCache(); }
  // "Another process": its own open file description holding the lock.
  UniqueFd other(::open(PartialPath(where.digest).c_str(), O_RDWR | O_CREAT, 0644));
  ASSERT_EQ(::flock(other.get(), LOCK_EX | LOCK_NB), 0);
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  Answer a;
  blob->WhenReadable(0, 100, a.Fn());
  blob->Materialize();
  EXPECT_EQ(fetcher_.starts(), 0) << "never fetch what another process is fetching";
  ASSERT_TRUE(PwriteFull(other.get(), data.data(), data.size(), 0).ok());
  ASSERT_EQ(::rename(PartialPath(where.digest).c_str(), BlobPath(where.digest).c_str()), 0);
  other.Reset();
  ASSERT_TRUE(WaitFor([&] { return a.Called(); }));
  EXPECT_TRUE(a.status.ok());
  EXPECT_EQ(PreadAll(a.fd, 0, 100), data.substr(0, 100));
  EXPECT_EQ(blob->GetStatus().state, BlobState::kVerified);
  EXPECT_EQ(fetcher_.starts(), 0);
}

TEST_F(CacheTest, TakesOverWhenAnotherProcessGoesAway) {
  const std::string data = RandomBytes(2 * kPart, 12);
  const auto where = Where(data);
  { auto c = OpenCache(); }
  UniqueFd other(::open(PartialPath(where.digest).c_str(), O_RDWR | O_CREAT, 0644));
  ASSERT_EQ(::flock(other.get(), LOCK_EX | LOCK_NB), 0);
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  Answer a;
  blob->WhenReadable(kPart, 100, a.Fn());
  other.Reset();  // died without committing
  ASSERT_TRUE(WaitFor([&] { return !fetcher_.demands(where.digest).empty(); }));
  EXPECT_EQ(fetcher_.starts(), 1);
  EXPECT_EQ(fetcher_.demands(where.digest), (std::vector<ByteRange>{{kPart, kPart + 100}}));
  ASSERT_TRUE(WritePart(data, where.digest, 1).ok());
  ASSERT_TRUE(a.Called());
  EXPECT_TRUE(a.status.ok());
}

// Needs root (or CAP_SYS_ADMIN) for a small tmpfs; skipped otherwise.
TEST_F(CacheTest, DiskFullPausesAndResumes) {
  const fs::path mnt = root_ / "small";
  fs::create_directory(mnt);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=1m") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here: " << strerror(errno);
  }
  struct Unmount {
    fs::path p;
    ~Unmount() { ::umount2(p.c_str(), MNT_DETACH); }
  } unmount{mnt};
  dir_ = mnt / "c";
  const std::string data = RandomBytes(8 * kPart, 19);  // 512 KiB
  const auto where = Where(data);
  auto cache = OpenCache();
  auto blob = Open(cache.get(), where);
  blob->Materialize();
  {
    UniqueFd filler(::open((mnt / "filler").c_str(), O_WRONLY | O_CREAT, 0644));
    const std::string junk(640 << 10, 'j');
    ASSERT_TRUE(PwriteFull(filler.get(), junk.data(), junk.size(), 0).ok());
  }
  int failed_at = -1;
  for (int p = 0; p < 8; ++p) {
    Status st = WritePart(data, where.digest, p);
    if (!st.ok()) {
      EXPECT_EQ(st.code(), Code::kResourceExhausted) << st.ToString();
      failed_at = p;
      break;
    }
  }
  ASSERT_GE(failed_at, 0) << "the disk never filled";
  EXPECT_EQ(blob->GetStatus().bytes_present, failed_at * kPart) << "a failed write is not present";
  EXPECT_EQ(blob->GetStatus().condition, "paused: cache disk full");
  fs::remove(mnt / "filler");
  for (int p = failed_at; p < 8; ++p) ASSERT_TRUE(WritePart(data, where.digest, p).ok());
  EXPECT_EQ(blob->GetStatus().condition, "");
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  EXPECT_EQ(ReadAll(BlobPath(where.digest)), data);
}

// ---------------------------------------------------------------------------------------------
// --cache-max

TEST_F(CacheTest, CacheMaxEvictsLeastRecentlyUsedClosedBlobs) {
  { auto c = OpenCache(); }
  // Four complete 1000-byte blobs, last used at t = 100, 200, 300, 400.
  std::vector<std::string> datas;
  for (int i = 0; i < 4; ++i) {
    datas.push_back(RandomBytes(1000, 30 + i));
    const fs::path p = BlobPath(Sha256::Of(datas[i]));
    UniqueFd fd(::open(p.c_str(), O_WRONLY | O_CREAT, 0644));
    ASSERT_TRUE(PwriteFull(fd.get(), datas[i].data(), 1000, 0).ok());
    const struct timespec t[2] = {{100 * (i + 1), 0}, {100 * (i + 1), 0}};
    ASSERT_EQ(::futimens(fd.get(), t), 0);
  }
  CacheOptions opt;
  opt.max_bytes = 3000;
  auto cache = OpenCache(opt);
  // Blob 0 is the oldest but open: it stays. Opening it counts as a use, though the eviction
  // pass this open queues must already find it locked.
  auto open0 = Open(cache.get(), Where(datas[0]));
  // A new partial of 1000 bytes: 5000 in all, so two closed blobs must go (1 and 2, the LRU).
  const std::string fresh = RandomBytes(1000, 40);
  auto blob = Open(cache.get(), Where(fresh));
  Impl(blob)->SyncWorkerForTest();
  EXPECT_TRUE(fs::exists(BlobPath(Sha256::Of(datas[0])))) << "open blobs are never evicted";
  EXPECT_FALSE(fs::exists(BlobPath(Sha256::Of(datas[1]))));
  EXPECT_FALSE(fs::exists(BlobPath(Sha256::Of(datas[2]))));
  EXPECT_TRUE(fs::exists(BlobPath(Sha256::Of(datas[3]))));
  EXPECT_TRUE(fs::exists(PartialPath(Sha256::Of(fresh)))) << "partials are never evicted";
  // Committing the new blob and closing blob 0: blob 0 (used longest ago) goes next.
  blob->Materialize();
  ASSERT_TRUE(fetcher_.Write(Sha256::Of(fresh), 0, fresh).ok());
  ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; }));
  Impl(blob)->SyncWorkerForTest();
  EXPECT_TRUE(fs::exists(BlobPath(Sha256::Of(datas[0]))));
  open0.reset();
  // The last close marked it used now, so blob 3 is the least recently used one when another
  // new partial needs room.
  auto again = Open(cache.get(), Where(RandomBytes(1000, 41)));
  Impl(again)->SyncWorkerForTest();
  EXPECT_TRUE(fs::exists(BlobPath(Sha256::Of(datas[0]))));
  EXPECT_TRUE(fs::exists(BlobPath(Sha256::Of(fresh))));
  EXPECT_FALSE(fs::exists(BlobPath(Sha256::Of(datas[3]))));
}

// ---------------------------------------------------------------------------------------------
// Symlinks and odd files are refused, never followed

TEST_F(CacheTest, RefusesSymlinkedCacheDirAndSubdirs) {
  fs::create_directory(root_ / "elsewhere");
  fs::create_directory_symlink(root_ / "elsewhere", root_ / "link");
  EXPECT_EQ(Cache::Open(root_ / "link", &fetcher_, {}).status().code(), Code::kFailedPrecondition);
  fs::create_directory(root_ / "c2");
  fs::create_directory_symlink(root_ / "elsewhere", root_ / "c2" / "partial");
  EXPECT_EQ(Cache::Open(root_ / "c2", &fetcher_, {}).status().code(), Code::kFailedPrecondition);
  fs::create_directory(root_ / "c3");
  { UniqueFd f(::open((root_ / "c3" / "blobs").c_str(), O_WRONLY | O_CREAT, 0644)); }
  EXPECT_FALSE(Cache::Open(root_ / "c3", &fetcher_, {}).ok());
  EXPECT_TRUE(fs::is_empty(root_ / "elsewhere"));
}

TEST_F(CacheTest, RefusesSymlinkedBlobFiles) {
  const std::string data = RandomBytes(1000, 13);
  const auto where = Where(data);
  auto cache = OpenCache();
  const fs::path victim = root_ / "victim";
  { UniqueFd f(::open(victim.c_str(), O_WRONLY | O_CREAT, 0644)); }
  fs::create_symlink(victim, PartialPath(where.digest));
  auto b = cache->OpenBlob(where);
  EXPECT_EQ(b.status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(fs::file_size(victim), 0u) << "the symlink target was not truncated";
  fs::remove(PartialPath(where.digest));
  fs::create_symlink(victim, BlobPath(where.digest));
  EXPECT_EQ(cache->OpenBlob(where).status().code(), Code::kFailedPrecondition);
  EXPECT_FALSE(cache->HasBlob(where.digest));
}

// ---------------------------------------------------------------------------------------------
// Manifests

TEST_F(CacheTest, ManifestsRoundTrip) {
  auto cache = OpenCache();
  ASSERT_TRUE(cache->PutManifest("registry.ollama.ai/library/llama3.2/latest", "{1}").ok());
  ASSERT_TRUE(cache->PutManifest("registry.ollama.ai/library/llama3.2/1b", "{2}").ok());
  ASSERT_TRUE(cache->PutManifest("registry.ollama.ai/library/llama3.2/latest", "{3}").ok());
  ASSERT_TRUE(cache->PutManifest("127.0.0.1:5000/me/m/v1", "{4}").ok());
  EXPECT_EQ(*cache->GetManifest("registry.ollama.ai/library/llama3.2/latest"), "{3}");
  EXPECT_EQ(cache->GetManifest("registry.ollama.ai/library/llama3.2/nope").status().code(),
            Code::kNotFound);
  EXPECT_EQ(cache->GetManifest("nohost/library/llama3.2/latest").status().code(), Code::kNotFound);
  // Odd things in manifests/ are skipped.
  fs::create_directory_symlink(root_, dir_ / "manifests" / "evil");
  { UniqueFd f(::open((dir_ / "manifests" / "stray").c_str(), O_WRONLY | O_CREAT, 0644)); }
  fs::create_directories(dir_ / "manifests" / "h" / "n" / "m" / "dir-not-file");
  EXPECT_EQ(
      cache->ListManifests(),
      (std::vector<std::string>{"127.0.0.1:5000/me/m/v1", "registry.ollama.ai/library/llama3.2/1b",
                                "registry.ollama.ai/library/llama3.2/latest"}));
}

TEST_F(CacheTest, BadManifestKeysAreRejected) {
  auto cache = OpenCache();
  for (const std::string& key : std::vector<std::string>{
           "", "a/b/c", "a/b/c/d/e", "a/../c/d", "a/b/./d", "a//c/d", "/b/c/d", "a/b/c/",
           "a/b/c/..", std::string("a/b\0x/c/d", 9), "a/b/c/" + std::string(256, 't')}) {
    EXPECT_EQ(cache->PutManifest(key, "x").code(), Code::kInvalidArgument) << key;
    EXPECT_EQ(cache->GetManifest(key).status().code(), Code::kInvalidArgument) << key;
  }
  EXPECT_TRUE(cache->PutManifest("a/b/c/" + std::string(255, 't'), "x").ok());
  EXPECT_TRUE(fs::is_empty(root_ / "c" / "blobs"));
}

}  // namespace
}  // namespace modelfs::cache

namespace modelfs::cache {
namespace {

// Manual: --gtest_also_run_disabled_tests. Does the hasher keep up with a fast download?
TEST_F(CacheTest, DISABLED_HashThroughput) {
  for (uint64_t piece : {uint64_t{0}, uint64_t{64} << 20}) {
    const std::string data = RandomBytes(512 << 20, 17);
    const auto where = Where(data);
    dir_ = root_ / ("piece" + std::to_string(piece));
    CacheOptions opt;
    opt.piece_size = piece;
    auto cache = OpenCache(opt);
    auto blob = Open(cache.get(), where);
    blob->Materialize();
    auto t0 = std::chrono::steady_clock::now();
    for (uint64_t off = 0; off < data.size(); off += 1 << 20) {
      ASSERT_TRUE(
          fetcher_.Write(where.digest, off, std::string_view(data).substr(off, 1 << 20)).ok());
    }
    auto t1 = std::chrono::steady_clock::now();
    ASSERT_TRUE(WaitFor([&] { return blob->GetStatus().state == BlobState::kVerified; },
                        std::chrono::milliseconds(120000)));
    auto t2 = std::chrono::steady_clock::now();
    auto ms = [](auto d) {
      return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
    };
    printf("piece_size=%llu: 512 MiB written in %lld ms, verified+committed %lld ms later\n",
           static_cast<unsigned long long>(piece), static_cast<long long>(ms(t1 - t0)),
           static_cast<long long>(ms(t2 - t1)));
  }
}

}  // namespace
}  // namespace modelfs::cache
