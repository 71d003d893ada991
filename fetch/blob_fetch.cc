#include "fetch/blob_fetch.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <random>

#include "base/log.h"
#include "base/metrics.h"
#include "fetch/content_range.h"
#include "fetch/url.h"

namespace modelfs::fetch {
namespace {

// An attempt that wrote at least this much restarts the try count: a long download over a
// flaky link must not die of many unrelated, individually recovered errors.
constexpr uint64_t kProgressResetBytes = 64 << 10;
constexpr size_t kRateWindow = 30;
constexpr size_t kMinFinishedRates = 5;
constexpr size_t kMinInFlightRates = 3;
constexpr uint64_t kMinRateSampleBytes = 64 << 10;
constexpr double kMinRateSeconds = 0.2;          // younger attempts have no meaningful rate
constexpr uint64_t kSplitGranule = 64 << 10;     // split points land on 64 KiB boundaries
constexpr double kMinSplitGainSeconds = 1.0;     // no tail split for a part finishing sooner
constexpr double kCrawlFraction = 0.25;          // below this share of the median, a part crawls
constexpr int kMaxBadResponseTries = 3;

enum class PartAbort {
  kNone,
  kReachedEnd,   // wrote up to the part's (possibly shortened) end
  kBadResponse,  // 206 with a Content-Range other than asked, empty 2xx body, …
  kHttpStatus,   // a non-2xx status
  kFallback200,  // 200 to a range request: the server ignores Range
  kSinkFull,     // Sink::Write said kResourceExhausted
  kSinkError,    // Sink::Write failed otherwise
  kOverflow,     // more body bytes than the range asked for
};

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double Jitter() {
  thread_local std::mt19937 rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.5, 1.0)(rng);
}

// The first piece of [r.begin, r.end) that is in `set`.
std::optional<ByteRange> FirstIn(const RangeSet& set, ByteRange r) {
  uint64_t cur = r.begin;
  for (const auto& gap : set.Missing(r.begin, r.end)) {
    if (gap.begin > cur) return ByteRange{cur, gap.begin};
    cur = gap.end;
  }
  if (cur < r.end) return ByteRange{cur, r.end};
  return std::nullopt;
}

std::string Bytes(uint64_t b, uint64_t e) {
  return "bytes " + std::to_string(b) + "-" + std::to_string(e == 0 ? 0 : e - 1);
}

}  // namespace

class PartTransfer : public Transfer {
 public:
  PartTransfer(BlobFetch* f, uint64_t part_id) : fetch(f), part_id(part_id) {}
  size_t OnHeader(const char* data, size_t n) override {
    return fetch->OnPartHeader(this, data, n);
  }
  size_t OnBody(const char* data, size_t n) override { return fetch->OnPartBody(this, data, n); }
  void OnDone(CURLcode rc, bool cancelled) override { fetch->OnPartDone(this, rc, cancelled); }

  BlobFetch* const fetch;
  const uint64_t part_id;
  uint64_t req_begin = 0, req_end = 0;  // what this attempt asked for
  long status = 0;
  std::string content_range;
  std::string retry_after;
  bool validated = false;
  uint64_t pos = 0;  // blob offset of the next body byte
  PartAbort abort = PartAbort::kNone;
  Status sink_error;
  std::string detail;
};

struct BlobFetch::Part {
  uint64_t id = 0;
  uint64_t next = 0;  // first unwritten byte
  uint64_t end = 0;   // exclusive; only ever shrinks (splits)
  bool demand = false;
  bool stream = false;  // fallback: whole blob from 0, writes only stream_need_
  int tries = 0;
  int slow_refetches = 0;
  int reresolves = 0;
  bool fresh = false;  // next attempt on a new connection
  PartTransfer* xfer = nullptr;
  CurlLoop::TimerId timer = 0;
  Clock::time_point attempt_start, last_byte;
  uint64_t attempt_bytes = 0;  // written (ranged) or received (stream) in this attempt
  uint64_t url_gen = 0;
  bool url_cdn = false;
  bool url_mirror = false;
  bool url_ranged = true;
  size_t url_source = 0;
  std::string url;
  std::string url_registry;
  std::string auth_sent;
};

BlobFetch::BlobFetch(BlobFetchHost* host, BlobLocation where, FetchOptions options, Sink* sink)
    : host_(host), where_(std::move(where)), opts_(options), sink_(sink) {}

BlobFetch::~BlobFetch() = default;

FetchStats BlobFetch::Stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

std::string BlobFetch::Describe(const Part* p) const {
  return "blob " + where_.digest.Short() + " " + Bytes(p->next, p->end);
}

double BlobFetch::Backoff(int tries) const {
  double d = opts_.retry_base_delay_s * std::pow(2.0, std::max(0, tries - 1));
  return std::min(d, opts_.retry_max_delay_s) * Jitter();
}

// ---- Entry points -------------------------------------------------------------------------

void BlobFetch::Begin(std::vector<ByteRange> wanted) {
  for (const auto& r : wanted) {
    uint64_t e = std::min(r.end, where_.size);
    if (r.begin < e) todo_bg_.Add(r.begin, e);
  }
  Schedule();
}

