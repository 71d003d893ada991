// The fetch module's contract with the cache: fetch a blob's byte ranges from a registry into a
// Sink. fetch/ knows nothing of the cache; the cache implements Sink and owns what it receives.
//
// Threads: every Sink call is made on the fetch loop thread ("modelfs-curl"). A Sink must not
// block for long there (a pwrite into the page cache is fine; waiting on a reader is not).
// Fetcher and Fetch methods are safe to call from any thread other than the loop thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/digest.h"
#include "base/range_set.h"
#include "base/status.h"

namespace modelfs::fetch {

// Where a blob lives: GET <registry>/v2/<repository>/blobs/<digest>.
struct BlobLocation {
  std::string registry;    // base URL, "https://registry.ollama.ai" or "http://127.0.0.1:5000"
  std::string repository;  // "library/llama3.2"
  Digest digest;
  uint64_t size = 0;       // from the manifest; the fetch never asks the server for it
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
  // range; the Fetch stays alive and idle afterwards.
  virtual void Failed(const Status& status) = 0;
};

struct FetchOptions {
  uint64_t part_size = 64ull << 20;
  int concurrency = 32;       // parts in flight for this blob
  double stall_timeout_s = 10;
};

// Counters for status output and tests. Monotonic except in_flight.
struct FetchStats {
  uint64_t bytes_written = 0;   // bytes handed to Sink::Write successfully
  uint64_t bytes_requested = 0; // sum of Range lengths asked of servers
  int parts_in_flight = 0;
  int retries = 0;
  int stalls = 0;
  int slow_refetches = 0;
  int splits = 0;
  std::string last_error;
};

// One blob's transfer. Destroying it cancels every request it has in flight; once the destructor
// returns, its Sink is never called again.
class Fetch {
 public:
  virtual ~Fetch() = default;
  // Fetch [offset, offset + len) ahead of everything queued (a blocked reader needs it).
  // Bytes already written or in flight are not asked for twice.
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
};

}  // namespace modelfs::fetch
