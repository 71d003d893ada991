// Cache: the on-disk, content-addressed store of blobs and manifests, shared by every mount and
// command that uses the same directory.
//
//   <dir>/blobs/sha256-<hex>                  complete blobs whose SHA-256 matched (Ollama's name)
//   <dir>/partial/sha256-<hex>                sparse data of a blob being fetched
//   <dir>/partial/sha256-<hex>.state          ranges present, hash frontier, SHA-256 state there
//   <dir>/manifests/<host>/<ns>/<model>/<tag> raw manifest bytes as the registry sent them
//
// A Blob is the one object per digest that readers share: it starts the fetch, follows the hash
// frontier, commits the blob when its digest matches, and tells parked readers when their bytes
// are there. Nothing outside <dir> is ever created, and no symlink inside it is followed.
//
// Threads: Cache and Blob are safe for concurrent use. Blob callbacks (WhenReadable) run either
// on the caller's thread (bytes already there) or on a cache thread (fetch loop or hasher);
// they must not block, and must not call Cache::Shutdown or drop what keeps the Cache alive.
// They run with no cache lock held, so calling back into the Blob is fine.
//
// Thread contract (details and lock order in cache/blob.h):
//   caller threads   OpenBlob, WhenReadable, Materialize, GetStatus, manifests; a read of
//                    present bytes is answered on the caller's thread.
//   fetch loop       Sink::Write/Failed: pwrite into partial/, mark bytes present, answer the
//                    readers whose ranges just completed (non-strict mode).
//   "modelfs-hash"   one thread per Cache: follows each blob's contiguous present prefix with
//                    SHA-256 (1 MiB preads, blobs take turns every 64 MiB), commits or fails the
//                    blob, answers strict readers, saves resume state (~1/s or per 256 MiB,
//                    fdatasync first), and polls blobs another process is fetching.
// Lock order: Cache::mu_ → Blob hash_mu_ → Blob fetch_mu_ → Blob mu_ → worker queue. The fetch
// loop thread only takes Blob mu_ and the worker queue lock; a Fetch is never destroyed under
// a lock the loop thread can take.
//
// Several processes may share one cache dir: whoever holds flock(LOCK_EX) on the partial data
// file fetches that blob; others fetch nothing for it, and about once a second check whether
// blobs/ has it (then serve it) or the lock is free (then take over from the saved state).
// Another process's partial bytes are not served before it commits.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/digest.h"
#include "base/status.h"
#include "fetch/fetcher.h"

namespace modelfs::cache {

struct CacheOptions {
  // Readers wait until their bytes are verified (the whole blob's digest has matched).
  bool strict = false;
  // Only fetch what readers ask for (no whole-blob background materialization).
  bool lazy = false;
  // --cache-max: least-recently-used complete blobs nobody has open (in any process) are
  // evicted so that blobs/ plus partial/ stay under this many bytes (apparent sizes; a partial
  // counts at its full size). Checked on OpenBlob and after each commit. 0 = no limit.
  uint64_t max_bytes = 0;
  // Repair unit: set it to the fetch's part size. The hasher keeps its SHA-256 state at every
  // piece boundary (112 bytes each, also in the state file); on a digest mismatch pieces are
  // re-fetched one at a time and hashing restarts from the first changed piece. 0: one piece.
  uint64_t piece_size = 64ull << 20;
  // Ask the registry for Ollama's per-chunk digests (Fetcher::GetChunksums) of blobs larger
  // than one piece. Each chunk is then verified as soon as all of its bytes are present (thread
  // "modelfs-chunks"), a chunk that does not match is re-fetched alone (its bytes stop being
  // served until then), and strict readers are answered once their chunks are verified. The
  // whole blob's digest still decides the commit: chunk digests that disagree with it are
  // distrusted for that blob, never the other way round.
  bool chunksums = true;
};

// kMissing: not complete and nothing is fetching it (a lazy blob nobody has read yet).
// kFetching: being fetched, by us or by another process sharing the cache dir.
enum class BlobState { kMissing, kFetching, kVerified, kFailed };
std::string_view BlobStateName(BlobState s);

struct BlobStatus {
  Digest digest;
  uint64_t size = 0;
  BlobState state = BlobState::kMissing;
  uint64_t bytes_present = 0;
  uint64_t hash_frontier = 0;  // bytes [0, hash_frontier) are hashed
  std::string last_error;
  // What the blob is waiting for, when not simply the network: "paused: cache disk full",
  // "repairing: re-fetching piece 3 (1 of 8) after a digest mismatch". Empty otherwise.
  std::string condition;
  // Bytes a repair found different on disk and replaced. Pages of them a reader cached before
  // the repair are stale: the FUSE layer must not keep_cache such a blob's earlier pages.
  uint64_t bytes_repaired = 0;
  // Per-chunk digests (CacheOptions::chunksums). chunks == 0: none published (or not known yet).
  size_t chunks = 0;
  size_t chunks_verified = 0;
  int chunk_refetches = 0;         // chunks re-fetched because their bytes did not match
  bool chunks_distrusted = false;  // they disagreed with the blob's digest: ignored from then on
  fetch::FetchStats fetch;
};

class Blob {
 public:
  virtual ~Blob() = default;
  virtual const Digest& digest() const = 0;
  virtual uint64_t size() const = 0;