void BlobFetch::Demand(uint64_t offset, uint64_t len) {
  if (cancelled_ || len == 0 || offset >= where_.size) return;
  uint64_t end = std::min(where_.size, offset + std::min(len, where_.size - offset));
  if (opts_.align_bytes > 0) {  // whole aligned blocks, so range caches see the same ranges
    offset = AlignDown(offset);
    end = std::min(where_.size, AlignDown(end + opts_.align_bytes - 1));
  }
  failed_ = false;  // a new request after a failure tries again
  if (stream_mode_) {
    for (const auto& m : written_.Missing(offset, end)) stream_need_.Add(m);
    bool have_stream = false;
    for (auto& [id, p] : parts_) have_stream |= p->stream;
    if (!have_stream && !stream_need_.empty()) {
      host_->AcquireSlot();
      StartAttempt(NewPart(0, where_.size, true, true));
    }
    return;
  }
  // The first part_size missing bytes are urgent (a reader waits on them): they jump the queue,
  // newest demand first. The rest, e.g. a "now fetch everything" demand, joins the background
  // queue so it cannot hold the reserved demand slots against later readers.
  uint64_t budget = std::max<uint64_t>(1, opts_.part_size);
  std::vector<ByteRange> urgent;
  for (const auto& m : written_.Missing(offset, end)) {
    uint64_t u = std::min(m.end, m.begin + budget);
    if (opts_.align_bytes > 0 && u < m.end) {  // m.begin may be an in-flight part's next byte
      uint64_t down = AlignDown(u);
      u = down > m.begin ? down : std::min(m.end, AlignDown(m.begin) + opts_.align_bytes);
    }
    if (u > m.begin) {
      budget -= std::min(budget, u - m.begin);
      SplitForDemand(m.begin, u);
      Takeover(m.begin, u, true);
      urgent.push_back({m.begin, u});
    }
    if (u < m.end) Takeover(u, m.end, false);
  }
  for (auto it = urgent.rbegin(); it != urgent.rend(); ++it) demand_order_.push_front(*it);
  if (demand_order_.size() > 4096) {  // drop entries already taken by parts
    std::erase_if(demand_order_, [&](ByteRange r) { return !FirstIn(todo_demand_, r); });
  }
  Schedule();
}

std::optional<ByteRange> BlobFetch::NextDemand() {
  while (!demand_order_.empty()) {
    auto piece = FirstIn(todo_demand_, demand_order_.front());
    if (piece) return piece;
    demand_order_.pop_front();
  }
  if (!todo_demand_.empty()) return todo_demand_.Ranges().front();
  return std::nullopt;
}

void BlobFetch::Refetch(uint64_t offset, uint64_t len) {
  if (cancelled_ || len == 0 || offset >= where_.size) return;
  uint64_t end = std::min(where_.size, offset + std::min(len, where_.size - offset));
  written_.Remove(offset, end);
  // Bytes that failed verification: a mirror that may have served them is suspect, so
  // everything from now on comes from the origin.
  source_floor_ = SIZE_MAX;
  if (url_mirror_) {
    url_.clear();
    warming_ = false;
  }
  Demand(offset, end - offset);
}

void BlobFetch::Cancel() {
  if (cancelled_) return;
  cancelled_ = true;
  std::vector<Part*> all;
  for (auto& [id, p] : parts_) all.push_back(p.get());
  for (Part* p : all) RemovePart(p);
  if (tick_timer_) host_->loop()->CancelTimer(tick_timer_);
  if (resolve_timer_) host_->loop()->CancelTimer(resolve_timer_);
  tick_timer_ = resolve_timer_ = 0;
}

void BlobFetch::Shutdown() {
  bool pending = !parts_.empty() || !todo_bg_.empty() || !todo_demand_.empty() ||
                 (stream_mode_ && !stream_need_.empty());
  bool tell = pending && !failed_ && !cancelled_;
  Cancel();
  if (tell)
    sink_->Failed(Cancelled("fetch of blob " + where_.digest.Short() + " stopped: shutting down"));
}

// Moves bytes of [b, e) that no part is fetching into the demand (or background) queue.
void BlobFetch::Takeover(uint64_t b, uint64_t e, bool demand) {
  RangeSet busy;
  for (auto& [id, p] : parts_) {
    if (!p->stream && p->next < p->end) busy.Add(p->next, p->end);
  }
  // Invariant: todo_bg_ and todo_demand_ are disjoint.
  for (const auto& m : busy.Missing(b, e)) {
    if (demand) {
      todo_bg_.Remove(m.begin, m.end);
      todo_demand_.Add(m);
    } else {
      for (const auto& g : todo_demand_.Missing(m.begin, m.end)) todo_bg_.Add(g);
    }
  }
}

// Demanded bytes that an in-flight part will only reach later get their own part now.
void BlobFetch::SplitForDemand(uint64_t b, uint64_t e) {
  std::vector<Part*> candidates;
  for (auto& [id, p] : parts_) {
    if (!p->stream && p->next < e && p->end > b) candidates.push_back(p.get());
  }
  for (Part* p : candidates) {
    uint64_t s = std::max(b, p->next);  // b is aligned (Demand) whenever a split happens
    if (s - p->next < opts_.min_split_bytes || s >= p->end) continue;  // arrives soon anyway
    if (!host_->TryAcquireSlot(true)) return;
    Part* q = NewPart(s, p->end, true, false);
    p->end = s;  // p's transfer stops writing here
    UpdateStats([](FetchStats& st) { st.splits++; });
    StartAttempt(q);
  }
}

// ---- Scheduling ---------------------------------------------------------------------------

