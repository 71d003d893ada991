// Control: the operator's view of a running mount, served by the FUSE layer (fs/model_fs.cc).
//
//   MOUNT/.modelfs/status    JSON, generated at open: every blob in flight (and for a minute
//                            after it completes) with size, bytes present, hash frontier, state,
//                            rate, parts in flight, slow re-fetches, retries, stalls, last error;
//                            the cache's dir, bytes used and limit.
//   MOUNT/.modelfs/metrics   Prometheus text format (also served by --metrics ADDR).
//   MOUNT/.ollama/           Ollama's models dir for the models in the cache:
//                            manifests/<host>/<ns>/<model>/<tag> (raw manifest bytes) and
//                            blobs/sha256-<hex> (read through the same Blob machinery).
//   user.modelfs.* xattrs    of every model file: digest, bytes_present, hash_frontier, state,
//                            last_error (BlobXattrs).
//
// A sampler thread ("modelfs-stats") polls Cache::ListBlobs() once a second: it keeps the rate
// history, remembers blobs for a while after they close, and turns FetchStats deltas into the
// fetch counters of base/metrics.h. Counters of a blob's final second before it is dropped may
// be missed (it is polled, not told).
//
// Thread-safe: every method may be called from any FUSE worker thread concurrently.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "base/status.h"
#include "cache/cache.h"
#include "fs/resolver.h"
#include "manifest/manifest.h"

namespace modelfs::fs {

inline constexpr char kControlDirName[] = ".modelfs";
inline constexpr char kOllamaDirName[] = ".ollama";

struct ControlOptions {
  std::string mountpoint;
  std::string registry;
  uint64_t cache_limit = 0;            // bytes, 0 = none
  std::chrono::seconds keep_done{60};  // how long a closed blob stays in status
};

// What a path under .modelfs/ or .ollama/ is.
struct ControlEntry {
  enum class Kind { kDir, kGenerated, kManifest, kBlob };
  Kind kind = Kind::kDir;
  std::shared_ptr<const ResolvedModel> model;  // kManifest, kBlob: a model that has it
  manifest::Descriptor blob;                   // kBlob
};

class Control {
 public:
  Control(Resolver* resolver, cache::Cache* cache, ControlOptions options);
  ~Control();
  Control(const Control&) = delete;
  Control& operator=(const Control&) = delete;

  // True for {".modelfs", …} and {".ollama", …}.
  static bool Owns(const std::vector<std::string>& path);
  // path: components under the mountpoint, the first one .modelfs or .ollama.
  StatusOr<ControlEntry> Lookup(const std::vector<std::string>& path);
  // Entries of a control directory: (name, is_dir).
  std::vector<std::pair<std::string, bool>> List(const std::vector<std::string>& path);
  // Contents of a kGenerated file, made now.
  StatusOr<std::string> Generate(const std::vector<std::string>& path);

  // Records a blob's status now (at open and close), so one opened and closed between two
  // samples is still listed.
  void Observe(cache::BlobStatus s);
  std::string StatusJson();
  std::string MetricsText();
  // The user.modelfs.* attributes of a blob, without opening it (no fetch, no partial file).
  std::vector<std::pair<std::string, std::string>> BlobXattrs(const manifest::Descriptor& blob);

 private:
  using Clock = std::chrono::steady_clock;
  struct Tracked {
    cache::BlobStatus status;
    std::deque<std::pair<Clock::time_point, uint64_t>> history;  // (when, bytes_present)
    fetch::FetchStats counted;  // what was already added to the metrics
    bool live = false;
    bool mismatch_counted = false;
    Clock::time_point gone;
  };
  struct OllamaIndex {
    Clock::time_point built;
    std::map<std::string, std::shared_ptr<const ResolvedModel>> manifests;  // by cache key
    std::map<std::string, std::pair<std::shared_ptr<const ResolvedModel>, manifest::Descriptor>>
        blobs;  // by sha256-<hex>
  };

  void SampleLocked();  // REQUIRES: mu_ held
  // Records one live blob's status (metrics deltas, rate history).
  void UpdateLocked(cache::BlobStatus s, Clock::time_point now);  // REQUIRES: mu_ held
  void Run();
  std::shared_ptr<const OllamaIndex> Index(bool fresh);
  double RateLocked(const Tracked& t) const;  // REQUIRES: mu_ held

  Resolver* const resolver_;
  cache::Cache* const cache_;
  const ControlOptions options_;

  std::mutex mu_;
  std::map<Digest, Tracked> tracked_;  // GUARDED_BY(mu_)
  bool stop_ = false;                  // GUARDED_BY(mu_)
  std::condition_variable cv_;
  std::mutex index_mu_;
  std::shared_ptr<const OllamaIndex> index_;  // GUARDED_BY(index_mu_)
  std::thread thread_;
};

}  // namespace modelfs::fs
