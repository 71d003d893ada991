// Internals of the cache: the per-Cache Core (directory fds, options, the worker thread) and
// BlobImpl, the one object per digest that owns a blob's file, its fetch, its hash frontier and
// its parked readers. Not part of the cache's public API (see cache.h).
//
// Threads:
//   - Caller threads (FUSE workers, commands): Blob methods, OpenBlob.
//   - The fetch loop thread ("modelfs-curl"): Sink::Write / Sink::Failed. Never blocks on a
//     reader; may answer parked readers whose bytes just arrived.
//   - The chunk thread ("modelfs-chunks", one per Cache): receives a blob's chunk digests (from
//     the fetch loop, through a posted task) and verifies each chunk once all its bytes are
//     present; a bad chunk is re-fetched (see blob.cc, "Chunks").
//   - The worker thread ("modelfs-hash", one per Cache): advances every blob's hash frontier,
//     commits or fails it, persists state files (fdatasync + atomic rename), polls blobs locked
//     by another process, and destroys ReadyFn objects that ran on the fetch loop thread (so
//     the loop thread never drops the last reference to a Blob, whose destructor would wait for
//     the loop thread).
//
// Lock order (a lock may only be taken while holding the ones to its left):
//   Cache::mu_  →  BlobImpl::hash_mu_  →  BlobImpl::fetch_mu_  →  BlobImpl::mu_  →  Worker::mu_
//   and BlobImpl::hash_mu_  →  BlobImpl::persist_mu_  →  BlobImpl::mu_ (the syncer thread
//   "modelfs-sync" takes only persist_mu_ → mu_: it writes state files, fdatasync first).
// The chunk thread takes hash_mu_ → fetch_mu_ → mu_ (a bad chunk rewinds the frontier) or
// persist_mu_ → mu_ (writing the chunk list), never holding a lock while it hashes.
// Core::pin_mu, Core::lock_mu and Core::replaced_mu are leaves (nothing is taken under them).
// Waiting on Core::lock_cv (for a dying Blob of ours to drop its flock) happens under Cache::mu_
// and the new Blob's hash_mu_; a dying Blob needs neither. The fetch loop thread only ever takes
// BlobImpl::mu_, Worker::mu_ and Core::pin_mu (and, in Sink::Write, calls Fetch::Stats() of the
// Fetch calling it, with no lock held: that Fetch cannot be destroyed before Write returns). In
// repair mode Write preads and compares before writing. The worker also runs --cache-max eviction
// passes (no Blob lock held; an open blob is one whose file someone holds a flock on).
// Fetch::Demand/Start are called under fetch_mu_ (they post to the loop thread and never wait for
// it). A Fetch is destroyed (which waits for the loop thread) with no lock held but hash_mu_, which
// the loop thread never takes. ReadyFn callbacks run with no lock held.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/digest.h"
#include "base/range_set.h"
#include "base/unique_fd.h"
#include "cache/cache.h"
#include "cache/state_file.h"
#include "fetch/fetcher.h"

namespace modelfs::cache {

class BlobImpl;

// One thread running posted tasks in order, plus a tick every second over registered blobs.
class Worker {
 public:
  explicit Worker(const char* name);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Runs task on the worker thread. False (task not run, destroyed here) once stopped.
  bool Post(std::function<void()> task);
  // Calls Tick() on blob about once a second while it lives.
  void Register(std::weak_ptr<BlobImpl> blob);
  // Runs no further task; joins the thread. Idempotent.
  void Stop();

