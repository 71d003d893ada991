// BlobFetch: one blob's part-parallel range download into a Sink (the engine behind
// RegistryClient::Start). Internal to fetch/.
//
// Threads: everything here runs on the fetch loop thread, except Stats() (any thread, under
// stats_mu_). The public Fetch handle (registry.cc) posts Demand/Refetch to the loop and runs
// Cancel() there synchronously from its destructor, so no Sink call can follow it.
//
// Shape of a fetch: the blob URL is resolved once (registry redirect to a CDN, or the registry
// itself); wanted bytes are cut into parts of part_size (shrinking toward the end with
// min_part_size, so bytes land nearly in order); each part streams Range requests into
// the Sink, resuming from its next unwritten byte after any failure. Demand() bytes jump the
// queue (and may split an in-flight part); idle slots split the largest remaining part (no
// tail); stalled or slow parts are re-requested on a fresh connection.
//
// Sources (mirrors, see fetch/mirrors.h): the URL comes from the first healthy source at or
// after source_floor_. Parts that keep failing at a mirror (or a mirror 404) raise the floor
// past it and re-resolve; Refetch() sets it to the origin. With align_bytes, demand windows,
// split points and resumes fall on the alignment grid and background parts on the part grid.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/range_set.h"
#include "base/status.h"
#include "fetch/curl_loop.h"
#include "fetch/fetcher.h"
#include "fetch/http.h"

namespace modelfs::fetch {

class PartTransfer;

struct ResolvedUrl {
  std::string url;
  bool cdn = false;  // another host: no Authorization is sent there
  // Which source answered (fetch/mirrors.h): its base URL (empty: where.registry), its index
  // in the source order, and whether it is a mirror.
  std::string registry;
  size_t source = 0;
  bool mirror = false;
  bool ranged = true;  // the probe's Range was honoured (206); false: a full 200
};

// What a BlobFetch needs from the client. Loop thread only.
class BlobFetchHost {
 public:
  virtual ~BlobFetchHost() = default;
  virtual CurlLoop* loop() = 0;
  virtual const TransportConfig& transport() = 0;
  // "Authorization: …" for the registry, or "" when none is known yet.
  virtual std::string AuthHeader(const std::string& registry, const std::string& repository) = 0;
  // Forget a token that a server just refused.
  virtual void InvalidateAuth(const std::string& registry, const std::string& repository,
                              const std::string& header) = 0;
  virtual void Resolve(const BlobLocation& where,
                       std::function<void(StatusOr<ResolvedUrl>)> done) = 0;
  // Mirrors (fetch/mirrors.h): resolves at the first healthy source from index `first` on
  // (mirrors in order, then the origin; SIZE_MAX = the origin only). The default has no mirrors.
  virtual void ResolveFrom(const BlobLocation& where, size_t first,
                           std::function<void(StatusOr<ResolvedUrl>)> done) {
    (void)first;
    Resolve(where, std::move(done));
  }
  // Parts kept failing at mirror `registry` (unhealthy: mark it down for a while).
  virtual void MirrorFailed(const std::string& registry, const std::string& why, bool unhealthy) {
    (void)registry, (void)why, (void)unhealthy;
  }
  // Every byte of the blob was written, some of them from a mirror.
  virtual void MirrorCompleted(const BlobLocation& where) { (void)where; }
  // Global connection slots shared by all blobs; demand may dip into a small reserve.
  virtual bool TryAcquireSlot(bool demand) = 0;
  virtual void AcquireSlot() = 0;  // unconditionally (the fallback stream)
  virtual void ReleaseSlot() = 0;
  // Another fetch may use freed slots: schedule every fetch soon (coalesced).
  virtual void RequestSchedule() = 0;
};

class BlobFetch : public std::enable_shared_from_this<BlobFetch> {
 public:
  BlobFetch(BlobFetchHost* host, BlobLocation where, FetchOptions options, Sink* sink);
  ~BlobFetch();

  // Loop thread.
  void Begin(std::vector<ByteRange> wanted);
  void Demand(uint64_t offset, uint64_t len);
  void Refetch(uint64_t offset, uint64_t len);
  // Stops everything; the Sink is never called again.
  void Cancel();
  // Client shutdown: Cancel, and tell the Sink (kCancelled) if work was still pending.
  void Shutdown();
  // Starts parts while slots allow. Called by the host after slots free up.
  void Schedule();