void BlobFetch::Schedule() {
  if (cancelled_ || failed_ || stream_mode_) return;
  while (true) {
    std::optional<ByteRange> next = NextDemand();
    bool demand = next.has_value();
    if (!demand) {
      if (todo_bg_.empty()) break;
      next = todo_bg_.Ranges().front();
    }
    int cap = opts_.concurrency + (demand ? opts_.demand_slots : 0);
    if (static_cast<int>(parts_.size()) >= cap) break;
    if (!host_->TryAcquireSlot(demand)) break;
    ByteRange r = *next;
    uint64_t ps = std::max<uint64_t>(1, opts_.part_size);
    uint64_t e = std::min(r.end, opts_.align_bytes > 0 ? (r.begin / ps + 1) * ps
                                                        : r.begin + (demand ? ps : BackgroundPartSize()));
    (demand ? todo_demand_ : todo_bg_).Remove(r.begin, e);
    StartAttempt(NewPart(r.begin, e, demand, false));
    if (cancelled_ || failed_) return;
  }
  // With work still queued, only crawlers are split (into a reserved slot): their bytes are
  // the ones the cache's hash frontier will wait for, since guided parts land nearly in order.
  const bool crawlers_only = !todo_demand_.empty() || !todo_bg_.empty();
  while (SplitTail(crawlers_only)) {
  }
}

uint64_t BlobFetch::BackgroundPartSize() const {
  const uint64_t ps = std::max<uint64_t>(1, opts_.part_size);
  if (opts_.min_part_size == 0 || opts_.min_part_size >= ps) return ps;
  const uint64_t share = todo_bg_.TotalBytes() / (4 * std::max(1, opts_.concurrency));
  constexpr uint64_t kGrain = 1 << 20;  // whole MiBs: tidy ranges, page-aligned writes
  return std::clamp((share + kGrain - 1) / kGrain * kGrain, opts_.min_part_size, ps);
}

// No tail: an idle slot takes over the end of the in-flight part expected to finish last. The
// split point shares that part's remaining bytes in proportion to its own rate and the median
// rate, so both halves should land together: a fast part is halved, while a crawling one keeps
// only what it can deliver meanwhile (without this, a 200 KB/s connection holding its last MiB
// sets the blob's finish time).
bool BlobFetch::SplitTail(bool crawlers_only) {
  const int in_flight = static_cast<int>(parts_.size());
  if (in_flight >= opts_.concurrency + opts_.demand_slots) return false;
  const auto now = Clock::now();
  auto rate_of = [&](const Part& p) {
    double secs = Seconds(now - p.attempt_start);
    return secs >= kMinRateSeconds ? static_cast<double>(p.attempt_bytes) / secs : 0.0;
  };
  // The slow-part rule waits out its grace period before it trusts in-flight rates; a split
  // only needs a rough figure, so young parts' rates count here.
  double median = MedianRate();
  if (median <= 0) {
    std::vector<double> rates;
    for (const auto& [id, p] : parts_) {
      if (double r = rate_of(*p); r > 0 && !p->stream) rates.push_back(r);
    }
    if (rates.size() >= 2) {
      std::nth_element(rates.begin(), rates.begin() + rates.size() / 2, rates.end());
      median = rates[rates.size() / 2];
    }
  }
  auto finish_in = [&](const Part& p) {
    double rate = rate_of(p);
    double remaining = static_cast<double>(p.end - p.next);
    return rate > 0 ? remaining / rate : remaining / std::max(median, 1.0);
  };
  auto crawls = [&](const Part& p) {
    const double rate = rate_of(p);
    return rate > 0 && median > 0 && rate < kCrawlFraction * median;
  };
  Part* best = nullptr;
  for (auto& [id, p] : parts_) {
    if (p->stream || !p->xfer || p->end <= p->next) continue;
    if (!crawlers_only) {
      if (!best || finish_in(*p) > finish_in(*best)) best = p.get();
    } else if (crawls(*p) && finish_in(*p) >= kMinSplitGainSeconds &&
               (!best || p->next < best->next)) {
      best = p.get();  // the lowest crawler: the frontier reaches it first
    }
  }
  // A split aborts its part's request at the split point, wasting what is already in flight on
  // that connection (1-2 MiB on a fast link): only worth it when it saves real time.
  if (!best || finish_in(*best) < kMinSplitGainSeconds) return false;
  const double best_rate = rate_of(*best);
  // With every slot busy, only a crawling part is worth a reserved slot: it would otherwise hold
  // its bytes until a slot frees, long after its siblings are done.
  if (in_flight >= opts_.concurrency && !crawls(*best)) return false;
  const uint64_t remaining = best->end - best->next;
  double keep_share = 0.5;
  if (crawls(*best)) {
    // Its rate includes the burst that filled the socket buffers before the server's pacing
    // set in, so it would keep more than it can deliver: keep only up to the next granule.
    keep_share = 0;
  } else if (best_rate > 0 && median > 0) {
    keep_share = best_rate / (best_rate + median);
  }
  // Rounded up to a granule (or to the mirror alignment): rounding down could land at or
  // before the part's next byte, and a crawling part keeps only a few KiB.
  const uint64_t granule = opts_.align_bytes > 0 ? opts_.align_bytes : kSplitGranule;
  uint64_t split = best->next + static_cast<uint64_t>(static_cast<double>(remaining) * keep_share);
  split = (split / granule + 1) * granule;
  const uint64_t min_tail = std::max<uint64_t>(1, opts_.min_split_bytes / 4);
  if (split <= best->next || split >= best->end || best->end - split < min_tail) return false;
  if (!host_->TryAcquireSlot(/*demand=*/in_flight >= opts_.concurrency)) return false;
  LOG(kDebug) << Describe(best) << ": tail split at " << split << " (rate "
              << static_cast<uint64_t>(best_rate) << " B/s, median "
              << static_cast<uint64_t>(median) << " B/s)";
  Part* q = NewPart(split, best->end, best->demand, false);
  best->end = split;
  UpdateStats([](FetchStats& st) { st.splits++; });
  StartAttempt(q);
  return !cancelled_ && !failed_;
}

