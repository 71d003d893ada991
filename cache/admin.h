// Cache administration without a Cache object: what `modelfs ls`, `rm`, `verify` and `gc` do
// to a cache directory (layout in cache/cache.h), safely next to running mounts.
//
// "In use" is decided by flock(2), the same locks the mounts hold:
//   - partial/sha256-<hex>: the fetching process holds LOCK_EX on it (cache/blob.cc);
//   - blobs/sha256-<hex>: every process with the blob open holds LOCK_SH on it, or LOCK_EX when
//     it committed the blob itself (the partial's lock survives the rename).
// A removal takes LOCK_EX|LOCK_NB on the file first and unlinks it while holding that lock; a
// blob some process has open is reported in use and left alone. A mount that opens a blob in
// the instant between our lock and our unlink keeps a working fd to the removed file.
//
// Stateless functions; safe for concurrent use (the file system serializes them).
#pragma once

#include <cstdint>
#include <ctime>
#include <string>
#include <vector>

#include "base/digest.h"
#include "base/status.h"

namespace modelfs::cache {

struct BlobEntry {
  Digest digest;
  bool complete = false;       // in blobs/ (verified), else a partial in partial/
  uint64_t size = 0;           // blob size (a partial's from its state file or data file length)
  uint64_t bytes_present = 0;  // complete: size; partial: from the state file (0 without one)
  uint64_t disk_bytes = 0;     // allocated on disk (st_blocks), data + state
  time_t last_use = 0;         // latest of atime and mtime of the data file
  bool in_use = false;         // a running process holds a lock on it
};

struct ManifestEntry {
  std::string key;    // host/ns/model/tag
  std::string bytes;  // raw manifest
  time_t mtime = 0;
};

// Every blob in blobs/ and partial/, complete ones first, each sorted by digest.
StatusOr<std::vector<BlobEntry>> ListCacheBlobs(const std::string& dir);
// The state of one blob on disk: NotFound when neither complete nor partial.
StatusOr<BlobEntry> StatCacheBlob(const std::string& dir, const Digest& digest);
// Every stored manifest (keys sorted).
StatusOr<std::vector<ManifestEntry>> ListCacheManifests(const std::string& dir);

// Removes the blob (complete and/or partial files). Returns the bytes freed on disk;
// kFailedPrecondition ("in use") when a running process has it open; NotFound when absent.
StatusOr<uint64_t> RemoveCacheBlob(const std::string& dir, const Digest& digest);
// Removes manifests/<key> and the directories it leaves empty. Returns the bytes freed.
StatusOr<uint64_t> RemoveCacheManifest(const std::string& dir, const std::string& key);

// Re-hashes blobs/sha256-<hex>: OK when it matches, kDataLoss (naming what it got) when not.
Status VerifyCacheBlob(const std::string& dir, const Digest& digest);

// Bytes allocated on disk under blobs/ and partial/ (no locks taken: safe inside a mount).
uint64_t CacheDiskBytes(const std::string& dir);

// Temp files (*.tmp) in partial/ older than max_age_s, for gc. Returns bytes freed.
uint64_t RemoveStaleCacheTemps(const std::string& dir, double max_age_s);

}  // namespace modelfs::cache