  // Starts fetching whatever is missing (unless the cache is lazy). Idempotent; a no-op for a
  // verified blob. The Cache then keeps the Blob (and its fetch) alive after the last caller's
  // reference is dropped, until it is verified, fails, or the Cache shuts down.
  virtual void Materialize() = 0;

  // Calls ready exactly once: with OK and a file descriptor from which [offset, offset + len)
  // can be read (pread/splice at those offsets) once the bytes are present (verified, in strict
  // mode); or with an error (kDataLoss when the digest did not match, kCancelled on shutdown,
  // the fetch's error when it gave up). A range past the end is clamped to the blob. A missing
  // range is fetched at once, ahead of background work. The fd stays valid until the Blob is
  // destroyed. In strict mode a reader makes the whole blob be fetched, even in a lazy cache.
  using ReadyFn = std::function<void(const modelfs::Status& status, int fd)>;
  virtual void WhenReadable(uint64_t offset, uint64_t len, ReadyFn ready) = 0;

  // Fetches the missing bytes of [offset, offset + len) ahead of background work, without
  // waiting for them (readahead for a reader that is about to need them). No-op for a verified
  // or failed blob.
  virtual void Prefetch(uint64_t offset, uint64_t len) = 0;

  virtual BlobStatus GetStatus() const = 0;
};

class Cache {
 public:
  // Creates <dir> and its subdirectories as needed. Fails when dir (or a subdirectory) is a
  // symlink or not a directory.
  static StatusOr<std::unique_ptr<Cache>> Open(const std::string& dir, fetch::Fetcher* fetcher,
                                               CacheOptions options);
  virtual ~Cache() = default;

  virtual const std::string& dir() const = 0;

  // Manifests by key "<host>/<ns>/<model>/<tag>" (four components, each a valid name part:
  // 1-255 bytes, no "/", no NUL, not "." or ".."; else kInvalidArgument). Writes are atomic (temp
  // file + rename).
  virtual Status PutManifest(const std::string& key, std::string_view bytes) = 0;
  virtual StatusOr<std::string> GetManifest(const std::string& key) = 0;
  virtual std::vector<std::string> ListManifests() = 0;

  // The shared Blob for where.digest, created on first use. Its data comes from
  // blobs/ when already complete (no fetch), else from partial/ and the fetcher.
  virtual StatusOr<std::shared_ptr<Blob>> OpenBlob(const fetch::BlobLocation& where) = 0;
  // True when blobs/sha256-<hex> exists (a verified, committed blob).
  virtual bool HasBlob(const Digest& digest) = 0;
  // The status of every Blob this Cache has alive right now (open by a reader, or pinned while
  // it is materialized), for status output. Does not touch the disk.
  virtual std::vector<BlobStatus> ListBlobs() = 0;

  // Bytes [begin, end) of blob `digest`, which readers may have been served (and the kernel may
  // hold in its page cache), are being replaced: a chunk that did not match its digest (reads
  // of it wait for the re-fetch from now on), or bytes a repair rewrote. fn runs on a cache
  // thread with no cache lock held and must not block (queue the work). Replaces an earlier fn;
  // nullptr clears it. A call already running may still finish after it is replaced.
  using ReplacedFn = std::function<void(const Digest& digest, uint64_t begin, uint64_t end)>;
  virtual void OnBytesReplaced(ReplacedFn fn) = 0;

  // Fails every parked reader with kCancelled, stops every fetch and saves resume state. Called
  // before unmount; the destructor calls it too. Afterwards OpenBlob fails (kCancelled) and
  // Blobs still held answer kCancelled, except verified ones, which stay readable.
  virtual void Shutdown() = 0;
};

}  // namespace modelfs::cache
