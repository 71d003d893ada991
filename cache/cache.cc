// Cache: directory layout, manifests, and the digest → Blob map. See cache.h for the contract and
// blob.h for the thread and lock notes. Cache::mu_ guards only the map; it is held while a Blob
// is created (file opens, flock, state load) so two OpenBlob calls never race on one partial.
#include "cache/cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <ctime>
#include <map>
#include <mutex>

#include "base/log.h"
#include "base/metrics.h"
#include "cache/blob.h"
#include "cache/file_util.h"

namespace modelfs::cache {
namespace {

// The brief said 350, but each component is a file name: NAME_MAX (255) is the real bound.
constexpr size_t kMaxComponent = 255;
constexpr size_t kMaxManifest = 64 << 20;

bool ValidComponent(std::string_view c) {
  return !c.empty() && c.size() <= kMaxComponent && c != "." && c != ".." &&
         c.find('/') == std::string_view::npos && c.find('\0') == std::string_view::npos;
}

StatusOr<std::vector<std::string>> SplitKey(const std::string& key) {
  std::vector<std::string> parts;
  size_t pos = 0;
  while (true) {
    size_t slash = key.find('/', pos);
    parts.push_back(key.substr(pos, slash == std::string::npos ? std::string::npos : slash - pos));
    if (slash == std::string::npos) break;
    pos = slash + 1;
  }
  if (parts.size() != 4) {
    return InvalidArgument("manifest key must be <host>/<ns>/<model>/<tag>: " + key.substr(0, 200));
  }
  for (const std::string& p : parts) {
    if (!ValidComponent(p)) return InvalidArgument("bad manifest key: " + key.substr(0, 200));
  }
  return parts;
}

// Temp files (state and manifest writes) left by a crash. Only old ones: another live process
// may be writing a fresh one right now.
void RemoveStaleTemps(int partial_fd) {
  int fd = ::openat(partial_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    ::close(fd);
    return;
  }
  const time_t cutoff = ::time(nullptr) - 3600;
  std::vector<std::string> stale;
  while (struct dirent* e = ::readdir(d)) {
    std::string_view name = e->d_name;
    if (name.size() < 4 || name.substr(name.size() - 4) != ".tmp") continue;
    struct stat st;
    if (::fstatat(partial_fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_mtime < cutoff) {
      stale.emplace_back(name);
    }
  }
  ::closedir(d);
  for (const std::string& name : stale) ::unlinkat(partial_fd, name.c_str(), 0);
}

// Regular files in dir_fd: (name, stat).
std::vector<std::pair<std::string, struct stat>> FilesIn(int dir_fd) {
  std::vector<std::pair<std::string, struct stat>> out;
  for (std::string& name : ListDirAt(dir_fd)) {
    struct stat st;
    if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode)) {
      out.emplace_back(std::move(name), st);
    }
  }
  return out;
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// One eviction pass (worker thread). See QueueEviction in blob.h.
void EvictPass(Core* core) {
  core->evict_queued = false;
  const uint64_t max = core->options.max_bytes;
  uint64_t total = 0;
  struct Candidate {
    std::string name;
    uint64_t size;
    struct timespec used;
    ino_t ino;
  };
  std::vector<Candidate> complete;
  for (auto& [name, st] : FilesIn(core->blobs_fd.get())) {
    total += static_cast<uint64_t>(st.st_size);
    if (name.rfind("sha256-", 0) == 0) {
      complete.push_back({name, static_cast<uint64_t>(st.st_size), st.st_atim, st.st_ino});
    }
  }
  for (auto& [name, st] : FilesIn(core->partial_fd.get())) {
    if (!EndsWith(name, ".state") && !EndsWith(name, ".tmp")) total += st.st_size;
  }
  if (total <= max) {
    core->over_limit_logged = false;
    return;
  }
  std::sort(complete.begin(), complete.end(), [](const Candidate& a, const Candidate& b) {
    return a.used.tv_sec != b.used.tv_sec ? a.used.tv_sec < b.used.tv_sec
                                          : a.used.tv_nsec < b.used.tv_nsec;
  });
  const int blobs = core->blobs_fd.get();
  for (const Candidate& c : complete) {
    if (total <= max) break;
    UniqueFd fd(::openat(blobs, c.name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd.valid()) continue;
    // Every Blob (of any process) holds a lock on its fd: a taken lock means "open".
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) continue;
    struct stat st;
    if (::fstat(fd.get(), &st) != 0 || st.st_ino != c.ino) continue;
    if (::unlinkat(blobs, c.name.c_str(), 0) != 0) continue;
    total -= std::min(total, c.size);
    metrics::CacheEvictions().Add();
    LOG(kInfo) << "evicted blobs/" << c.name << " (" << c.size
               << " bytes, least recently used) to stay under --cache-max " << max;
  }
  if (total > max && !core->over_limit_logged.exchange(true)) {
    LOG(kWarn) << "cache holds " << total << " bytes, over --cache-max " << max
               << ", but every other blob is open or still being fetched";
  }
}

class CacheImpl final : public Cache {
 public:
  explicit CacheImpl(std::shared_ptr<Core> core) : core_(std::move(core)) {}
  ~CacheImpl() override { Shutdown(); }

