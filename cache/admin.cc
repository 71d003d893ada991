#include "cache/admin.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "base/unique_fd.h"
#include "cache/file_util.h"
#include "cache/state_file.h"

namespace modelfs::cache {
namespace {

constexpr size_t kMaxStateFile = 64 << 20;
constexpr char kPrefix[] = "sha256-";

uint64_t DiskBytes(const struct stat& st) { return static_cast<uint64_t>(st.st_blocks) * 512; }

StatusOr<UniqueFd> OpenSub(const std::string& dir, const char* sub) {
  ASSIGN_OR_RETURN(UniqueFd root, OpenDirAt(AT_FDCWD, dir, /*create=*/false));
  return OpenDirAt(root.get(), sub, /*create=*/false);
}


// "sha256-<hex>" (exactly) → digest.
bool ParseBlobName(const std::string& name, Digest* out) {
  if (name.rfind(kPrefix, 0) != 0) return false;
  auto d = Digest::FromHex(name.substr(sizeof kPrefix - 1));
  if (!d.ok() || d->FileName() != name) return false;
  *out = *d;
  return true;
}

// A /proc file (st_size 0: read to EOF).
StatusOr<std::string> ReadProcFile(const char* path) {
  UniqueFd fd(::open(path, O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(errno, path);
  std::string out;
  char buf[65536];
  while (true) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoStatus(errno, path);
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

// Whether some process holds a flock on name in dir_fd. Read from /proc/locks, so that looking
// never takes a lock (a probe lock would make a mount opening the blob at that instant think
// another process owns it). Lines look like "1: FLOCK  ADVISORY  WRITE 24354 fe:00:10955161 0 EOF".
bool Locked(int dir_fd, const std::string& name) {
  struct stat st;
  if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return false;
  auto text = ReadProcFile("/proc/locks");
  if (!text.ok()) {
    UniqueFd fd(::openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    return fd.valid() && ::flock(fd.get(), LOCK_EX | LOCK_NB) != 0;  // fall back to a probe
  }
  size_t pos = 0;
  while (pos < text->size()) {
    size_t end = text->find('\n', pos);
    if (end == std::string::npos) end = text->size();
    std::string line = text->substr(pos, end - pos);
    pos = end + 1;
    if (line.find("FLOCK") == std::string::npos) continue;
    unsigned major = 0, minor = 0;
    unsigned long long ino = 0;
    // Fields: id: FLOCK ADVISORY READ|WRITE pid maj:min:ino start end
    char kind[16], adv[16], mode[16];
    long pid;
    if (std::sscanf(line.c_str(), "%*[^:]: %15s %15s %15s %ld %x:%x:%llu", kind, adv, mode, &pid,
                    &major, &minor, &ino) == 7 &&
        ino == st.st_ino &&
        // On btrfs subvolumes and overlayfs, stat gives an anonymous st_dev (major 0) that
        // /proc/locks does not use: then an inode match alone counts (a false "in use" only
        // makes gc skip a blob).
        (makedev(major, minor) == st.st_dev || ::major(st.st_dev) == 0)) {
      return true;
    }
  }
  return false;
}

StatusOr<BlobEntry> StatComplete(int blobs_fd, const Digest& digest) {
  struct stat st;
  if (::fstatat(blobs_fd, digest.FileName().c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return ErrnoStatus(errno, "blobs/" + digest.FileName());
  }
  if (!S_ISREG(st.st_mode)) return FailedPrecondition("blobs/" + digest.FileName() + " is odd");
  BlobEntry e;
  e.digest = digest;
  e.complete = true;
  e.size = e.bytes_present = static_cast<uint64_t>(st.st_size);
  e.disk_bytes = DiskBytes(st);
  e.last_use = std::max(st.st_atime, st.st_mtime);
  e.in_use = Locked(blobs_fd, digest.FileName());
  return e;
}

StatusOr<BlobEntry> StatPartial(int partial_fd, const Digest& digest) {
  const std::string name = digest.FileName();
  struct stat st;
  if (::fstatat(partial_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return ErrnoStatus(errno, "partial/" + name);
  }
  if (!S_ISREG(st.st_mode)) return FailedPrecondition("partial/" + name + " is odd");
  BlobEntry e;
  e.digest = digest;
  e.size = static_cast<uint64_t>(st.st_size);
  e.disk_bytes = DiskBytes(st);
  e.last_use = std::max(st.st_atime, st.st_mtime);
  struct stat sst;
  if (::fstatat(partial_fd, (name + ".state").c_str(), &sst, AT_SYMLINK_NOFOLLOW) == 0) {
    e.disk_bytes += DiskBytes(sst);
    e.last_use = std::max(e.last_use, sst.st_mtime);
    auto text = ReadFileAt(partial_fd, name + ".state", kMaxStateFile);
    if (text.ok()) {
      auto state = DecodeState(*text, digest, e.size);
      if (state.ok()) e.bytes_present = state->present.TotalBytes();
    }
  }
  e.in_use = Locked(partial_fd, name);
  return e;
}

// Unlinks name (and extra names) in dir_fd while holding LOCK_EX|LOCK_NB on name's inode.
StatusOr<uint64_t> RemoveLocked(int dir_fd, const std::string& name,
                                const std::vector<std::string>& extra, const std::string& what) {
  UniqueFd fd(::openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(errno, what);
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) return FailedPrecondition(what + " is in use by a running mount");
    return ErrnoStatus(errno, "flock " + what);
  }
  struct stat st, now;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(errno, "stat " + what);
  if (::fstatat(dir_fd, name.c_str(), &now, AT_SYMLINK_NOFOLLOW) != 0 || now.st_ino != st.st_ino) {
    return FailedPrecondition(what + " changed while it was being removed");
  }
  uint64_t freed = DiskBytes(st);
  for (const std::string& x : extra) {
    struct stat xs;
    if (::fstatat(dir_fd, x.c_str(), &xs, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(xs.st_mode) &&
        ::unlinkat(dir_fd, x.c_str(), 0) == 0) {
      freed += DiskBytes(xs);
    }
  }
  if (::unlinkat(dir_fd, name.c_str(), 0) != 0) return ErrnoStatus(errno, "remove " + what);
  return freed;  // the lock goes with fd, after the name is gone
}

}  // namespace

StatusOr<std::vector<BlobEntry>> ListCacheBlobs(const std::string& dir) {
  ASSIGN_OR_RETURN(UniqueFd blobs, OpenSub(dir, "blobs"));
  ASSIGN_OR_RETURN(UniqueFd partial, OpenSub(dir, "partial"));
  std::vector<BlobEntry> out;
  Digest d;
  for (const std::string& name : ListDirAt(blobs.get())) {
    if (!ParseBlobName(name, &d)) continue;
    if (auto e = StatComplete(blobs.get(), d); e.ok()) out.push_back(*e);
  }
  for (const std::string& name : ListDirAt(partial.get())) {
    if (!ParseBlobName(name, &d)) continue;  // skips .state and .tmp
    if (auto e = StatPartial(partial.get(), d); e.ok()) out.push_back(*e);
  }
  return out;
}

StatusOr<BlobEntry> StatCacheBlob(const std::string& dir, const Digest& digest) {
  ASSIGN_OR_RETURN(UniqueFd blobs, OpenSub(dir, "blobs"));
  if (auto e = StatComplete(blobs.get(), digest); e.ok()) return e;
  ASSIGN_OR_RETURN(UniqueFd partial, OpenSub(dir, "partial"));
  auto e = StatPartial(partial.get(), digest);
  if (!e.ok() && e.status().code() == Code::kNotFound) {
    return NotFound("blob " + digest.Short() + " is not in the cache");
  }
  return e;
}

StatusOr<std::vector<ManifestEntry>> ListCacheManifests(const std::string& dir) {
  ASSIGN_OR_RETURN(UniqueFd root, OpenSub(dir, "manifests"));
  std::vector<ManifestEntry> out;
  // host/ns/model/tag: three directory levels, then files.
  std::vector<std::pair<UniqueFd, std::string>> level;
  level.emplace_back(std::move(root), "");
  for (int depth = 0; depth < 3; ++depth) {
    std::vector<std::pair<UniqueFd, std::string>> next;
    for (auto& [fd, prefix] : level) {
      for (const std::string& name : ListDirAt(fd.get())) {
        auto sub = OpenDirAt(fd.get(), name, /*create=*/false);
        if (sub.ok()) next.emplace_back(std::move(*sub), prefix + name + "/");
      }
    }
    level = std::move(next);
  }
  for (auto& [fd, prefix] : level) {
    for (const std::string& name : ListDirAt(fd.get())) {
      struct stat st;
      if (::fstatat(fd.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 ||
          !S_ISREG(st.st_mode)) {
        continue;
      }
      auto bytes = ReadFileAt(fd.get(), name, 64 << 20);
      if (!bytes.ok()) continue;
      out.push_back({prefix + name, std::move(*bytes), st.st_mtime});
    }
  }
  std::sort(out.begin(), out.end(),
            [](const ManifestEntry& a, const ManifestEntry& b) { return a.key < b.key; });
  return out;
}

StatusOr<uint64_t> RemoveCacheBlob(const std::string& dir, const Digest& digest) {
  ASSIGN_OR_RETURN(UniqueFd blobs, OpenSub(dir, "blobs"));
  ASSIGN_OR_RETURN(UniqueFd partial, OpenSub(dir, "partial"));
  const std::string name = digest.FileName();
  uint64_t freed = 0;
  bool found = false;
  struct stat st;
  if (::fstatat(blobs.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    found = true;
    ASSIGN_OR_RETURN(uint64_t n, RemoveLocked(blobs.get(), name, {}, "blobs/" + name));
    freed += n;
  }
  if (::fstatat(partial.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    found = true;
    ASSIGN_OR_RETURN(
        uint64_t n,
        RemoveLocked(partial.get(), name, {name + ".state", name + ".chunks"}, "partial/" + name));
    freed += n;
  } else {
    for (const std::string& orphan : {name + ".state", name + ".chunks"}) {  // without data
      if (::fstatat(partial.get(), orphan.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
          ::unlinkat(partial.get(), orphan.c_str(), 0) == 0) {
        found = true;
        freed += DiskBytes(st);
      }
    }
  }
  if (!found) return NotFound("blob " + digest.Short() + " is not in the cache");
  return freed;
}

StatusOr<uint64_t> RemoveCacheManifest(const std::string& dir, const std::string& key) {
  std::vector<std::string> parts;
  size_t pos = 0;
  while (true) {
    size_t slash = key.find('/', pos);
    parts.push_back(key.substr(pos, slash == std::string::npos ? std::string::npos : slash - pos));
    if (slash == std::string::npos) break;
    pos = slash + 1;
  }
  if (parts.size() != 4) return InvalidArgument("bad manifest key " + key);
  std::vector<UniqueFd> fds;
  ASSIGN_OR_RETURN(UniqueFd root, OpenSub(dir, "manifests"));
  fds.push_back(std::move(root));
  for (int i = 0; i < 3; ++i) {
    auto sub = OpenDirAt(fds.back().get(), parts[i], /*create=*/false);
    if (!sub.ok()) return NotFound("no manifest for " + key);
    fds.push_back(std::move(*sub));
  }
  struct stat st;
  if (::fstatat(fds.back().get(), parts[3].c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return NotFound("no manifest for " + key);
  }
  if (::unlinkat(fds.back().get(), parts[3].c_str(), 0) != 0) {
    return ErrnoStatus(errno, "remove manifest " + key);
  }
  // Empty parents go too (rmdir fails harmlessly on a non-empty one).
  for (int i = 2; i >= 0; --i) {
    if (::unlinkat(fds[i].get(), parts[i].c_str(), AT_REMOVEDIR) != 0) break;
  }
  return DiskBytes(st);
}

Status VerifyCacheBlob(const std::string& dir, const Digest& digest) {
  ASSIGN_OR_RETURN(UniqueFd blobs, OpenSub(dir, "blobs"));
  const std::string name = digest.FileName();
  UniqueFd fd(::openat(blobs.get(), name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(errno, "open blobs/" + name);
  Sha256 sha;
  std::vector<char> buf(1 << 20);
  while (true) {
    ssize_t n = ::read(fd.get(), buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "read blobs/" + name);
    }
    if (n == 0) break;
    sha.Update(buf.data(), static_cast<size_t>(n));
  }
  Digest got = sha.Peek();
  if (got != digest) return DataLoss("blobs/" + name + " hashes to " + got.ToString());
  return Status::Ok();
}

uint64_t CacheDiskBytes(const std::string& dir) {
  uint64_t total = 0;
  for (const char* sub : {"blobs", "partial"}) {
    auto fd = OpenSub(dir, sub);
    if (!fd.ok()) continue;
    for (const std::string& name : ListDirAt(fd->get())) {
      struct stat st;
      if (::fstatat(fd->get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
          S_ISREG(st.st_mode)) {
        total += DiskBytes(st);
      }
    }
  }
  return total;
}

uint64_t RemoveStaleCacheTemps(const std::string& dir, double max_age_s) {
  auto partial = OpenSub(dir, "partial");
  if (!partial.ok()) return 0;
  const time_t cutoff = ::time(nullptr) - static_cast<time_t>(max_age_s);
  uint64_t freed = 0;
  for (const std::string& name : ListDirAt(partial->get())) {
    if (name.size() < 4 || name.substr(name.size() - 4) != ".tmp") continue;
    struct stat st;
    if (::fstatat(partial->get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISREG(st.st_mode) && st.st_mtime < cutoff &&
        ::unlinkat(partial->get(), name.c_str(), 0) == 0) {
      freed += DiskBytes(st);
    }
  }
  return freed;
}

}  // namespace modelfs::cache