BlobFetch::Part* BlobFetch::NewPart(uint64_t begin, uint64_t end, bool demand, bool stream) {
  auto p = std::make_unique<Part>();
  p->id = next_part_id_++;
  p->next = begin;
  p->end = end;
  p->demand = demand;
  p->stream = stream;
  Part* raw = p.get();
  parts_[raw->id] = std::move(p);
  size_t n = parts_.size();
  UpdateStats([n](FetchStats& st) { st.parts_in_flight = static_cast<int>(n); });
  return raw;
}

void BlobFetch::RemovePart(Part* p) {
  StopTransfer(p);
  if (p->timer) host_->loop()->CancelTimer(p->timer);
  std::erase(waiting_for_url_, p->id);
  parts_.erase(p->id);
  size_t n = parts_.size();
  UpdateStats([n](FetchStats& st) { st.parts_in_flight = static_cast<int>(n); });
  host_->ReleaseSlot();
  host_->RequestSchedule();
}

void BlobFetch::StopTransfer(Part* p) {
  if (p->xfer) {
    PartTransfer* t = p->xfer;
    p->xfer = nullptr;
    host_->loop()->Remove(t);
  }
}

// ---- Attempts -----------------------------------------------------------------------------

void BlobFetch::StartAttempt(Part* p) {
  if (cancelled_ || failed_) return;
  p->timer = 0;
  if (!p->stream && p->next >= p->end) {
    RemovePart(p);
    return;
  }
  if (url_.empty()) {
    NeedResolve(p, false);
    return;
  }
  auto t = std::make_unique<PartTransfer>(this, p->id);
  if (!t->ok()) {
    Fail(Internal("curl_easy_init failed"));
    return;
  }
  ConfigureEasy(t->easy(), host_->transport(), url_, /*follow=*/true);
  p->url = url_;
  p->url_cdn = url_cdn_;
  p->url_gen = url_gen_;
  p->url_registry = url_registry_;
  p->url_mirror = url_mirror_;
  p->url_ranged = url_ranged_;
  p->url_source = url_source_;
  p->auth_sent.clear();
  if (p->stream) {
    t->req_begin = 0;
    t->req_end = where_.size;
  } else {
    // Aligned mode resumes from the grid too (re-receiving < align_bytes, skipped below), so a
    // range cache in front sees the same ranges from every node.
    t->req_begin = AlignDown(p->next);
    t->req_end = p->end;
    t->AddHeader("Range: bytes=" + std::to_string(t->req_begin) + "-" +
                 std::to_string(p->end - 1));
  }
  if (!url_cdn_) {
    // Registry-served blob: it needs our Authorization. Never sent to another host (curl drops
    // custom Authorization on cross-host redirects, and CDN URLs get none).
    p->auth_sent = host_->AuthHeader(url_registry_, where_.repository);
    if (!p->auth_sent.empty()) t->AddHeader(p->auth_sent);
  }
  if (p->fresh) {
    curl_easy_setopt(t->easy(), CURLOPT_FRESH_CONNECT, 1L);
    curl_easy_setopt(t->easy(), CURLOPT_FORBID_REUSE, 1L);
    p->fresh = false;
  }
  curl_easy_setopt(t->easy(), CURLOPT_BUFFERSIZE, 256L << 10);
  p->attempt_start = p->last_byte = Clock::now();
  p->attempt_bytes = 0;
  p->xfer = t.get();
  uint64_t asked = t->req_end - t->req_begin;
  UpdateStats([asked](FetchStats& st) { st.bytes_requested += asked; });
  EnsureTick();
  host_->loop()->Add(std::move(t));  // may complete (cancelled) at once during shutdown
}

void BlobFetch::CountRetry(const char* cause, const std::string& why) {
  UpdateStats([&](FetchStats& st) {
    st.retries++;
    st.retries_by_cause[cause]++;
    st.last_error = why;
  });
}

void BlobFetch::RetryLater(Part* p, double delay_s, std::string why, const char* cause) {
  CountRetry(cause, why);
  LOG(kDebug) << Describe(p) << ": " << why << "; retrying in " << delay_s << " s";
  std::weak_ptr<BlobFetch> w = weak_from_this();
  uint64_t id = p->id;
  p->timer = host_->loop()->AddTimer(delay_s, [w, id] {
    auto self = w.lock();
    if (!self || self->cancelled_) return;
    auto it = self->parts_.find(id);
    if (it == self->parts_.end()) return;
    it->second->timer = 0;
    self->StartAttempt(it->second.get());
  });
}

void BlobFetch::HandleFailure(Part* p, std::string why, bool progressed, const char* cause) {
  if (progressed) p->tries = 0;
  p->tries++;
  if (p->url_mirror && p->tries >= opts_.mirror_max_tries) {
    NextSource(p, why, /*unhealthy=*/true);
    return;
  }
  // A server that answers with the wrong range or too many bytes is broken, not flaky: a few
  // tries tell a glitch from a habit without making the reader wait out the full backoff.
  const int max_tries =
      std::string_view(cause) == "bad_response" ? std::min(opts_.max_tries, kMaxBadResponseTries)
                                                : opts_.max_tries;
  if (p->tries >= max_tries) {
    Fail(Unavailable("giving up on " + Describe(p) + " after " + std::to_string(p->tries) +
                     " tries: " + why));
    return;
  }
  // Resume at once after a body that broke off; back off when the server gave nothing.
  double delay = p->attempt_bytes > 0 ? 0 : Backoff(p->tries);
  RetryLater(p, delay, std::move(why), cause);
}