  const std::string& dir() const override { return core_->dir; }
  Status PutManifest(const std::string& key, std::string_view bytes) override;
  StatusOr<std::string> GetManifest(const std::string& key) override;
  std::vector<std::string> ListManifests() override;
  StatusOr<std::shared_ptr<Blob>> OpenBlob(const fetch::BlobLocation& where) override;
  bool HasBlob(const Digest& digest) override;
  std::vector<BlobStatus> ListBlobs() override;
  void Shutdown() override;
  void OnBytesReplaced(ReplacedFn fn) override {
    auto held = fn ? std::make_shared<const ReplacedFn>(std::move(fn)) : nullptr;
    std::lock_guard<std::mutex> l(core_->replaced_mu);
    core_->replaced = std::move(held);
  }

 private:
  void List(int dir_fd, int depth, const std::string& prefix, std::vector<std::string>* out);

  const std::shared_ptr<Core> core_;
  std::atomic<uint64_t> tmp_counter_{0};
  std::mutex mu_;
  std::map<Digest, std::weak_ptr<BlobImpl>> blobs_;  // GUARDED_BY(mu_)
  bool shut_down_ = false;                           // GUARDED_BY(mu_)
};

Status CacheImpl::PutManifest(const std::string& key, std::string_view bytes) {
  ASSIGN_OR_RETURN(auto parts, SplitKey(key));
  UniqueFd dir;
  int at = core_->manifests_fd.get();
  for (int i = 0; i < 3; ++i) {
    ASSIGN_OR_RETURN(dir, OpenDirAt(at, parts[i], /*create=*/true));
    at = dir.get();
  }
  // The temp lives in partial/ (same filesystem), so manifests/ only ever holds whole files.
  const std::string tmp = "manifest-" + std::to_string(::getpid()) + "-" +
                          std::to_string(tmp_counter_.fetch_add(1)) + ".tmp";
  RETURN_IF_ERROR(
      WriteFileAtomicAt(at, parts[3], core_->partial_fd.get(), tmp, bytes).Annotate(key));
  return FsyncFd(at, "manifests/" + key);
}

StatusOr<std::string> CacheImpl::GetManifest(const std::string& key) {
  ASSIGN_OR_RETURN(auto parts, SplitKey(key));
  UniqueFd dir;
  int at = core_->manifests_fd.get();
  for (int i = 0; i < 3; ++i) {
    auto d = OpenDirAt(at, parts[i], /*create=*/false);
    if (!d.ok()) {
      if (d.status().code() == Code::kNotFound) return NotFound("no manifest for " + key);
      return d.status();
    }
    dir = std::move(d).value();
    at = dir.get();
  }
  auto text = ReadFileAt(at, parts[3], kMaxManifest);
  if (!text.ok() && text.status().code() == Code::kNotFound) {
    return NotFound("no manifest for " + key);
  }
  return text;
}

void CacheImpl::List(int dir_fd, int depth, const std::string& prefix,
                     std::vector<std::string>* out) {
  std::vector<std::string> names = ListDirAt(dir_fd);
  std::erase_if(names, [](const std::string& n) { return !ValidComponent(n); });
  for (const std::string& name : names) {
    const std::string key = prefix.empty() ? name : prefix + "/" + name;
    if (depth == 3) {
      struct stat st;
      if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode)) {
        out->push_back(key);
      }
      continue;
    }
    auto sub = OpenDirAt(dir_fd, name, /*create=*/false);  // skips symlinks and files
    if (sub.ok()) List(sub->get(), depth + 1, key, out);
  }
}

std::vector<std::string> CacheImpl::ListManifests() {
  std::vector<std::string> out;
  List(core_->manifests_fd.get(), 0, "", &out);
  std::sort(out.begin(), out.end());
  return out;
}