  // Any thread.
  FetchStats Stats() const;

  // PartTransfer callbacks (loop thread).
  size_t OnPartHeader(PartTransfer* t, const char* data, size_t n);
  size_t OnPartBody(PartTransfer* t, const char* data, size_t n);
  void OnPartDone(PartTransfer* t, CURLcode rc, bool cancelled);

 private:
  struct Part;

  Part* NewPart(uint64_t begin, uint64_t end, bool demand, bool stream);
  void RemovePart(Part* p);
  void StartAttempt(Part* p);
  void StopTransfer(Part* p);
  // cause labels the retry in FetchStats::retries_by_cause ("stall", "http_5xx", …).
  void RetryLater(Part* p, double delay_s, std::string why, const char* cause);
  void CountRetry(const char* cause, const std::string& why);
  void SnapshotParts(Clock::time_point now);
  void HandleFailure(Part* p, std::string why, bool progressed, const char* cause);
  void NeedResolve(Part* p, bool reresolve);
  void StartResolve();
  void OnResolved(StatusOr<ResolvedUrl> r);
  void EnterStreamMode();
  void NextSource(Part* p, const std::string& why, bool unhealthy);
  void MirrorWarming(Part* p);
  uint64_t AlignDown(uint64_t x) const;
  uint64_t BackgroundPartSize() const;  // FetchOptions::min_part_size
  void Fail(const Status& s);
  void Tick();
  void EnsureTick();
  double MedianRate() const;
  bool WriteToSink(Part* p, PartTransfer* t, uint64_t offset, const char* data, size_t len);
  // Splits the in-flight part expected to finish last (or, crawlers_only, the lowest crawling
  // part) into a free or reserved slot. False when nothing was split.
  bool SplitTail(bool crawlers_only);
  void SplitForDemand(uint64_t begin, uint64_t end);
  void Takeover(uint64_t begin, uint64_t end, bool demand);
  std::optional<ByteRange> NextDemand();
  double Backoff(int tries) const;
  std::string Describe(const Part* p) const;
  template <typename F>
  void UpdateStats(F f) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    f(stats_);
  }

  BlobFetchHost* const host_;
  const BlobLocation where_;
  const FetchOptions opts_;
  Sink* const sink_;

  bool cancelled_ = false;
  bool failed_ = false;       // gave up; idle until the next Demand/Refetch
  bool stream_mode_ = false;  // the server ignores Range: one stream from offset 0

  RangeSet written_;                    // accepted by the Sink (minus Refetch()ed ranges)
  RangeSet todo_bg_;                    // wanted, not yet assigned to a part
  RangeSet todo_demand_;                // demanded, not yet assigned to a part
  std::deque<ByteRange> demand_order_;  // demanded ranges, newest first (may be stale)
  RangeSet stream_need_;                // stream mode: bytes still to write

  std::map<uint64_t, std::unique_ptr<Part>> parts_;
  uint64_t next_part_id_ = 1;

  // Blob URL resolution.
  std::string url_;
  bool url_cdn_ = false;
  uint64_t url_gen_ = 0;
  bool resolving_ = false;
  std::string url_registry_;  // the registry (or mirror) url_ belongs to
  size_t url_source_ = 0;
  bool url_mirror_ = false;
  bool url_ranged_ = true;
  size_t source_floor_ = 0;  // resolve from this source on (mirrors.h); SIZE_MAX: origin only
  bool warming_ = false;     // a mirror is still pulling the blob: poll it
  int warm_polls_ = 0;
  Clock::time_point warm_start_;
  bool wrote_from_mirror_ = false;
  bool reported_mirror_complete_ = false;
  int resolve_tries_ = 0;
  CurlLoop::TimerId resolve_timer_ = 0;
  std::vector<uint64_t> waiting_for_url_;  // part ids

  CurlLoop::TimerId tick_timer_ = 0;
  std::deque<double> finished_rates_;  // bytes/s of recently finished attempts

  mutable std::mutex stats_mu_;
  FetchStats stats_;  // GUARDED_BY(stats_mu_)
};

}  // namespace modelfs::fetch