// ---- URL resolution -----------------------------------------------------------------------

void BlobFetch::NeedResolve(Part* p, bool reresolve) {
  if (reresolve && p->url_gen == url_gen_) url_.clear();  // the URL that failed is current
  if (!url_.empty()) {                                    // someone resolved a newer URL meanwhile
    StartAttempt(p);
    return;
  }
  if (std::find(waiting_for_url_.begin(), waiting_for_url_.end(), p->id) ==
      waiting_for_url_.end()) {
    waiting_for_url_.push_back(p->id);
  }
  if (!resolving_ && !resolve_timer_) StartResolve();
}

void BlobFetch::StartResolve() {
  resolving_ = true;
  std::weak_ptr<BlobFetch> w = weak_from_this();
  host_->ResolveFrom(where_, source_floor_, [w](StatusOr<ResolvedUrl> r) {
    if (auto self = w.lock()) self->OnResolved(std::move(r));
  });
}

void BlobFetch::OnResolved(StatusOr<ResolvedUrl> r) {
  resolving_ = false;
  if (cancelled_) return;
  if (!r.ok()) {
    if (r.status().code() == Code::kCancelled) return;
    if (failed_) return;
    if (r.status().code() == Code::kUnavailable && ++resolve_tries_ < opts_.max_tries) {
      std::string why = r.status().message();
      CountRetry("resolve", why);
      std::weak_ptr<BlobFetch> w = weak_from_this();
      resolve_timer_ = host_->loop()->AddTimer(Backoff(resolve_tries_), [w] {
        auto self = w.lock();
        if (!self || self->cancelled_) return;
        self->resolve_timer_ = 0;
        self->StartResolve();
      });
      return;
    }
    resolve_tries_ = 0;
    Fail(r.status());
    return;
  }
  resolve_tries_ = 0;
  if (r->mirror && r->source < source_floor_) {  // a Refetch/NextSource moved on meanwhile
    StartResolve();
    return;
  }
  if (r->mirror && !r->ranged) {
    // A pull-through cache answers 200 (streaming from upstream) until it holds the blob, then
    // 206. Streaming from it now would pull the blob upstream once per node: wait instead.
    auto now = Clock::now();
    if (!warming_) {
      warming_ = true;
      warm_start_ = now;
      warm_polls_ = 0;
      LOG(kInfo) << "blob " << where_.digest.Short() << ": mirror " << RedactUrl(r->registry)
                 << " is still pulling it (no Range support yet); waiting for it";
    }
    double limit = opts_.mirror_warm_wait_s + static_cast<double>(where_.size) / 50e6;
    if (Seconds(now - warm_start_) < limit) {
      // Few polls: distribution 2.8 pings upstream between its "do I have it" check and its
      // "is it being pulled" check, and a poll landing there as the pull completes starts a
      // second pull.
      double delay = std::min(5.0, std::pow(2.0, warm_polls_++));
      std::weak_ptr<BlobFetch> w = weak_from_this();
      resolve_timer_ = host_->loop()->AddTimer(delay, [w] {
        auto self = w.lock();
        if (!self || self->cancelled_) return;
        self->resolve_timer_ = 0;
        if (!self->waiting_for_url_.empty() || self->url_.empty()) self->StartResolve();
      });
      return;
    }
    LOG(kWarn) << "blob " << where_.digest.Short() << ": mirror " << RedactUrl(r->registry)
               << " still ignores Range after " << static_cast<int>(limit)
               << " s; streaming from it";
  }
  warming_ = false;
  url_ = r->url;
  url_cdn_ = r->cdn;
  url_registry_ = r->registry.empty() ? where_.registry : r->registry;
  url_source_ = r->source;
  url_mirror_ = r->mirror;
  url_ranged_ = r->ranged;
  url_gen_++;
  LOG(kDebug) << "blob " << where_.digest.Short() << " served from " << RedactUrl(url_);
  std::vector<uint64_t> ids;
  ids.swap(waiting_for_url_);
  for (uint64_t id : ids) {
    auto it = parts_.find(id);
    if (it != parts_.end() && !it->second->xfer && !it->second->timer) {
      StartAttempt(it->second.get());
    }
    if (cancelled_ || failed_) return;
  }
}

// ---- Transfer callbacks -------------------------------------------------------------------

size_t BlobFetch::OnPartHeader(PartTransfer* t, const char* data, size_t n) {
  auto it = parts_.find(t->part_id);
  if (it == parts_.end() || it->second->xfer != t) return 0;
  it->second->last_byte = Clock::now();
  if (long code = StatusLineCode(data, n)) {
    t->status = code;  // a new response in a redirect chain: forget the previous headers
    t->content_range.clear();
    t->retry_after.clear();
    return n;
  }
  std::string v;
  if (HeaderValue(data, n, "content-range", &v))
    t->content_range = v;
  else if (HeaderValue(data, n, "retry-after", &v))
    t->retry_after = v;
  return n;
}