StatusOr<std::shared_ptr<Blob>> CacheImpl::OpenBlob(const fetch::BlobLocation& where) {
  std::lock_guard<std::mutex> l(mu_);
  if (shut_down_) return Cancelled("cache is shut down");
  std::erase_if(blobs_, [](const auto& kv) { return kv.second.expired(); });
  if (auto it = blobs_.find(where.digest); it != blobs_.end()) {
    if (auto live = it->second.lock()) {
      if (live->size() != where.size) {
        return InvalidArgument("blob " + where.digest.ToString() + " opened with size " +
                               std::to_string(where.size) + ", already open with size " +
                               std::to_string(live->size()));
      }
      return std::shared_ptr<Blob>(std::move(live));
    }
  }
  {
    std::lock_guard<std::mutex> p(core_->pin_mu);
    auto bad = core_->recent_failures.find(where.digest);
    if (bad != core_->recent_failures.end()) {
      if (std::chrono::steady_clock::now() < bad->second.second) return bad->second.first;
      core_->recent_failures.erase(bad);
    }
  }
  ASSIGN_OR_RETURN(auto blob, BlobImpl::Create(core_, where));
  blobs_[where.digest] = blob;
  QueueEviction(core_);  // after Create: a new partial counts, so room is made for it
  return std::shared_ptr<Blob>(std::move(blob));
}

bool CacheImpl::HasBlob(const Digest& digest) {
  struct stat st;
  return ::fstatat(core_->blobs_fd.get(), digest.FileName().c_str(), &st, AT_SYMLINK_NOFOLLOW) ==
             0 &&
         S_ISREG(st.st_mode);
}

std::vector<BlobStatus> CacheImpl::ListBlobs() {
  std::vector<std::shared_ptr<BlobImpl>> live;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [digest, weak] : blobs_) {
      if (auto b = weak.lock()) live.push_back(std::move(b));
    }
  }
  std::vector<BlobStatus> out;
  for (auto& b : live) out.push_back(b->GetStatus());
  live.clear();  // may drop the last reference: no cache lock held here
  return out;
}

void CacheImpl::Shutdown() {
  std::vector<std::shared_ptr<BlobImpl>> live;
  {
    std::lock_guard<std::mutex> l(mu_);
    shut_down_ = true;
    for (auto& [digest, weak] : blobs_) {
      if (auto b = weak.lock()) live.push_back(std::move(b));
    }
  }
  for (auto& b : live) b->Shutdown();
  live.clear();
  std::map<Digest, std::shared_ptr<BlobImpl>> pinned;
  {
    std::lock_guard<std::mutex> p(core_->pin_mu);
    pinned.swap(core_->pinned);
  }
  pinned.clear();  // breaks the Core ↔ Blob cycle; shut down above, so this only persists
  core_->chunker.Stop();
  core_->worker.Stop();
  core_->syncer.Stop();
}

}  // namespace

void QueueEviction(const std::shared_ptr<Core>& core) {
  if (core->options.max_bytes == 0 || core->evict_queued.exchange(true)) return;
  std::weak_ptr<Core> weak = core;
  if (!core->worker.Post([weak] {
        if (auto c = weak.lock()) EvictPass(c.get());
      })) {
    core->evict_queued = false;
  }
}

std::string_view BlobStateName(BlobState s) {
  switch (s) {
    case BlobState::kMissing:
      return "missing";
    case BlobState::kFetching:
      return "fetching";
    case BlobState::kVerified:
      return "verified";
    case BlobState::kFailed:
      return "failed";
  }
  return "unknown";
}

StatusOr<std::unique_ptr<Cache>> Cache::Open(const std::string& dir, fetch::Fetcher* fetcher,
                                             CacheOptions options) {
  if (dir.empty()) return InvalidArgument("empty cache directory");
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoStatus(errno, "create cache directory " + dir);
  }
  auto core = std::make_shared<Core>();
  core->dir = dir;
  core->fetcher = fetcher;
  core->options = options;
  auto open = [&](int at, const std::string& name, UniqueFd* out) -> Status {
    auto fd = OpenDirAt(at, name, /*create=*/at != AT_FDCWD);
    if (!fd.ok()) return fd.status().Annotate("cache directory " + dir);
    *out = std::move(fd).value();
    return Status::Ok();
  };
  RETURN_IF_ERROR(open(AT_FDCWD, dir, &core->dir_fd));
  RETURN_IF_ERROR(open(core->dir_fd.get(), "blobs", &core->blobs_fd));
  RETURN_IF_ERROR(open(core->dir_fd.get(), "partial", &core->partial_fd));
  RETURN_IF_ERROR(open(core->dir_fd.get(), "manifests", &core->manifests_fd));
  RemoveStaleTemps(core->partial_fd.get());
  return std::unique_ptr<Cache>(new CacheImpl(std::move(core)));
}

}  // namespace modelfs::cache
