// The fetch module's contract with the cache: fetch a blob's byte ranges from a registry into a
// Sink. fetch/ knows nothing of the cache; the cache implements Sink and owns what it receives.
//
// Threads: every Sink call is made on the fetch loop thread ("modelfs-curl"). A Sink must not
// block for long there (a pwrite into the page cache is fine; waiting on a reader is not).
// Fetcher and Fetch methods are safe to call from any thread other than the loop thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/digest.h"
#include "base/range_set.h"
#include "base/status.h"
#include "fetch/chunksums.h"

namespace modelfs::fetch {

// Where a blob lives: GET <registry>/v2/<repository>/blobs/<digest>.
struct BlobLocation {
  std::string registry;    // base URL, "https://registry.ollama.ai" or "http://127.0.0.1:5000"
  std::string repository;  // "library/llama3.2"
  Digest digest;
  uint64_t size = 0;  // from the manifest; the fetch never asks the server for it
};

class Sink {
 public:
  virtual ~Sink() = default;
  // Bytes [offset, offset + len) arrived and were checked against the request that asked for
  // them. Within one request, calls come in offset order. A non-OK status stops that request:
  // kResourceExhausted (disk full) pauses the fetch and retries the write later; anything else
  // fails the fetch.
  virtual Status Write(uint64_t offset, const void* data, size_t len) = 0;
  // The fetch gave up: [range] (or the whole blob) cannot be fetched. Called at most once per
  // range; the Fetch stays alive and idle afterwards. A later Demand()/Refetch() tries again
  // (and may end in another Failed). Also called with kCancelled when the Fetcher shuts down
  // while this fetch still had work.
  virtual void Failed(const Status& status) = 0;
};

struct FetchOptions {
  uint64_t part_size = 64ull << 20;
  // Guided part sizes: when non-zero (and align_bytes is 0), each background part is the
  // unassigned bytes / (4 × concurrency), clamped to [min_part_size, part_size], so parts shrink
  // as the blob nears its end. Bytes then land nearly in order: the cache's hash frontier is
  // about concurrency × min_part_size behind when the last byte lands, instead of everything
  // but the first part (a blob of at most concurrency parts has them all in flight at once).
  uint64_t min_part_size = 0;
  int concurrency = 32;         // parts in flight for this blob
  double stall_timeout_s = 10;  // no byte for this long (also before the first) = stalled
  // Extra parts a Demand() may start beyond `concurrency` (and beyond the global cap).
  int demand_slots = 4;
  // Retries of transient errors (connection, reset, 5xx, stall): backoff base·2^n with jitter,
  // capped; a part fails after max_tries attempts without progress.
  double retry_base_delay_s = 0.5;
  double retry_max_delay_s = 30;
  int max_tries = 8;
  double max_retry_after_s = 60;  // cap on a server's Retry-After
  // Slow parts: below slow_fraction of the median rate after slow_grace_s, re-requested on a
  // fresh connection at most max_slow_refetches times.
  double slow_grace_s = 5;
  double slow_fraction = 0.1;
  int max_slow_refetches = 3;
  // Parts are split (demand, tail) only when each side keeps at least this many bytes.
  uint64_t min_split_bytes = 1ull << 20;
  double disk_full_retry_s = 1;  // Sink::Write said kResourceExhausted: try again after this
  int max_reresolves = 3;        // per part, when a signed CDN URL is refused (401/403/404/410)
  // Mirrors and proxies (fetch/mirrors.h): when non-zero, demand windows, part ends and split
  // points fall on multiples of align_bytes, and background parts on multiples of part_size, so
  // a range cache in front (nginx slice, a CDN) sees the same ranges from every node.
  uint64_t align_bytes = 0;
  // A mirror answering 200 to a Range request is still pulling the blob (a distribution
  // pull-through cache): wait for it (polling) this long plus 1 s per 50 MB of blob before
  // streaming from it instead.
  double mirror_warm_wait_s = 60;
  int mirror_max_tries = 3;  // failed tries of a part at a mirror before the next source
};

// One range request of a blob in flight, for status output.
struct PartStatus {
  uint64_t next = 0;  // first byte not yet written
  uint64_t end = 0;   // exclusive
  bool demand = false;
  double rate = 0;    // bytes/s in the current attempt
  int tries = 0;
  int slow_refetches = 0;
};

// Counters for status output and tests. Monotonic except in_flight.
struct FetchStats {
  uint64_t bytes_written = 0;    // bytes handed to Sink::Write successfully
  uint64_t bytes_requested = 0;  // sum of Range lengths asked of servers
  int parts_in_flight = 0;
  int retries = 0;
  std::map<std::string, int> retries_by_cause;  // "connection", "stall", "http_5xx", …
  std::vector<PartStatus> parts;               // refreshed a few times a second
  int stalls = 0;
  int slow_refetches = 0;
  int splits = 0;
  std::string last_error;
};

// One blob's transfer. Destroying it cancels every request it has in flight; once the destructor
// returns, its Sink is never called again. Do not destroy it on the loop thread (from inside a
// Sink call).
class Fetch {
 public:
  virtual ~Fetch() = default;
  // Fetch [offset, offset + len) ahead of everything queued (a blocked reader needs it).
  // Bytes already written or in flight are not asked for twice. Only the first part_size missing
  // bytes jump the queue (newest demand first, splitting an in-flight part if they lie in its
  // unreached tail); the rest joins the background queue, so a bulk Demand cannot starve later
  // readers.
  virtual void Demand(uint64_t offset, uint64_t len) = 0;
  // Fetch these ranges again even though they were written before (repair of a bad part).
  virtual void Refetch(uint64_t offset, uint64_t len) = 0;
  virtual FetchStats Stats() const = 0;
};

class Fetcher {
 public:
  virtual ~Fetcher() = default;
  // Starts fetching `wanted` (may be empty for a lazy fetch that only serves Demand()) into
  // sink, which must outlive the returned Fetch.
  virtual std::unique_ptr<Fetch> Start(const BlobLocation& where, std::vector<ByteRange> wanted,
                                       Sink* sink) = 0;

  // Ollama's per-chunk digests of a blob (fetch/chunksums.h), where its registry publishes them:
  // GET <registry>/v2/<repository>/chunksums/<digest>, asked of the registry itself (never a
  // mirror). done runs exactly once, on the fetch loop thread (so the Sink rules apply: it must
  // not block, nor drop the last reference to anything whose destructor waits for that thread),
  // with the chunks; kNotFound when the registry publishes none for it (404, or an endpoint it
  // does not have); kCancelled when the fetcher shuts down first; another error otherwise. A
  // reply that does not parse, or does not cover exactly [0, where.size), is kDataLoss.
  // One exception to the thread: called once the fetcher has already shut down (its loop thread
  // is gone), done runs at once on the calling thread, with kCancelled, before GetChunksums
  // returns — so do not call it holding a lock that done takes.
  using ChunksumsFn = std::function<void(StatusOr<std::vector<Chunk>>)>;
  virtual void GetChunksums(const BlobLocation& where, ChunksumsFn done) = 0;
};

}  // namespace modelfs::fetch