bool BlobFetch::WriteToSink(Part* p, PartTransfer* t, uint64_t offset, const char* data,
                            size_t len) {
  Status s = sink_->Write(offset, data, len);
  if (!s.ok()) {
    t->abort = s.code() == Code::kResourceExhausted ? PartAbort::kSinkFull : PartAbort::kSinkError;
    t->sink_error = s;
    return false;
  }
  written_.Add(offset, offset + len);
  wrote_from_mirror_ |= p->url_mirror;
  if (!p->stream) p->next = offset + len;
  p->attempt_bytes += len;
  UpdateStats([len](FetchStats& st) { st.bytes_written += len; });
  metrics::FetchBytes(p->url_mirror ? "mirror" : p->url_cdn ? "cdn" : "origin").Add(len);
  return true;
}

size_t BlobFetch::OnPartBody(PartTransfer* t, const char* data, size_t n) {
  auto it = parts_.find(t->part_id);
  if (it == parts_.end() || it->second->xfer != t) return 0;
  Part* p = it->second.get();
  p->last_byte = Clock::now();
  if (!t->validated) {
    if (p->stream) {
      if (t->status != 200) {
        t->abort = PartAbort::kHttpStatus;
        return 0;
      }
      t->pos = 0;
    } else if (t->status == 206) {
      auto cr = ParseContentRange(t->content_range);
      if (!cr || cr->begin != t->req_begin || cr->end != t->req_end ||
          (cr->total && where_.size > 0 && *cr->total != where_.size)) {
        t->abort = PartAbort::kBadResponse;
        t->detail = "Content-Range \"" + t->content_range + "\" does not match the request for " +
                    Bytes(t->req_begin, t->req_end) + "/" + std::to_string(where_.size);
        return 0;
      }
      t->pos = t->req_begin;
    } else if (t->status == 200 && t->req_begin == 0 && t->req_end == where_.size) {
      t->pos = 0;  // asked for everything; a full 200 is the same bytes
    } else if (t->status == 200) {
      t->abort = PartAbort::kFallback200;
      return 0;
    } else {
      t->abort = PartAbort::kHttpStatus;
      return 0;
    }
    t->validated = true;
  }
  uint64_t pos = t->pos;
  uint64_t stop = pos + n;
  if (p->stream) {
    // Write only bytes still needed; skip the rest.
    for (const auto& r : stream_need_.Ranges()) {
      if (r.end <= pos) continue;
      if (r.begin >= stop) break;
      uint64_t b = std::max(r.begin, pos), e = std::min(r.end, stop);
      if (!WriteToSink(p, t, b, data + (b - pos), e - b)) return 0;
      stream_need_.Remove(b, e);
    }
    t->pos = stop;
    if (stop > where_.size) {
      t->abort = PartAbort::kOverflow;
      return 0;
    }
    if (stream_need_.empty()) {
      t->abort = PartAbort::kReachedEnd;
      return 0;
    }
    return n;
  }
  uint64_t limit = std::min(stop, p->end);
  // pos == p->next: within one request, bytes arrive in order and every one is written. An
  // aligned resume starts before p->next: those bytes are already written, skip them.
  uint64_t from = std::max(pos, p->next);
  if (limit > from) {
    if (!WriteToSink(p, t, from, data + (from - pos), limit - from)) return 0;
  }
  t->pos = stop;
  if (stop > t->req_end) {
    t->abort = PartAbort::kOverflow;  // never written: limit <= end <= req_end
    return 0;
  }
  if (p->next >= p->end && p->end < t->req_end) {
    t->abort = PartAbort::kReachedEnd;  // split: the rest belongs to another part
    return 0;
  }
  return n;
}

