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
// they must not block.
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
  uint64_t max_bytes = 0;  // 0 = no limit (eviction is issue #4)
};

enum class BlobState { kMissing, kFetching, kVerified, kFailed };
std::string_view BlobStateName(BlobState s);

struct BlobStatus {
  Digest digest;
  uint64_t size = 0;
  BlobState state = BlobState::kMissing;
  uint64_t bytes_present = 0;
  uint64_t hash_frontier = 0;  // bytes [0, hash_frontier) are hashed
  std::string last_error;
  fetch::FetchStats fetch;
};

class Blob {
 public:
  virtual ~Blob() = default;
  virtual const Digest& digest() const = 0;
  virtual uint64_t size() const = 0;

  // Starts fetching whatever is missing (unless the cache is lazy). Idempotent; a no-op for a
  // verified blob.
  virtual void Materialize() = 0;

  // Calls ready exactly once: with OK and a file descriptor from which [offset, offset + len)
  // can be read (pread/splice at those offsets) once the bytes are present (verified, in strict
  // mode); or with an error (kDataLoss when the digest did not match, kCancelled on shutdown,
  // the fetch's error when it gave up). A range past the end is clamped to the blob. A missing
  // range is fetched at once, ahead of background work. The fd stays valid until the Blob is
  // destroyed.
  using ReadyFn = std::function<void(const modelfs::Status& status, int fd)>;
  virtual void WhenReadable(uint64_t offset, uint64_t len, ReadyFn ready) = 0;

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
  // no "/", no NUL, not "." or ".."). Writes are atomic (temp file + rename).
  virtual Status PutManifest(const std::string& key, std::string_view bytes) = 0;
  virtual StatusOr<std::string> GetManifest(const std::string& key) = 0;
  virtual std::vector<std::string> ListManifests() = 0;

  // The shared Blob for where.digest, created on first use. Its data comes from
  // blobs/ when already complete (no fetch), else from partial/ and the fetcher.
  virtual StatusOr<std::shared_ptr<Blob>> OpenBlob(const fetch::BlobLocation& where) = 0;
  // True when blobs/sha256-<hex> exists (a verified, committed blob).
  virtual bool HasBlob(const Digest& digest) = 0;

  // Fails every parked reader with kCancelled and stops every fetch. Called before unmount.
  virtual void Shutdown() = 0;
};

}  // namespace modelfs::cache