 private:
  void Run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;      // GUARDED_BY(mu_)
  std::vector<std::weak_ptr<BlobImpl>> ticked_;  // GUARDED_BY(mu_)
  bool stop_ = false;                            // GUARDED_BY(mu_)
  const char* const name_;
  std::thread thread_;
};

// Shared by a Cache and its Blobs (a Blob may outlive its Cache).
struct Core {
  std::string dir;
  UniqueFd dir_fd, blobs_fd, partial_fd, manifests_fd;
  fetch::Fetcher* fetcher = nullptr;
  CacheOptions options;
  Worker worker{"modelfs-hash"};
  // Writes resume state (fdatasync, then the state file), so the hasher never waits on the disk.
  Worker syncer{"modelfs-sync"};
  // Verifies chunks against the registry's chunk digests, beside the frontier on another core.
  Worker chunker{"modelfs-chunks"};
  std::atomic<uint64_t> chunk_bytes_hashed{0};  // bytes chunk verification fed to SHA-256
  std::atomic<bool> disk_full{false};     // "log once" latch for ENOSPC
  std::atomic<uint64_t> bytes_hashed{0};  // total bytes fed to SHA-256, for tests and stats
  std::atomic<uint64_t> bytes_repaired{0};  // bytes a repair found different on disk (tests)
  // --cache-max: an eviction pass is queued on the worker (coalesces requests).
  std::atomic<bool> evict_queued{false};
  std::atomic<bool> over_limit_logged{false};
  // Cache::OnBytesReplaced's fn; copied under replaced_mu (a leaf lock), called outside it.
  std::mutex replaced_mu;
  std::shared_ptr<const Cache::ReplacedFn> replaced;  // GUARDED_BY(replaced_mu)
  // Blobs being materialized stay alive (and keep fetching) after their last reader closes,
  // until they are verified or fail, or the Cache shuts down. pin_mu is a leaf lock; a pin is
  // always dropped outside it, and never on the fetch loop thread.
  std::mutex pin_mu;
  std::map<Digest, std::shared_ptr<BlobImpl>> pinned;  // GUARDED_BY(pin_mu)
  // Blobs whose bytes did not match their digest, with when the failure stops being remembered:
  // re-opening one fails at once instead of downloading (and serving) the same bad bytes again.
  std::map<Digest, std::pair<Status, std::chrono::steady_clock::time_point>>
      recent_failures;  // GUARDED_BY(pin_mu)
  // Partial files whose flock a Blob of this process holds. A Blob's destructor may still be
  // running (saving state) when the same digest is opened again; the new Blob waits for it here
  // instead of mistaking it for another process. lock_mu is a leaf lock.
  std::mutex lock_mu;
  std::condition_variable lock_cv;
  std::set<Digest> locked;  // GUARDED_BY(lock_mu)
};

// --cache-max: when max_bytes is set, posts one eviction pass to the worker (coalesced). The
// pass removes least-recently-used complete blobs (atime: see TouchLastUse) that nobody holds a
// flock on (every Blob, in any process, keeps one on its fd) until blobs/ plus partial/ fit.
void QueueEviction(const std::shared_ptr<Core>& core);
// Marks a complete blob's file as used now (its atime), for eviction order. Best effort.
void TouchLastUse(int fd);

class BlobImpl final : public Blob,
                       public fetch::Sink,
                       public std::enable_shared_from_this<BlobImpl> {
 public:
  // Opens blobs/ (complete) or partial/ (data + state) for where. Fails on a symlink or other
  // odd file where a blob file should be.
  static StatusOr<std::shared_ptr<BlobImpl>> Create(std::shared_ptr<Core> core,
                                                    const fetch::BlobLocation& where);
  ~BlobImpl() override;

  const Digest& digest() const override { return where_.digest; }
  uint64_t size() const override { return where_.size; }
  void Materialize() override;
  void WhenReadable(uint64_t offset, uint64_t len, ReadyFn ready) override;
  void Prefetch(uint64_t offset, uint64_t len) override;
  BlobStatus GetStatus() const override;

  Status Write(uint64_t offset, const void* data, size_t len) override;
  void Failed(const Status& status) override;

  // Worker thread: hash what is contiguous past the frontier (bounded per call, for fairness
  // between blobs), commit or fail at the end.
  void HashStep();
  // Worker thread, ~1/s: persist state if due; retry the lock when another process owns it.
  void Tick();
  // Fails parked readers with kCancelled, stops the fetch, persists state. Idempotent.
  void Shutdown();

  // Tests: returns once the worker has run everything posted before the call.
  void SyncWorkerForTest();
  // Tests: bytes this Cache's hasher has fed to SHA-256 (all blobs).
  uint64_t BytesHashedForTest() const { return core_->bytes_hashed.load(); }
  // Tests: bytes chunk verification has fed to SHA-256 (all blobs of this Cache).
  uint64_t ChunkBytesHashedForTest() const { return core_->chunk_bytes_hashed.load(); }

 private:
  struct Waiter {
    uint64_t begin, end;
    ReadyFn ready;
  };
  // Answers decided under hash_mu_, given after it is released (a ReadyFn may call back in).
  struct Deferred {
    std::vector<Waiter> waiters;
    Status status;
    int fd;
    std::shared_ptr<BlobImpl> unpinned;  // dropped after the answers, outside hash_mu_
  };
  using Clock = std::chrono::steady_clock;

  BlobImpl(std::shared_ptr<Core> core, const fetch::BlobLocation& where);
  // Opens the committed blob or takes ownership of the partial. Called from Create (no other
  // reference exists yet) and from Tick while waiting on another process.
  Status Acquire();
  Status AcquireLocked();  // REQUIRES: hash_mu_ held
  void LoadStateLocked();  // REQUIRES: hash_mu_ held; owner_ just became true
  // Starts the Fetch if needed (whole blob when full, else lazy) and demands these ranges.
  void EnsureFetch(bool full, const std::vector<ByteRange>& demand);
  void PostHashStep();
  // Snapshots resume state; writes it on the syncer (or here, when force).
  void MaybePersistLocked(bool force);  // REQUIRES: hash_mu_ held
  void WriteState(int fd, uint64_t seq, const PartialState& s, bool async);  // persist_mu_
  void HashStepLocked();                // REQUIRES: hash_mu_ held
  void TickLocked();                    // REQUIRES: hash_mu_ held
  void FinishLocked();                  // REQUIRES: hash_mu_ held; frontier == size
  // Repair (see blob.cc, "Repair"): on a digest mismatch, re-fetch one piece at a time.
  void StartRepairLocked(const Digest& got);  // REQUIRES: hash_mu_ held
  void NextRepairLocked(const Digest& got);   // REQUIRES: hash_mu_ held
  void RepairStep();                          // worker: the piece being re-fetched is complete
  uint64_t PieceSize() const { return piece_size_ > 0 ? piece_size_ : std::max<uint64_t>(1, where_.size); }
  // Tells Cache::OnBytesReplaced's fn, if any. No lock held.
  void NotifyReplaced(uint64_t begin, uint64_t end);
  // Restarts hashing from the last checkpoint at or before offset.
  void RewindLocked(uint64_t offset);  // REQUIRES: hash_mu_ held
  // Asks the fetch for these bytes again (starting a Fetch if there is none).
  void RefetchRange(uint64_t begin, uint64_t len);  // REQUIRES: fetch_mu_, mu_ not held
  // Chunks (see blob.cc, "Chunks").
  void AskChunksLocked();                                     // REQUIRES: fetch_mu_ held
  void OnChunks(StatusOr<std::vector<fetch::Chunk>> chunks);  // chunk thread
  void SetChunksLocked(std::vector<fetch::Chunk> chunks);     // REQUIRES: mu_ held
  void VerifyChunkStep();                                     // chunk thread
  void PostChunkStepLocked();                                 // REQUIRES: mu_ held
  // Chunks overlapping [begin, end) whose bytes are now all present are queued for verification.
  void QueueCompleteChunksLocked(uint64_t begin, uint64_t end);  // REQUIRES: mu_ held
  bool ChunksTrustedLocked() const { return !chunks_.empty() && !chunks_distrusted_; }
  // Strict mode: waiters whose bytes are all in verified chunks move to *ready.
  void TakeVerifiedWaitersLocked(std::vector<Waiter>* ready);  // REQUIRES: mu_ held
  void DistrustChunksLocked(const std::string& why);           // REQUIRES: mu_ held
  void FailLocked(const Status& status, bool remove_files);  // REQUIRES: hash_mu_ held
  std::unique_ptr<fetch::Fetch> TakeFetch(bool close);
  void Pin();
  std::shared_ptr<BlobImpl> Unpin();
  // Runs the callbacks with no lock held, then hands the ReadyFn objects to the worker to be
  // destroyed there (see the thread notes above).
  void Answer(std::vector<Waiter> waiters, const Status& status, int fd, bool on_loop_thread);

  const std::shared_ptr<Core> core_;
  const fetch::BlobLocation where_;
  const std::string name_;        // sha256-<hex>
  const std::string state_name_;  // sha256-<hex>.state
  const std::string chunks_name_;  // sha256-<hex>.chunks

  // Hash frontier. Taken by the worker for a whole HashStep and by persistence.
  std::mutex hash_mu_;
  Sha256 sha_;               // GUARDED_BY(hash_mu_): state after [0, frontier_)
  uint64_t piece_size_ = 0;  // repair unit (the fetch's part size); 0: the whole blob
  // SHA-256 state at piece boundaries the frontier has passed (offset -> state after [0, offset)),
  // so a repair re-hashes from the changed piece on, not from 0. 112 bytes each.
  std::map<uint64_t, Sha256> checkpoints_;  // GUARDED_BY(hash_mu_)
  std::vector<uint64_t> repair_queue_;      // GUARDED_BY(hash_mu_): pieces still to re-fetch
  size_t repair_total_ = 0;                 // GUARDED_BY(hash_mu_): pieces in this repair
  std::vector<char> buf_;                               // GUARDED_BY(hash_mu_)
  Clock::time_point last_persist_;                      // GUARDED_BY(hash_mu_)
  std::vector<Deferred> deferred_;                      // GUARDED_BY(hash_mu_)
  // Writing the state file (syncer thread, or Shutdown); commit and discard take it too, so no
  // state file appears after either. Lock order: hash_mu_ → persist_mu_ → mu_.
  std::mutex persist_mu_;
  bool persist_failing_ = false;  // GUARDED_BY(persist_mu_)

  // The Fetch; created on first need, destroyed on commit, failure, shutdown.
  mutable std::mutex fetch_mu_;
  std::unique_ptr<fetch::Fetch> fetch_;  // GUARDED_BY(fetch_mu_)
  bool fetch_closed_ = false;            // GUARDED_BY(fetch_mu_): never start another
  bool fetch_full_ = false;              // GUARDED_BY(fetch_mu_): asked for the whole blob
  fetch::FetchStats last_stats_;         // GUARDED_BY(fetch_mu_): of the Fetch last destroyed

  mutable std::mutex mu_;
  BlobState state_ = BlobState::kMissing;  // GUARDED_BY(mu_)
  bool owner_ = false;                     // GUARDED_BY(mu_): we hold the flock on the partial file
  bool in_locked_ = false;                 // GUARDED_BY(hash_mu_): our digest is in core_->locked
  bool shutdown_ = false;                  // GUARDED_BY(mu_)
  bool closing_ = false;      // GUARDED_BY(mu_): the Fetch is being destroyed; ignore its Failed()
  bool discarded_ = false;    // GUARDED_BY(mu_): partial files removed (mismatch): never persist
  bool materialize_ = false;  // GUARDED_BY(mu_): Materialize() was called
  bool hash_queued_ = false;  // GUARDED_BY(mu_): a HashStep is posted
  bool dirty_ = false;        // GUARDED_BY(mu_): present/frontier changed since last persist
  uint64_t unpersisted_bytes_ = 0;  // GUARDED_BY(mu_)
  bool persist_queued_ = false;     // GUARDED_BY(mu_)
  bool persist_inflight_ = false;   // GUARDED_BY(mu_): a snapshot is queued on the syncer
  uint64_t persist_seq_ = 0;        // GUARDED_BY(mu_): snapshots taken
  uint64_t persist_written_ = 0;    // GUARDED_BY(mu_): newest snapshot written
  bool no_state_ = false;           // GUARDED_BY(mu_): committed or discarded: write no state
  UniqueFd fd_;                     // GUARDED_BY(mu_): the fd readers get
  std::vector<UniqueFd> old_fds_;   // GUARDED_BY(mu_): fds handed out earlier stay open
  RangeSet present_;                // GUARDED_BY(mu_)
  uint64_t frontier_ = 0;           // GUARDED_BY(mu_): mirrors sha_ for status
  std::string condition_;           // GUARDED_BY(mu_): BlobStatus::condition
  uint64_t bytes_repaired_ = 0;     // GUARDED_BY(mu_): BlobStatus::bytes_repaired
  Clock::time_point last_byte_;     // GUARDED_BY(mu_): when present_ became complete
  bool got_last_byte_ = false;      // GUARDED_BY(mu_)
  // Repair: while repairing_, Write compares incoming bytes with the disk and writes only what
  // differs; repair_changed_from_ is the lowest offset it changed (kNone: nothing).
  static constexpr uint64_t kNone = ~uint64_t{0};
  bool repairing_ = false;                // GUARDED_BY(mu_)
  uint64_t repair_piece_ = 0;             // GUARDED_BY(mu_): piece index being re-fetched
  RangeSet repair_got_;                   // GUARDED_BY(mu_): its bytes received again
  uint64_t repair_changed_from_ = kNone;  // GUARDED_BY(mu_)
  bool repair_step_queued_ = false;       // GUARDED_BY(mu_)
  // Ranking of repair candidates, from what the cache sees of the fetch: trouble_[i] counts
  // fetch troubles (retries, stalls, slow re-requests: FetchStats) that happened while piece i
  // was partly written. Sized lazily to the piece count.
  std::vector<uint32_t> trouble_;  // GUARDED_BY(mu_)
  int trouble_seen_ = 0;           // GUARDED_BY(mu_): FetchStats troubles counted so far
  fetch::Fetch* sink_fetch_ = nullptr;  // GUARDED_BY(mu_): the live Fetch, for its Stats()
  // Chunks: the registry's per-chunk digests, in offset order (empty: none known).
  enum class ChunkState : uint8_t {
    kIncomplete,  // some bytes missing
    kQueued,      // all bytes present, in chunk_queue_
    kVerified,    // matched (its bytes are in verified_)
    kRefetching,  // did not match: its bytes are not present_ until the server sends them again
  };
  struct ChunkInfo {
    fetch::Chunk chunk;
    ChunkState state = ChunkState::kIncomplete;
    uint8_t refetches = 0;  // times re-fetched after a mismatch
    bool changed = false;   // the re-fetch wrote bytes that differ from the bad ones
  };
  std::vector<ChunkInfo> chunks_;   // GUARDED_BY(mu_)
  std::deque<size_t> chunk_queue_;  // GUARDED_BY(mu_): indices of kQueued chunks
  RangeSet verified_;               // GUARDED_BY(mu_): bytes of kVerified chunks
  RangeSet compare_;                // GUARDED_BY(mu_): kRefetching chunks: Write compares there
  bool chunks_asked_ = false;       // GUARDED_BY(mu_)
  bool chunks_distrusted_ = false;  // GUARDED_BY(mu_)
  bool chunk_step_queued_ = false;  // GUARDED_BY(mu_)
  int chunk_refetches_ = 0;         // GUARDED_BY(mu_)
  Status failure_;                  // GUARDED_BY(mu_)
  std::vector<Waiter> waiters_;     // GUARDED_BY(mu_): unsorted; a few hundred at most
};

}  // namespace modelfs::cache