void BlobFetch::OnPartDone(PartTransfer* t, CURLcode rc, bool cancelled) {
  auto it = parts_.find(t->part_id);
  if (it == parts_.end() || it->second->xfer != t) return;
  Part* p = it->second.get();
  p->xfer = nullptr;
  if (cancelled || cancelled_) {
    // Shutdown: hand the bytes back so Shutdown() knows work was pending.
    if (!p->stream && p->next < p->end) todo_bg_.Add(p->next, p->end);
    RemovePart(p);
    return;
  }
  bool progressed = p->attempt_bytes >= kProgressResetBytes;
  bool done = p->stream ? stream_need_.empty() : p->next >= p->end;
  if (done) {
    double secs = Seconds(Clock::now() - p->attempt_start);
    if (!p->stream && p->attempt_bytes >= kMinRateSampleBytes && secs > 0) {
      finished_rates_.push_back(static_cast<double>(p->attempt_bytes) / secs);
      if (finished_rates_.size() > kRateWindow) finished_rates_.pop_front();
    }
    if (t->abort == PartAbort::kOverflow) {
      LOG(kWarn) << "blob " << where_.digest.Short() << ": " << RedactUrl(p->url)
                 << " sent more bytes than asked; extra bytes ignored";
    }
    RemovePart(p);
    if (wrote_from_mirror_ && !reported_mirror_complete_ && written_.Contains(0, where_.size)) {
      reported_mirror_complete_ = true;
      host_->MirrorCompleted(where_);
    }
    Schedule();
    return;
  }
  std::string where = " from " + RedactUrl(p->url);
  switch (t->abort) {
    case PartAbort::kFallback200:
      if (p->url_mirror && p->url_ranged) {
        MirrorWarming(p);  // it said 206 before: it is (again) pulling from upstream
        return;
      }
      EnterStreamMode();
      return;
    case PartAbort::kSinkFull:
      LOG(kWarn) << Describe(p) << ": " << t->sink_error.message() << "; retrying in "
                 << opts_.disk_full_retry_s << " s";
      p->fresh = false;
      {
        std::weak_ptr<BlobFetch> w = weak_from_this();
        uint64_t id = p->id;
        p->timer = host_->loop()->AddTimer(opts_.disk_full_retry_s, [w, id] {
          auto self = w.lock();
          if (!self || self->cancelled_) return;
          auto it2 = self->parts_.find(id);
          if (it2 != self->parts_.end()) self->StartAttempt(it2->second.get());
        });
      }
      return;
    case PartAbort::kSinkError:
      Fail(t->sink_error);
      return;
    case PartAbort::kBadResponse:
      HandleFailure(p, t->detail + where, progressed, "bad_response");
      return;
    case PartAbort::kOverflow:
      HandleFailure(p, "server sent more bytes than asked" + where, progressed, "bad_response");
      return;
    case PartAbort::kReachedEnd:
      if (p->stream) {  // stream_need_ grew behind us: start over from 0
        StartAttempt(p);
        return;
      }
      break;
    case PartAbort::kHttpStatus:
    case PartAbort::kNone:
      break;
  }
  long status = t->status;
  if (t->abort == PartAbort::kNone && rc == CURLE_OK && !t->validated) {
    if (status >= 200 && status < 300) {
      HandleFailure(p, "HTTP " + std::to_string(status) + " with an empty body" + where,
                    progressed, "bad_response");
      return;
    }
  } else if (t->abort == PartAbort::kNone) {
    if (rc == CURLE_OK) {
      if (p->stream) {
        // Reached the end of the blob but bytes behind us were demanded meanwhile.
        StartAttempt(p);
        return;
      }
      HandleFailure(p, "body ended early at byte " + std::to_string(p->next) + where, progressed,
                    "short_body");
    } else {
      HandleFailure(p, CurlStatus(rc, t->error_buffer(), RedactUrl(p->url)).message(), progressed,
                    "connection");
    }
    return;
  }
  // An HTTP error status.
  std::string what = "HTTP " + std::to_string(status) + where;
  bool refused_url =
      status == 401 || ((status == 403 || status == 404 || status == 410) && p->url_cdn);
  if (p->url_mirror && !p->url_cdn && (status == 404 || status == 410 || status == 403)) {
    NextSource(p, what, /*unhealthy=*/false);  // the mirror lacks it (or refuses): next source
    return;
  }
  if (refused_url) {
    if (status == 401 && !p->url_cdn) {
      host_->InvalidateAuth(p->url_registry, where_.repository, p->auth_sent);
    }
    if (p->reresolves < opts_.max_reresolves) {
      p->reresolves++;
      CountRetry("url_refused", what);
      LOG(kInfo) << Describe(p) << ": " << what << "; resolving the blob URL again";
      NeedResolve(p, true);
      return;
    }
  }
  if (p->url_mirror && (status == 429 || status == 503) &&
      p->tries + 1 >= opts_.mirror_max_tries) {
    NextSource(p, what, /*unhealthy=*/true);
    return;
  }
  if (status == 429 || status == 503) {
    double ra = ParseRetryAfter(t->retry_after);
    p->tries++;
    if (p->tries >= opts_.max_tries) {
      Fail(Unavailable("giving up on " + Describe(p) + " after " + std::to_string(p->tries) +
                       " tries: " + what));
      return;
    }
    RetryLater(p, ra >= 0 ? std::min(ra, opts_.max_retry_after_s) : Backoff(p->tries), what,
               "throttled");
    return;
  }
  if (status >= 500 || status == 408) {
    HandleFailure(p, what, progressed, "http_5xx");
    return;
  }
  if (p->url_mirror) {  // a mirror refusing or lacking the blob: the next source may have it
    NextSource(p, what, /*unhealthy=*/false);
    return;
  }
  std::string msg = "fetching " + Describe(p) + ": " + what;
  if (status == 401)
    Fail(Unauthenticated(msg));
  else if (status == 403)
    Fail(PermissionDenied(msg));
  else if (status == 404 || status == 410)
    Fail(NotFound(msg));
  else
    Fail(Unavailable(msg));
}

// A part kept failing at a mirror (or the mirror lacks the blob): every part moves on to the
// next source after it. Bytes already written stay written; parts resume at their next byte.
void BlobFetch::NextSource(Part* p, const std::string& why, bool unhealthy) {
  LOG(kInfo) << Describe(p) << ": " << why << "; trying the next source after mirror "
             << RedactUrl(p->url_registry);
  host_->MirrorFailed(p->url_registry, why, unhealthy);
  source_floor_ = std::max(source_floor_, p->url_source + 1);
  if (url_mirror_ && url_source_ < source_floor_) {
    url_.clear();
    warming_ = false;
  }
  p->tries = 0;
  p->fresh = true;
  CountRetry("mirror", why);
  NeedResolve(p, false);
}

// A mirror answered a part's Range with a full 200: it does not hold the blob (any more) and
// streams it from upstream. Wait for it to finish pulling (polled by the resolve).
void BlobFetch::MirrorWarming(Part* p) {
  if (p->url_gen == url_gen_) url_.clear();
  NeedResolve(p, false);
}

uint64_t BlobFetch::AlignDown(uint64_t x) const {
  return opts_.align_bytes > 0 ? x / opts_.align_bytes * opts_.align_bytes : x;
}

void BlobFetch::EnterStreamMode() {
  if (stream_mode_) return;
  LOG(kWarn) << "blob " << where_.digest.Short() << ": server ignores Range requests ("
             << RedactUrl(url_) << "); falling back to a single stream";
  stream_mode_ = true;
  stream_need_ = todo_bg_;
  for (const auto& r : todo_demand_.Ranges()) stream_need_.Add(r);
  todo_bg_.Clear();
  todo_demand_.Clear();
  demand_order_.clear();
  std::vector<Part*> all;
  for (auto& [id, p] : parts_) all.push_back(p.get());
  for (Part* p : all) {
    if (!p->stream && p->next < p->end) stream_need_.Add(p->next, p->end);
    RemovePart(p);
  }
  if (stream_need_.empty()) return;
  host_->AcquireSlot();
  StartAttempt(NewPart(0, where_.size, true, true));
}

void BlobFetch::Fail(const Status& s) {
  if (failed_ || cancelled_) return;
  failed_ = true;
  std::vector<Part*> all;
  for (auto& [id, p] : parts_) all.push_back(p.get());
  for (Part* p : all) RemovePart(p);
  todo_bg_.Clear();
  todo_demand_.Clear();
  demand_order_.clear();
  stream_need_.Clear();
  waiting_for_url_.clear();
  if (resolve_timer_) host_->loop()->CancelTimer(resolve_timer_);
  resolve_timer_ = 0;
  UpdateStats([&](FetchStats& st) { st.last_error = s.ToString(); });
  LOG(kWarn) << "fetch of blob " << where_.digest.Short() << " failed: " << s.ToString();
  sink_->Failed(s);
}

// ---- Stalls and slow parts ----------------------------------------------------------------

void BlobFetch::EnsureTick() {
  if (tick_timer_ || cancelled_) return;
  double interval = std::clamp(std::min(opts_.stall_timeout_s, opts_.slow_grace_s) / 4, 0.01, 0.25);
  std::weak_ptr<BlobFetch> w = weak_from_this();
  tick_timer_ = host_->loop()->AddTimer(interval, [w] {
    if (auto self = w.lock()) {
      self->tick_timer_ = 0;
      self->Tick();
    }
  });
}

double BlobFetch::MedianRate() const {
  std::vector<double> rates(finished_rates_.begin(), finished_rates_.end());
  if (rates.size() < kMinFinishedRates) {
    rates.clear();
    auto now = Clock::now();
    for (const auto& [id, p] : parts_) {
      double secs = Seconds(now - p->attempt_start);
      if (p->xfer && !p->stream && secs >= opts_.slow_grace_s) {
        rates.push_back(static_cast<double>(p->attempt_bytes) / secs);
      }
    }
    if (rates.size() < kMinInFlightRates) return 0;
  }
  std::nth_element(rates.begin(), rates.begin() + rates.size() / 2, rates.end());
  return rates[rates.size() / 2];
}

void BlobFetch::Tick() {
  if (cancelled_ || failed_) return;
  auto now = Clock::now();
  double median = MedianRate();
  std::vector<uint64_t> ids;
  for (auto& [id, p] : parts_) ids.push_back(id);
  for (uint64_t id : ids) {
    auto it = parts_.find(id);
    if (it == parts_.end() || cancelled_ || failed_) continue;
    Part* p = it->second.get();
    if (!p->xfer) continue;
    double idle = Seconds(now - p->last_byte);
    if (idle >= opts_.stall_timeout_s) {
      UpdateStats([](FetchStats& st) { st.stalls++; });
      std::string why = "no data for " +
                        std::to_string(static_cast<int>(idle * 10) / 10.0).substr(0, 4) +
                        " s from " + RedactUrl(p->url);
      LOG(kInfo) << Describe(p) << ": stalled (" << why << "); re-requesting on a new connection";
      bool progressed = p->attempt_bytes >= kProgressResetBytes;
      StopTransfer(p);
      p->fresh = true;
      HandleFailure(p, "stalled: " + why, progressed, "stall");
      continue;
    }
    double secs = Seconds(now - p->attempt_start);
    if (median > 0 && !p->stream && secs >= opts_.slow_grace_s &&
        p->slow_refetches < opts_.max_slow_refetches) {
      double rate = static_cast<double>(p->attempt_bytes) / secs;
      if (rate < opts_.slow_fraction * median) {
        p->slow_refetches++;
        UpdateStats([](FetchStats& st) { st.slow_refetches++; });
        LOG(kInfo) << Describe(p) << ": slow (" << static_cast<uint64_t>(rate) << " B/s vs median "
                   << static_cast<uint64_t>(median) << " B/s); re-requesting on a new connection";
        StopTransfer(p);
        p->fresh = true;
        StartAttempt(p);
      }
    }
  }
  SnapshotParts(now);
  // A part that turned out to crawl after the last completion would otherwise wait for the
  // next event before an idle slot splits it.
  Schedule();
  if (!parts_.empty()) EnsureTick();
}

// Status readers (other threads) see the parts through FetchStats, refreshed every tick.
void BlobFetch::SnapshotParts(Clock::time_point now) {
  std::vector<PartStatus> parts;
  parts.reserve(parts_.size());
  for (const auto& [id, p] : parts_) {
    double secs = Seconds(now - p->attempt_start);
    parts.push_back({p->next, p->end, p->demand,
                     p->xfer && secs > 0 ? static_cast<double>(p->attempt_bytes) / secs : 0,
                     p->tries, p->slow_refetches});
  }
  std::sort(parts.begin(), parts.end(),
            [](const PartStatus& a, const PartStatus& b) { return a.next < b.next; });
  UpdateStats([&](FetchStats& st) { st.parts = std::move(parts); });
}

}  // namespace modelfs::fetch
