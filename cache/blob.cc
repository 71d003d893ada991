#include "cache/blob.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <future>

#include "base/log.h"
#include "cache/file_util.h"
#include "cache/state_file.h"

namespace modelfs::cache {
namespace {

constexpr size_t kHashChunk = 1 << 20;                      // pread size for the hasher
constexpr uint64_t kHashStepBytes = 64ull << 20;            // per HashStep, so blobs take turns
// Resume state is saved after every piece's worth of new bytes (at most every 100 ms), and at
// least every second: a crash loses about one part, not seconds of download.
constexpr uint64_t kMinPersistBytes = 4ull << 20;
constexpr uint64_t kMaxPersistBytes = 256ull << 20;
constexpr auto kMinPersistGap = std::chrono::milliseconds(100);
constexpr auto kPersistInterval = std::chrono::seconds(1);
constexpr std::string_view kDiskFull = "paused: cache disk full";
constexpr uint64_t kRoomAgainBytes = 8ull << 20;
constexpr size_t kMaxStateFile = 64 << 20;
constexpr size_t kMaxChunksFile = 128 << 20;  // kMaxChunks lines of up to ~110 bytes
// A chunk is re-fetched at most this often after a mismatch before its digests are distrusted.
constexpr uint8_t kMaxChunkRefetches = 3;
constexpr auto kRememberFailure = std::chrono::seconds(60);  // a known-bad blob fails at once

// The data regions of fd inside [begin, end), by SEEK_DATA/SEEK_HOLE. A filesystem without hole
// reporting calls the whole file data, which is the conservative-enough answer (the digest still
// catches anything wrong).
RangeSet DataIn(int fd, uint64_t begin, uint64_t end) {
  RangeSet out;
  uint64_t pos = begin;
  while (pos < end) {
    off_t d = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (d < 0) {
      if (errno != ENXIO) out.Add(pos, end);  // ENXIO: only a hole after pos
      break;
    }
    if (static_cast<uint64_t>(d) >= end) break;
    off_t h = ::lseek(fd, d, SEEK_HOLE);
    uint64_t stop = h < 0 ? end : std::min<uint64_t>(static_cast<uint64_t>(h), end);
    out.Add(static_cast<uint64_t>(d), stop);
    pos = stop;
  }
  return out;
}

// Repair mode's write: only bytes that differ from what is on disk are written. Sets
// *changed_from to the first differing offset (untouched when nothing differs) and adds the
// number of bytes between the first and last difference to *changed.
Status CompareAndWrite(int fd, const void* data, size_t len, uint64_t offset,
                       uint64_t* changed_from, uint64_t* changed) {
  thread_local std::vector<char> old;
  old.resize(len);
  RETURN_IF_ERROR(PreadFull(fd, old.data(), len, offset));
  const char* p = static_cast<const char*>(data);
  size_t first = 0;
  while (first < len && old[first] == p[first]) ++first;
  if (first == len) return Status::Ok();
  size_t last = len;
  while (last > first && old[last - 1] == p[last - 1]) --last;
  *changed_from = offset + first;
  *changed += last - first;
  return PwriteFull(fd, p + first, last - first, offset + first);
}

bool Overlaps(const RangeSet& set, uint64_t begin, uint64_t end) {
  uint64_t missing = 0;
  for (const ByteRange& r : set.Missing(begin, end)) missing += r.size();
  return missing < end - begin;
}

// The index of the chunk holding offset (chunks sorted, contiguous from 0).
template <typename Info>
size_t ChunkAt(const std::vector<Info>& chunks, uint64_t offset) {
  auto it = std::upper_bound(chunks.begin(), chunks.end(), offset,
                             [](uint64_t off, const Info& c) { return off < c.chunk.begin; });
  return it == chunks.begin() ? 0 : static_cast<size_t>(it - chunks.begin()) - 1;
}

}  // namespace

void TouchLastUse(int fd) {
  const struct timespec times[2] = {{0, UTIME_NOW}, {0, UTIME_OMIT}};  // atime only
  ::futimens(fd, times);
}

// ---------------------------------------------------------------------------------------------
// Worker

Worker::Worker(const char* name) : name_(name) {
  thread_ = std::thread([this] { Run(); });
}

Worker::~Worker() { Stop(); }

bool Worker::Post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_) return false;
    tasks_.push_back(std::move(task));
  }
  cv_.notify_one();
  return true;
}

void Worker::Register(std::weak_ptr<BlobImpl> blob) {
  std::lock_guard<std::mutex> l(mu_);
  ticked_.push_back(std::move(blob));
}

void Worker::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (!thread_.joinable()) return;
  if (thread_.get_id() == std::this_thread::get_id()) {
    thread_.detach();  // the last Blob died on this thread after its Cache: nothing left to run
    return;
  }
  thread_.join();
  std::deque<std::function<void()>> rest;
  {
    std::lock_guard<std::mutex> l(mu_);
    rest.swap(tasks_);
    ticked_.clear();
  }
}

void Worker::Run() {
  pthread_setname_np(pthread_self(), name_);
  auto next_tick = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  std::unique_lock<std::mutex> l(mu_);
  while (!stop_) {
    if (tasks_.empty()) {
      cv_.wait_until(l, next_tick, [&] { return stop_ || !tasks_.empty(); });
      if (stop_) break;
    }
    if (!tasks_.empty()) {
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      l.unlock();
      task();
      task = nullptr;  // whatever it captured dies here, on this thread, unlocked
      l.lock();
    }
    if (std::chrono::steady_clock::now() >= next_tick) {
      next_tick = std::chrono::steady_clock::now() + std::chrono::seconds(1);
      std::vector<std::shared_ptr<BlobImpl>> live;
      std::erase_if(ticked_, [&](const std::weak_ptr<BlobImpl>& w) {
        auto b = w.lock();
        if (!b) return true;
        live.push_back(std::move(b));
        return false;
      });
      l.unlock();
      for (auto& b : live) b->Tick();
      live.clear();
      l.lock();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// BlobImpl: creation and ownership

BlobImpl::BlobImpl(std::shared_ptr<Core> core, const fetch::BlobLocation& where)
    : core_(std::move(core)),
      where_(where),
      name_(where.digest.FileName()),
      state_name_(where.digest.FileName() + ".state"),
      chunks_name_(where.digest.FileName() + ".chunks") {
  piece_size_ = core_->options.piece_size;
  buf_.resize(kHashChunk);
  last_persist_ = Clock::now();
}

StatusOr<std::shared_ptr<BlobImpl>> BlobImpl::Create(std::shared_ptr<Core> core,
                                                     const fetch::BlobLocation& where) {
  std::shared_ptr<BlobImpl> blob(new BlobImpl(std::move(core), where));
  {
    std::lock_guard<std::mutex> h(blob->hash_mu_);
    RETURN_IF_ERROR(blob->AcquireLocked());
  }
  bool partial;
  {
    std::lock_guard<std::mutex> l(blob->mu_);
    partial = blob->state_ == BlobState::kFetching;
  }
  if (partial) {
    blob->core_->worker.Register(blob);
    blob->PostHashStep();  // resumed data past the frontier, or an empty blob, commit at once
  }
  return blob;
}

BlobImpl::~BlobImpl() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (state_ == BlobState::kVerified && fd_.valid()) TouchLastUse(fd_.get());  // last close
  }
  Shutdown();
  std::lock_guard<std::mutex> h(hash_mu_);
  if (!in_locked_) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    fd_.Reset();  // releases the flock (old_fds_ never hold it)
  }
  {
    std::lock_guard<std::mutex> k(core_->lock_mu);
    core_->locked.erase(where_.digest);
  }
  core_->lock_cv.notify_all();
}

Status BlobImpl::AcquireLocked() {
  const int blobs = core_->blobs_fd.get(), partial = core_->partial_fd.get();
  for (int attempt = 0; attempt < 4; ++attempt) {
    // 1. A committed blob of the right size: nothing to fetch.
    UniqueFd done(::openat(blobs, name_.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (done.valid()) {
      struct stat st;
      if (::fstat(done.get(), &st) != 0) return ErrnoStatus(errno, "stat blobs/" + name_);
      if (S_ISREG(st.st_mode) && static_cast<uint64_t>(st.st_size) == where_.size) {
        // A crash between commit and state removal leaves an orphan; harmless, tidy it.
        ::unlinkat(partial, state_name_.c_str(), 0);
        ::unlinkat(partial, chunks_name_.c_str(), 0);
        // In use: --cache-max never evicts a blob someone holds a lock on. Fails (harmlessly)
        // while the process that committed it still holds its exclusive lock.
        ::flock(done.get(), LOCK_SH | LOCK_NB);
        TouchLastUse(done.get());
        std::lock_guard<std::mutex> l(mu_);
        if (fd_.valid()) old_fds_.push_back(std::move(fd_));
        fd_ = std::move(done);
        state_ = BlobState::kVerified;
        owner_ = false;
        frontier_ = where_.size;
        return Status::Ok();
      }
      LOG(kWarn) << "ignoring blobs/" << name_ << ": not a regular file of " << where_.size
                 << " bytes; fetching it again";
    } else if (errno == ELOOP) {
      return FailedPrecondition("blobs/" + name_ + " is a symlink; refusing to follow it");
    } else if (errno != ENOENT) {
      return ErrnoStatus(errno, "open blobs/" + name_);
    }

    // 2. The partial file; whoever holds its flock fetches it.
    UniqueFd fd(::openat(partial, name_.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (!fd.valid()) {
      if (errno == ELOOP) {
        return FailedPrecondition("partial/" + name_ + " is a symlink; refusing to follow it");
      }
      return ErrnoStatus(errno, "open partial/" + name_);
    }
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(errno, "stat partial/" + name_);
    if (!S_ISREG(st.st_mode)) return FailedPrecondition("partial/" + name_ + " is not a file");
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK) return ErrnoStatus(errno, "flock partial/" + name_);
      {
        // Held by a Blob of ours that is being destroyed: wait for it, then try again.
        std::unique_lock<std::mutex> k(core_->lock_mu);
        if (core_->locked.count(where_.digest) != 0) {
          if (!core_->lock_cv.wait_for(k, std::chrono::seconds(60),
                                       [&] { return core_->locked.count(where_.digest) == 0; })) {
            return Unavailable("blob " + where_.digest.Short() + " is still being closed");
          }
          continue;
        }
      }
      // Another process is fetching this blob; Tick() retries until it commits or goes away.
      std::lock_guard<std::mutex> l(mu_);
      if (!owner_ && state_ == BlobState::kMissing) {
        LOG(kInfo) << "blob " << where_.digest.Short()
                   << " is being fetched by another process; waiting for it";
      }
      state_ = BlobState::kFetching;
      owner_ = false;
      return Status::Ok();
    }
    // We hold the lock, but on the right file? The holder before us may have committed
    // (renamed it to blobs/) or discarded it (unlinked) while we waited.
    struct stat now;
    if (::fstatat(partial, name_.c_str(), &now, AT_SYMLINK_NOFOLLOW) != 0 ||
        now.st_ino != st.st_ino || now.st_dev != st.st_dev) {
      continue;
    }
    if (::faccessat(blobs, name_.c_str(), F_OK, AT_SYMLINK_NOFOLLOW) == 0) {
      struct stat bst;
      if (::fstatat(blobs, name_.c_str(), &bst, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(bst.st_mode) &&
          static_cast<uint64_t>(bst.st_size) == where_.size) {
        ::unlinkat(partial, name_.c_str(), 0);  // committed meanwhile: our partial is stale
        continue;
      }
    }
    if (static_cast<uint64_t>(st.st_size) != where_.size &&
        ::ftruncate(fd.get(), static_cast<off_t>(where_.size)) != 0) {
      return ErrnoStatus(errno, "truncate partial/" + name_);
    }
    {
      std::lock_guard<std::mutex> k(core_->lock_mu);
      core_->locked.insert(where_.digest);
      in_locked_ = true;
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      if (fd_.valid()) old_fds_.push_back(std::move(fd_));
      fd_ = std::move(fd);
      owner_ = true;
      state_ = BlobState::kFetching;
    }
    LoadStateLocked();
    return Status::Ok();
  }
  return Unavailable("partial/" + name_ + " keeps changing under us");
}

void BlobImpl::LoadStateLocked() {
  const std::string what = "state file for " + where_.digest.Short();
  RangeSet present, verified;
  std::map<uint64_t, uint32_t> suspects;
  uint64_t frontier = 0;
  Sha256 sha;
  std::map<uint64_t, Sha256> checkpoints;
  auto text = ReadFileAt(core_->partial_fd.get(), state_name_, kMaxStateFile);
  if (!text.ok()) {
    if (text.status().code() != Code::kNotFound) {
      LOG(kWarn) << "ignoring " << what << ": " << text.status().ToString();
    }
  } else if (auto st = DecodeState(*text, where_.digest, where_.size); !st.ok()) {
    LOG(kWarn) << "ignoring " << what << ": " << st.status().ToString()
               << "; fetching the blob from the start";
  } else {
    int fd;
    {
      std::lock_guard<std::mutex> l(mu_);
      fd = fd_.get();
    }
    // Never trust a claim blindly: a claimed range must be data on disk, not a hole.
    for (const ByteRange& r : st->present.Ranges()) {
      RangeSet data = DataIn(fd, r.begin, r.end);
      for (const ByteRange& d : data.Ranges()) present.Add(d);
    }
    suspects = st->suspects;
    verified = st->verified;  // only what is still present (holes were dropped above)
    for (const ByteRange& r : st->verified.Ranges()) {
      for (const ByteRange& hole : present.Missing(r.begin, r.end))
        verified.Remove(hole.begin, hole.end);
    }
    if (present.TotalBytes() != st->present.TotalBytes()) {
      LOG(kWarn) << what << " claims " << st->present.TotalBytes() - present.TotalBytes()
                 << " bytes that are holes on disk; fetching them again";
    }
    if (st->hash_reset) {
      LOG(kWarn) << what << ": saved hash state is unusable here; hashing from the start";
    } else if (st->frontier <= present.PrefixEnd()) {
      frontier = st->frontier;
      sha = *Sha256::LoadState(st->sha_state);  // DecodeState checked it loads
      for (const auto& [off, state] : st->checkpoints) {
        checkpoints.emplace(off, *Sha256::LoadState(state));  // so did these
      }
    } else {
      LOG(kWarn) << what << ": hashed prefix has holes; hashing from the start";
    }
    LOG(kDebug) << "resuming " << where_.digest.Short() << ": " << present.TotalBytes() << " of "
                << where_.size << " bytes present, hashed to " << frontier;
  }
  // The chunk digests asked for before, if any: verified ranges mean nothing without them.
  std::vector<fetch::Chunk> chunks;
  if (auto list = ReadFileAt(core_->partial_fd.get(), chunks_name_, kMaxChunksFile); list.ok()) {
    if (auto parsed = fetch::ParseChunksums(*list, where_.size); parsed.ok()) {
      chunks = std::move(parsed).value();
    } else {
      LOG(kWarn) << "ignoring partial/" << chunks_name_ << ": " << parsed.status().ToString();
    }
  }
  if (chunks.empty()) verified.Clear();
  sha_ = sha;
  checkpoints_ = std::move(checkpoints);  // may lack some (other piece size): repair copes
  std::lock_guard<std::mutex> l(mu_);
  present_ = std::move(present);
  verified_ = std::move(verified);
  const uint64_t piece = PieceSize();
  const size_t pieces = static_cast<size_t>((where_.size + piece - 1) / piece);
  trouble_.assign(pieces, 0);
  for (const auto& [off, troubles] : suspects) trouble_[off / piece] += troubles;  // any piece size
  frontier_ = frontier;
  dirty_ = false;
  unpersisted_bytes_ = 0;
  if (!chunks.empty()) {
    chunks_asked_ = true;
    SetChunksLocked(std::move(chunks));
  }
}

// ---------------------------------------------------------------------------------------------
// Readers

void BlobImpl::Materialize() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != BlobState::kFetching || shutdown_ || core_->options.lazy) return;
    materialize_ = true;
  }
  // Keep fetching (or waiting on another process) after the last reader closes.
  Pin();
  bool done;
  {
    std::lock_guard<std::mutex> l(mu_);
    done = state_ != BlobState::kFetching || shutdown_;
  }
  if (done) {
    Unpin();  // finished meanwhile; the caller's reference keeps us alive here
    return;
  }
  EnsureFetch(/*full=*/true, {});  // a no-op while another process owns the blob
}

void BlobImpl::Pin() {
  std::lock_guard<std::mutex> p(core_->pin_mu);
  core_->pinned.try_emplace(where_.digest, shared_from_this());
}

std::shared_ptr<BlobImpl> BlobImpl::Unpin() {
  std::lock_guard<std::mutex> p(core_->pin_mu);
  auto it = core_->pinned.find(where_.digest);
  if (it == core_->pinned.end() || it->second.get() != this) return nullptr;
  auto blob = std::move(it->second);
  core_->pinned.erase(it);
  return blob;
}

void BlobImpl::WhenReadable(uint64_t offset, uint64_t len, ReadyFn ready) {
  const uint64_t size = where_.size;
  const uint64_t begin = std::min(offset, size);
  const uint64_t end = len > size - begin ? size : begin + len;
  const bool strict = core_->options.strict;
  std::vector<ByteRange> demand;
  bool full = false;
  {
    std::unique_lock<std::mutex> l(mu_);
    Status status;
    int fd = fd_.get();
    if (state_ == BlobState::kVerified || begin == end) {
    } else if (state_ == BlobState::kFailed) {
      status = failure_;
      fd = -1;
    } else if (shutdown_) {
      status = Cancelled("cache is shutting down");
      fd = -1;
    } else if (!strict && present_.Contains(begin, end)) {
    } else if (strict && ChunksTrustedLocked() && verified_.Contains(begin, end)) {
    } else {
      waiters_.push_back({begin, end, std::move(ready)});
      if (!owner_) return;  // another process fetches; Tick() picks it up
      demand = present_.Missing(begin, end);
      // Strict readers need the whole blob hashed, so they fetch all of it even when lazy.
      full = strict || (materialize_ && !core_->options.lazy);
      l.unlock();
      EnsureFetch(full, demand);
      return;
    }
    l.unlock();
    ready(status, fd);
  }
}

void BlobImpl::Prefetch(uint64_t offset, uint64_t len) {
  const uint64_t size = where_.size;
  const uint64_t begin = std::min(offset, size);
  const uint64_t end = len > size - begin ? size : begin + len;
  std::vector<ByteRange> demand;
  bool full;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != BlobState::kFetching || shutdown_ || !owner_) return;
    demand = present_.Missing(begin, end);
    if (demand.empty()) return;
    full = core_->options.strict || (materialize_ && !core_->options.lazy);
  }
  EnsureFetch(full, demand);
}

void BlobImpl::EnsureFetch(bool full, const std::vector<ByteRange>& demand) {
  bool no_fetcher = false;
  {
    std::lock_guard<std::mutex> f(fetch_mu_);
    if (fetch_closed_) return;
    std::vector<ByteRange> missing;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!owner_ || state_ != BlobState::kFetching || shutdown_) return;
      if (full) missing = present_.Missing(0, where_.size);
    }
    if (core_->fetcher == nullptr) {
      no_fetcher = true;
    } else if (!fetch_) {
      if (missing.empty() && demand.empty()) return;
      // Start() posts to the loop thread; a Sink call it makes takes mu_, which is not held.
      fetch_ = core_->fetcher->Start(where_, full ? missing : std::vector<ByteRange>{}, this);
      fetch_full_ = full;
      {
        std::lock_guard<std::mutex> l(mu_);
        sink_fetch_ = fetch_.get();
      }
      AskChunksLocked();
    } else if (full && !fetch_full_) {
      // A lazy fetch asked to fetch everything: the Fetch API has no "want", so the rest is
      // demanded, behind what readers demanded before.
      for (const ByteRange& r : missing) fetch_->Demand(r.begin, r.size());
      fetch_full_ = true;
    }
    if (fetch_) {
      for (const ByteRange& r : demand) fetch_->Demand(r.begin, r.size());
    }
  }
  if (no_fetcher) Failed(Unavailable("no registry to fetch " + where_.digest.ToString() + " from"));
}

BlobStatus BlobImpl::GetStatus() const {
  BlobStatus s;
  s.digest = where_.digest;
  s.size = where_.size;
  bool owner;
  {
    std::lock_guard<std::mutex> l(mu_);
    s.state = state_;
    owner = owner_;
    s.bytes_present = state_ == BlobState::kVerified ? where_.size : present_.TotalBytes();
    s.hash_frontier = state_ == BlobState::kVerified ? where_.size : frontier_;
    if (!failure_.ok()) s.last_error = failure_.ToString();
    s.condition = condition_;
    s.bytes_repaired = bytes_repaired_;
    s.chunks = chunks_.size();
    s.chunks_verified =
        static_cast<size_t>(std::count_if(chunks_.begin(), chunks_.end(), [&](const ChunkInfo& c) {
          return c.state == ChunkState::kVerified;
        }));
    if (state_ == BlobState::kVerified) s.chunks_verified = s.chunks;
    s.chunk_refetches = chunk_refetches_;
    s.chunks_distrusted = chunks_distrusted_;
  }
  std::lock_guard<std::mutex> f(fetch_mu_);
  s.fetch = fetch_ ? fetch_->Stats() : last_stats_;
  // A partial blob nobody is fetching (lazy, nothing asked yet) is reported as missing.
  if (s.state == BlobState::kFetching && owner && !fetch_) s.state = BlobState::kMissing;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Sink (fetch loop thread)

Status BlobImpl::Write(uint64_t offset, const void* data, size_t len) {
  if (len == 0) return Status::Ok();
  if (offset > where_.size || len > where_.size - offset) {
    return Internal("write past the end of blob " + where_.digest.Short());
  }
  int fd;
  bool repairing;
  fetch::Fetch* fetch;
  // Where Write compares with the disk: pieces of the write, with the chunk each lies in.
  struct Segment {
    uint64_t begin, end;
    size_t chunk;
    bool compare;
  };
  std::vector<Segment> segments;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!owner_ || state_ != BlobState::kFetching || shutdown_ || closing_) {
      return Cancelled("blob " + where_.digest.Short() + " is no longer being fetched");
    }
    fd = fd_.get();
    repairing = repairing_;
    fetch = sink_fetch_;
    if (!repairing && !compare_.empty() && Overlaps(compare_, offset, offset + len)) {
      // Bytes of a chunk being re-fetched: a write that changes nothing says the bad bytes are
      // what the server serves (see VerifyChunkStep).
      for (size_t i = ChunkAt(chunks_, offset); i < chunks_.size(); ++i) {
        const fetch::Chunk& c = chunks_[i].chunk;
        if (c.begin >= offset + len) break;
        segments.push_back({std::max(c.begin, offset), std::min(c.end, offset + len), i,
                            chunks_[i].state == ChunkState::kRefetching});
      }
    }
  }
  // The Fetch calling us cannot be destroyed before we return (its destructor waits for the
  // loop thread), and Stats() only takes a leaf lock.
  int troubles = 0;
  if (fetch != nullptr) {
    fetch::FetchStats fs = fetch->Stats();
    troubles = fs.retries + fs.stalls + fs.slow_refetches;
  }
  uint64_t changed_from = kNone, changed = 0;
  std::vector<size_t> changed_chunks;
  Status st;
  if (repairing) {
    st = CompareAndWrite(fd, data, len, offset, &changed_from, &changed);
  } else if (segments.empty()) {
    st = PwriteFull(fd, data, len, offset);
  } else {
    const char* p = static_cast<const char*>(data);
    for (const Segment& g : segments) {
      uint64_t from = kNone;
      st = g.compare ? CompareAndWrite(fd, p + (g.begin - offset), g.end - g.begin, g.begin, &from,
                                       &changed)
                     : PwriteFull(fd, p + (g.begin - offset), g.end - g.begin, g.begin);
      if (!st.ok()) break;
      if (from != kNone) changed_chunks.push_back(g.chunk);
    }
  }
  if (!st.ok()) {
    if (st.code() == Code::kResourceExhausted) {
      bool first;
      {
        std::lock_guard<std::mutex> l(mu_);
        first = condition_ != kDiskFull;
        condition_ = kDiskFull;
      }
      if (!core_->disk_full.exchange(true) || first) {
        LOG(kWarn) << "cache disk full: fetching " << where_.digest.Short()
                   << " paused until space frees; nothing written is lost (" << st.message()
                   << ")";
      }
    } else {
      LOG(kError) << "writing partial/" << name_ << ": " << st.ToString();
    }
    return st;
  }
  bool still_full = false;
  if (core_->disk_full.load(std::memory_order_relaxed)) {
    // A small write can land in an already allocated block of a full disk: only call it room
    // again when the filesystem has some (8 MiB, or an eighth of a small one), so the log and
    // status do not flap every second.
    struct statvfs vfs;
    if (::fstatvfs(fd, &vfs) == 0 &&
        static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize <
            std::min<uint64_t>(kRoomAgainBytes, static_cast<uint64_t>(vfs.f_blocks) *
                                                    vfs.f_frsize / 8)) {
      still_full = true;
    } else if (core_->disk_full.exchange(false)) {
      LOG(kInfo) << "cache disk has room again: fetching resumed";
    }
  }
  if (changed > 0) core_->bytes_repaired.fetch_add(changed, std::memory_order_relaxed);
  std::vector<Waiter> done;
  bool hash = false, persist = false, repair_step = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (condition_ == kDiskFull && !still_full) condition_.clear();
    bytes_repaired_ += changed;
    const uint64_t piece = PieceSize();
    const size_t pieces = static_cast<size_t>((where_.size + piece - 1) / piece);
    if (trouble_.size() != pieces) {
      trouble_.assign(pieces, 0);
    }
    if (troubles != trouble_seen_) {
      if (troubles > trouble_seen_) {
        // The fetch retried, stalled or re-requested something since the last write: suspect
        // every piece partly written now (their transfers were the ones in flight).
        for (const ByteRange& r : present_.Ranges()) {
          if (r.begin % piece != 0) trouble_[r.begin / piece]++;
          if (r.end % piece != 0 && r.end < where_.size) trouble_[r.end / piece]++;
        }
        trouble_[offset / piece]++;
      }
      trouble_seen_ = troubles;
    }
    present_.Add(offset, offset + len);
    for (size_t i : changed_chunks) chunks_[i].changed = true;
    QueueCompleteChunksLocked(offset, offset + len);
    dirty_ = true;
    unpersisted_bytes_ += len;
    if (!got_last_byte_ && present_.TotalBytes() == where_.size) {
      got_last_byte_ = true;
      last_byte_ = Clock::now();
    }
    if (repairing_) {
      const uint64_t b = repair_piece_ * piece, e = std::min(b + piece, where_.size);
      repair_got_.Add(std::max(b, offset), std::min(e, offset + len));
      repair_changed_from_ = std::min(repair_changed_from_, changed_from);
      if (repair_got_.Contains(b, e) && !repair_step_queued_) {
        repair_step = repair_step_queued_ = true;
        last_byte_ = Clock::now();
      }
    }
    if (!core_->options.strict) {
      // Only a waiter overlapping this write can have just become complete.
      auto it = std::partition(waiters_.begin(), waiters_.end(), [&](const Waiter& w) {
        return w.end <= offset || w.begin >= offset + len || !present_.Contains(w.begin, w.end);
      });
      std::move(it, waiters_.end(), std::back_inserter(done));
      waiters_.erase(it, waiters_.end());
    }
    if (!hash_queued_ && present_.RunEnd(frontier_) > frontier_) hash = hash_queued_ = true;
    const uint64_t persist_bytes = std::clamp(piece_size_, kMinPersistBytes, kMaxPersistBytes);
    if (unpersisted_bytes_ >= persist_bytes && !persist_queued_) persist = persist_queued_ = true;
  }
  if (hash) {
    core_->worker.Post([w = weak_from_this()] {
      if (auto b = w.lock()) b->HashStep();
    });
  }
  if (persist) {
    core_->worker.Post([w = weak_from_this()] {
      if (auto b = w.lock()) {
        std::lock_guard<std::mutex> h(b->hash_mu_);
        b->MaybePersistLocked(/*force=*/false);
      }
    });
  }
  if (repair_step) {
    core_->worker.Post([w = weak_from_this()] {
      if (auto b = w.lock()) b->RepairStep();
    });
  }
  if (!done.empty()) Answer(std::move(done), Status::Ok(), fd, /*on_loop_thread=*/true);
  return Status::Ok();
}

void BlobImpl::Failed(const Status& status) {
  std::vector<Waiter> waiters;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != BlobState::kFetching || closing_ || shutdown_) return;
    state_ = BlobState::kFailed;
    failure_ = status;
    waiters.swap(waiters_);
  }
  LOG(kError) << "fetching " << where_.digest.ToString() << " failed: " << status.ToString();
  // The Fetch stays (idle) until Shutdown/destruction: it cannot be destroyed from its own
  // loop thread, and neither can the Blob, so the pin is dropped on the worker. Readers are
  // answered there too: Failed may also be called from inside Fetcher::Start (bad URL,
  // fetcher stopped), where we hold fetch_mu_.
  auto pinned = Unpin();
  auto held = std::make_shared<std::vector<Waiter>>(std::move(waiters));
  auto task = [held, status, pinned] {
    for (Waiter& w : *held) w.ready(status, -1);
  };
  if (!core_->worker.Post(task)) task();  // only after Cache::Shutdown
}

void BlobImpl::Answer(std::vector<Waiter> waiters, const Status& status, int fd,
                      bool on_loop_thread) {
  for (Waiter& w : waiters) w.ready(status, fd);
  if (on_loop_thread && !waiters.empty()) {
    // A ReadyFn may hold the last reference to this Blob; its destructor must not run on the
    // loop thread (it waits for the loop thread), so the worker destroys them.
    auto held = std::make_shared<std::vector<Waiter>>(std::move(waiters));
    core_->worker.Post([held] {});
  }
}

// ---------------------------------------------------------------------------------------------
// Hash frontier, commit, persistence (worker thread)

void BlobImpl::PostHashStep() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (hash_queued_) return;
    hash_queued_ = true;
  }
  core_->worker.Post([w = weak_from_this()] {
    if (auto b = w.lock()) b->HashStep();
  });
}

void BlobImpl::HashStep() {
  std::vector<Deferred> answers;
  {
    std::lock_guard<std::mutex> h(hash_mu_);
    HashStepLocked();
    answers.swap(deferred_);
  }
  for (Deferred& d : answers) Answer(std::move(d.waiters), d.status, d.fd, false);
}

void BlobImpl::HashStepLocked() {
  uint64_t from, to;
  int fd;
  bool more = false;
  std::vector<uint64_t> chunk_starts;  // in (from, to]: a bad chunk rewinds to its start
  {
    std::lock_guard<std::mutex> l(mu_);
    hash_queued_ = false;  // a Write after this point queues another step
    if (state_ != BlobState::kFetching || !owner_ || shutdown_) return;
    from = frontier_;
    // Repairing with nothing to re-hash: the piece being re-fetched decides (RepairStep).
    if (repairing_ && from == where_.size) return;
    to = present_.RunEnd(from);
    if (to - from > kHashStepBytes) {
      to = from + kHashStepBytes;
      more = true;
    }
    fd = fd_.get();
    if (ChunksTrustedLocked()) {
      for (size_t i = ChunkAt(chunks_, from) + 1; i < chunks_.size(); ++i) {
        if (chunks_[i].chunk.begin > to) break;
        chunk_starts.push_back(chunks_[i].chunk.begin);
      }
    }
  }
  const uint64_t piece = PieceSize();
  while (from < to) {
    // Repair restarts hashing from the state at a piece boundary, a bad chunk from its start:
    // keep one per boundary (only the piece ones are saved in the state file).
    if (from % piece == 0 || std::binary_search(chunk_starts.begin(), chunk_starts.end(), from)) {
      checkpoints_.insert_or_assign(from, sha_);
    }
    uint64_t boundary = (from / piece + 1) * piece;
    if (auto it = std::upper_bound(chunk_starts.begin(), chunk_starts.end(), from);
        it != chunk_starts.end()) {
      boundary = std::min(boundary, *it);
    }
    size_t n = static_cast<size_t>(std::min({uint64_t{kHashChunk}, to - from, boundary - from}));
    // Data just written is still in the page cache, so this read is cheap.
    Status st = PreadFull(fd, buf_.data(), n, from);
    if (!st.ok()) {
      FailLocked(st.Annotate("hashing partial/" + name_), /*remove_files=*/false);
      return;
    }
    sha_.Update(buf_.data(), n);
    from += n;
    core_->bytes_hashed.fetch_add(n, std::memory_order_relaxed);
    std::lock_guard<std::mutex> l(mu_);
    frontier_ = from;
    dirty_ = true;
  }
  if (from == where_.size) {
    FinishLocked();
    return;
  }
  if (more) PostHashStep();
  MaybePersistLocked(/*force=*/false);
}

void BlobImpl::FinishLocked() {
  const Digest got = sha_.Peek();
  if (got != where_.digest) {
    bool repairing;
    {
      std::lock_guard<std::mutex> l(mu_);
      repairing = repairing_;
      if (ChunksTrustedLocked()) {
        // Chunks still being checked may pinpoint the bad bytes; re-fetching them rewinds the
        // frontier. When every chunk matched, the chunk digests are what is wrong.
        if (verified_.TotalBytes() < where_.size) return;
        DistrustChunksLocked("every chunk matched its digest but the blob hashes to " +
                             got.ToString());
      }
    }
    if (repairing) {
      NextRepairLocked(got);
    } else {
      StartRepairLocked(got);
    }
    return;
  }
  int fd;
  {
    std::lock_guard<std::mutex> l(mu_);
    fd = fd_.get();
    // A chunk re-fetched byte for byte the same, in a blob whose digest matched: its chunk
    // digest is wrong (the re-check may not have run yet; the commit does not wait for it).
    for (size_t i = 0; ChunksTrustedLocked() && i < chunks_.size(); ++i) {
      const ChunkInfo& c = chunks_[i];
      if (c.state != ChunkState::kVerified && c.refetches > 0 && !c.changed) {
        DistrustChunksLocked("chunk " + std::to_string(i) +
                             " came back from the registry byte for byte the same and the "
                             "blob's digest matched");
      }
    }
  }
  const int partial = core_->partial_fd.get(), blobs = core_->blobs_fd.get();
  // Data durable before the name says "complete"; the open fd keeps working across the rename.
  const Clock::time_point hashed = Clock::now();
  Status st = FsyncFd(fd, "partial/" + name_);
  const Clock::time_point synced = Clock::now();
  {
    std::lock_guard<std::mutex> p(persist_mu_);  // no state file written after the rename
    if (st.ok() && ::renameat(partial, name_.c_str(), blobs, name_.c_str()) != 0) {
      st = ErrnoStatus(errno, "commit partial/" + name_ + " to blobs/");
    }
    if (st.ok()) {
      std::lock_guard<std::mutex> l(mu_);
      no_state_ = true;
    }
  }
  if (!st.ok()) {
    FailLocked(st, /*remove_files=*/false);
    return;
  }
  ::unlinkat(partial, state_name_.c_str(), 0);
  ::unlinkat(partial, chunks_name_.c_str(), 0);
  for (int dfd : {blobs, partial}) {
    Status s = FsyncFd(dfd, "cache directory");
    if (!s.ok()) {
      LOG(kWarn) << s.ToString();
    }
  }
  TouchLastUse(fd);
  // Drop the Fetch before announcing kVerified, so a verified blob never has one. Waits for the
  // loop thread; we hold only hash_mu_, which it never takes.
  TakeFetch(/*close=*/true).reset();
  std::vector<Waiter> waiters;
  bool timed;
  Clock::time_point last_byte;
  int chunk_refetches;
  {
    std::lock_guard<std::mutex> l(mu_);
    state_ = BlobState::kVerified;
    dirty_ = false;
    repairing_ = false;
    condition_.clear();
    waiters.swap(waiters_);
    timed = got_last_byte_;
    last_byte = last_byte_;
    chunk_refetches = chunk_refetches_;
  }
  std::string note;
  if (timed) {
    auto ms = [](Clock::duration d) {
      return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
    };
    const auto now = Clock::now();
    note = " " + ms(now - last_byte) + " ms after the last byte (hashed " +
           ms(std::max(hashed - last_byte, Clock::duration::zero())) + " ms, fsync " +
           ms(synced - hashed) + " ms, rename " + ms(now - synced) + " ms)";
  }
  if (chunk_refetches > 0) {
    note += ", after re-fetching " + std::to_string(chunk_refetches) + " bad chunk" +
            (chunk_refetches > 1 ? "s" : "");
  }
  if (repair_total_ > 0) {
    note += ", repaired after re-fetching " +
            std::to_string(repair_total_ - repair_queue_.size()) + " of " +
            std::to_string(repair_total_) + " pieces";
  }
  LOG(kInfo) << "verified " << where_.digest.ToString() << " (" << where_.size << " bytes)"
             << note;
  deferred_.push_back({std::move(waiters), Status::Ok(), fd, Unpin()});
  QueueEviction(core_);
}

// ---------------------------------------------------------------------------------------------
// Repair
//
// A digest mismatch does not throw the blob away. Pieces (piece_size_ bytes, the fetch's part
// size) are re-fetched one at a time, suspects first: pieces that were partly written when the
// fetch reported a retry, stall or slow re-request, then the rest in order. (Bytes arriving in
// several runs say nothing: guided part sizes and splits put run starts inside most pieces.) While repairing, Write compares what arrives with what is on
// disk and writes only differing bytes. When a piece is complete again: if nothing differed,
// the next piece; else hashing restarts from the checkpoint at (or before) the first changed
// byte, and the frontier runs to the end again: a match commits, a mismatch goes on with the
// next piece. After every piece has been re-fetched once the blob fails (kDataLoss, the
// partial removed, the failure remembered).
// Readers meanwhile: the default mode keeps serving present bytes (including the piece being
// re-fetched: it holds the bytes served before the mismatch was known, until the server's
// bytes replace them); strict readers wait for the commit as before.

void BlobImpl::StartRepairLocked(const Digest& got) {
  const uint64_t piece = PieceSize();
  const size_t pieces = static_cast<size_t>((where_.size + piece - 1) / piece);
  std::vector<uint32_t> trouble;
  {
    std::lock_guard<std::mutex> l(mu_);
    trouble = trouble_;
    repairing_ = true;
  }
  trouble.resize(pieces);
  repair_queue_.clear();
  for (size_t i = 0; i < pieces; ++i) repair_queue_.push_back(i);
  std::stable_sort(repair_queue_.begin(), repair_queue_.end(),
                   [&](uint64_t a, uint64_t b) { return trouble[a] > trouble[b]; });
  std::reverse(repair_queue_.begin(), repair_queue_.end());  // next candidate at the back
  repair_total_ = pieces;
  size_t suspects = std::count_if(trouble.begin(), trouble.end(), [](uint32_t t) { return t; });
  LOG(kWarn) << "digest mismatch for " << where_.digest.ToString() << ": got " << got.ToString()
             << "; repairing: re-fetching its " << pieces << " pieces of " << piece
             << " bytes one at a time (" << suspects << " suspect)";
  NextRepairLocked(got);
}

void BlobImpl::NextRepairLocked(const Digest& got) {
  if (repair_queue_.empty() || core_->fetcher == nullptr) {
    LOG(kError) << "digest mismatch for " << where_.digest.ToString() << ": got "
                << got.ToString() << " after re-fetching every piece once; discarding the "
                << "partial blob";
    Status bad = DataLoss("digest mismatch for " + where_.digest.ToString() + " (got " +
                          got.ToString() + ")");
    {
      std::lock_guard<std::mutex> p(core_->pin_mu);
      core_->recent_failures[where_.digest] = {
          bad, std::chrono::steady_clock::now() + kRememberFailure};
    }
    FailLocked(bad, /*remove_files=*/true);
    return;
  }
  const uint64_t k = repair_queue_.back();
  repair_queue_.pop_back();
  const uint64_t piece = PieceSize();
  const uint64_t begin = k * piece, len = std::min(piece, where_.size - begin);
  LOG(kInfo) << "repairing " << where_.digest.Short() << ": re-fetching piece " << k << " (bytes "
             << begin << "-" << begin + len - 1 << ", " << repair_total_ - repair_queue_.size()
             << " of " << repair_total_ << ")";
  {
    std::lock_guard<std::mutex> l(mu_);
    repair_piece_ = k;
    repair_got_.Clear();
    repair_changed_from_ = kNone;
    condition_ = "repairing: re-fetching piece " + std::to_string(k) + " (" +
                 std::to_string(repair_total_ - repair_queue_.size()) + " of " +
                 std::to_string(repair_total_) + ") after a digest mismatch";
  }
  RefetchRange(begin, len);
}

void BlobImpl::RefetchRange(uint64_t begin, uint64_t len) {
  std::lock_guard<std::mutex> f(fetch_mu_);
  if (fetch_closed_) return;  // shutting down
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!owner_ || state_ != BlobState::kFetching || shutdown_) return;
  }
  if (!fetch_) {
    // Start() may call Failed() at once; it takes only mu_, which is not held.
    fetch_ = core_->fetcher->Start(where_, {}, this);
    fetch_full_ = false;
    std::lock_guard<std::mutex> l(mu_);
    sink_fetch_ = fetch_.get();
  }
  fetch_->Refetch(begin, len);
}

void BlobImpl::RewindLocked(uint64_t offset) {
  auto it = checkpoints_.upper_bound(offset);
  Sha256 from_sha;
  uint64_t from = 0;
  if (it != checkpoints_.begin()) {
    --it;
    from = it->first;
    from_sha = it->second;
  }
  checkpoints_.erase(checkpoints_.upper_bound(from), checkpoints_.end());
  sha_ = from_sha;
  std::lock_guard<std::mutex> l(mu_);
  frontier_ = from;
  dirty_ = true;
}

void BlobImpl::RepairStep() {
  std::vector<Deferred> answers;
  ByteRange replaced;
  {
    std::lock_guard<std::mutex> h(hash_mu_);
    uint64_t changed, k;
    {
      std::lock_guard<std::mutex> l(mu_);
      repair_step_queued_ = false;
      if (!repairing_ || state_ != BlobState::kFetching || !owner_ || shutdown_) return;
      const uint64_t piece = PieceSize();
      const uint64_t b = repair_piece_ * piece, e = std::min(b + piece, where_.size);
      if (!repair_got_.Contains(b, e)) return;
      k = repair_piece_;
      changed = repair_changed_from_;
      repair_got_.Clear();
      repair_changed_from_ = kNone;
    }
    if (changed == kNone) {
      LOG(kInfo) << "repairing " << where_.digest.Short() << ": piece " << k
                 << " came back identical";
      NextRepairLocked(sha_.Peek());
    } else {
      RewindLocked(changed);
      replaced = {changed, std::min((k + 1) * PieceSize(), where_.size)};
      LOG(kInfo) << "repairing " << where_.digest.Short() << ": piece " << k
                 << " differed from byte " << changed << " on; re-hashing from byte "
                 << sha_.bytes_hashed();
      PostHashStep();
    }
    answers.swap(deferred_);
  }
  if (!replaced.empty()) NotifyReplaced(replaced.begin, replaced.end);
  for (Deferred& d : answers) Answer(std::move(d.waiters), d.status, d.fd, false);
}

void BlobImpl::NotifyReplaced(uint64_t begin, uint64_t end) {
  std::shared_ptr<const Cache::ReplacedFn> fn;
  {
    std::lock_guard<std::mutex> l(core_->replaced_mu);
    fn = core_->replaced;
  }
  if (fn) (*fn)(where_.digest, begin, end);
}

// ---------------------------------------------------------------------------------------------
// Chunks
//
// Where the registry publishes per-chunk digests (Fetcher::GetChunksums), they are asked for
// when the blob's Fetch starts and kept in partial/sha256-<hex>.chunks. A chunk whose bytes are
// all present is queued and hashed on the chunk thread, beside the frontier (which still hashes
// every byte: only the blob's digest commits). A match adds the chunk to verified_ (persisted),
// which answers strict readers of it. A mismatch takes the chunk out of present_ (readers wait
// for it again), rewinds the frontier if it had passed the chunk's start, and re-fetches the
// chunk alone; Write compares the new bytes with the bad ones. The chunk digests themselves are
// untrusted: when a re-fetched chunk comes back byte for byte the same, when one keeps failing,
// or when every chunk matched and the blob's digest does not, they are dropped for this blob and
// the blob's digest decides alone (with piece repair, above).

void BlobImpl::AskChunksLocked() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (chunks_asked_ || !core_->options.chunksums || piece_size_ == 0 ||
        where_.size <= piece_size_) {
      return;
    }
    chunks_asked_ = true;
  }
  // The answer arrives on the fetch loop thread: hand it to the chunk thread at once. Holding
  // core (not the Blob) is safe there: whoever drops the last Core reference holds no Blob.
  core_->fetcher->GetChunksums(
      where_, [core = core_, w = weak_from_this()](StatusOr<std::vector<fetch::Chunk>> r) {
        auto held = std::make_shared<StatusOr<std::vector<fetch::Chunk>>>(std::move(r));
        core->chunker.Post([w, held] {
          if (auto b = w.lock()) b->OnChunks(std::move(*held));
        });
      });
}

void BlobImpl::OnChunks(StatusOr<std::vector<fetch::Chunk>> r) {
  if (!r.ok()) {
    if (r.status().code() == Code::kNotFound || r.status().code() == Code::kCancelled) {
      LOG(kDebug) << "no chunk digests for " << where_.digest.Short() << ": "
                  << r.status().ToString();
    } else {
      LOG(kWarn) << "ignoring the chunk digests of " << where_.digest.Short() << ": "
                 << r.status().ToString() << "; the blob's digest alone verifies it";
    }
    return;
  }
  std::string text;
  for (const fetch::Chunk& c : r.value()) {
    text += c.digest.ToString() + " " + std::to_string(c.begin) + "-" + std::to_string(c.end - 1) +
            "\n";
  }
  const size_t n = r.value().size();
  {
    // Under persist_mu_: no file appears in partial/ after a commit or discard.
    std::lock_guard<std::mutex> p(persist_mu_);
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!owner_ || state_ != BlobState::kFetching || shutdown_ || no_state_ || repairing_ ||
          !chunks_.empty() || chunks_distrusted_) {
        return;
      }
      SetChunksLocked(std::move(r).value());
    }
    Status st = WriteFileAtomicAt(core_->partial_fd.get(), chunks_name_, core_->partial_fd.get(),
                                  chunks_name_ + ".tmp", text);
    if (!st.ok()) {
      LOG(kWarn) << "saving the chunk digests of " << where_.digest.Short() << ": " << st.ToString()
                 << " (a restart asks for them again)";
    }
  }
  LOG(kInfo) << "verifying " << where_.digest.Short() << " by " << n
             << " chunk digests from the registry as its bytes arrive";
}

void BlobImpl::SetChunksLocked(std::vector<fetch::Chunk> chunks) {
  chunks_.clear();
  chunks_.reserve(chunks.size());
  for (fetch::Chunk& c : chunks) chunks_.push_back(ChunkInfo{std::move(c)});
  RangeSet verified;
  for (ChunkInfo& c : chunks_) {
    if (verified_.Contains(c.chunk.begin, c.chunk.end)) {
      c.state = ChunkState::kVerified;
      verified.Add(c.chunk.begin, c.chunk.end);
    }
  }
  verified_ = std::move(verified);  // whole chunks only
  QueueCompleteChunksLocked(0, where_.size);
}

void BlobImpl::QueueCompleteChunksLocked(uint64_t begin, uint64_t end) {
  if (!ChunksTrustedLocked() || begin >= end) return;
  bool queued = false;
  for (size_t i = ChunkAt(chunks_, begin); i < chunks_.size(); ++i) {
    ChunkInfo& c = chunks_[i];
    if (c.chunk.begin >= end) break;
    if ((c.state == ChunkState::kIncomplete || c.state == ChunkState::kRefetching) &&
        present_.Contains(c.chunk.begin, c.chunk.end)) {
      c.state = ChunkState::kQueued;
      chunk_queue_.push_back(i);
      queued = true;
    }
  }
  if (queued) PostChunkStepLocked();
}

void BlobImpl::PostChunkStepLocked() {
  if (chunk_step_queued_ || chunk_queue_.empty()) return;
  chunk_step_queued_ = true;
  core_->chunker.Post([w = weak_from_this()] {
    if (auto b = w.lock()) b->VerifyChunkStep();
  });
}

void BlobImpl::TakeVerifiedWaitersLocked(std::vector<Waiter>* ready) {
  if (!ChunksTrustedLocked()) return;
  auto it = std::partition(waiters_.begin(), waiters_.end(),
                           [&](const Waiter& w) { return !verified_.Contains(w.begin, w.end); });
  std::move(it, waiters_.end(), std::back_inserter(*ready));
  waiters_.erase(it, waiters_.end());
}

void BlobImpl::DistrustChunksLocked(const std::string& why) {
  LOG(kWarn) << "the chunk digests of " << where_.digest.Short()
             << " disagree with the registry's bytes (" << why
             << "); ignoring them: the blob's digest alone verifies it";
  chunks_distrusted_ = true;
  chunk_queue_.clear();
  compare_.Clear();  // a chunk still being re-fetched is simply written when its bytes arrive
}

void BlobImpl::VerifyChunkStep() {
  size_t i;
  fetch::Chunk c;
  int fd;
  {
    std::lock_guard<std::mutex> l(mu_);
    chunk_step_queued_ = false;
    if (!ChunksTrustedLocked() || !owner_ || state_ != BlobState::kFetching || shutdown_) return;
    if (chunk_queue_.empty()) return;
    i = chunk_queue_.front();
    chunk_queue_.pop_front();
    PostChunkStepLocked();  // one chunk per task, so blobs take turns
    if (chunks_[i].state != ChunkState::kQueued) return;
    c = chunks_[i].chunk;
    fd = fd_.get();
  }
  thread_local std::vector<char> buf(kHashChunk);
  Sha256 sha;
  for (uint64_t pos = c.begin; pos < c.end;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kHashChunk, c.end - pos));
    Status st = PreadFull(fd, buf.data(), n, pos);
    if (!st.ok()) {
      // The frontier reads the same bytes and fails the blob if the disk really is at fault.
      {
        std::lock_guard<std::mutex> l(mu_);
        DistrustChunksLocked("reading chunk " + std::to_string(i) + ": " + st.ToString());
      }
      PostHashStep();
      return;
    }
    sha.Update(buf.data(), n);
    pos += n;
  }
  core_->chunk_bytes_hashed.fetch_add(c.end - c.begin, std::memory_order_relaxed);
  const Digest got = sha.Peek();
  if (got == c.digest) {
    std::vector<Waiter> ready;
    bool finish;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!ChunksTrustedLocked() || chunks_[i].state != ChunkState::kQueued) return;
      chunks_[i].state = ChunkState::kVerified;
      verified_.Add(c.begin, c.end);
      compare_.Remove(c.begin, c.end);
      dirty_ = true;
      if (core_->options.strict) TakeVerifiedWaitersLocked(&ready);
      // The frontier found a mismatch and waited for the chunks to point at it: none did.
      finish = verified_.TotalBytes() == where_.size && frontier_ == where_.size;
    }
    Answer(std::move(ready), Status::Ok(), fd, /*on_loop_thread=*/false);
    if (finish) PostHashStep();
    return;
  }
  bool refetch = false;
  {
    std::lock_guard<std::mutex> h(hash_mu_);  // the frontier may have to go back
    bool rewind = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!ChunksTrustedLocked() || !owner_ || state_ != BlobState::kFetching || shutdown_ ||
          chunks_[i].state != ChunkState::kQueued) {
        return;
      }
      ChunkInfo& info = chunks_[i];
      const std::string where = "chunk " + std::to_string(i) + " (bytes " +
                                std::to_string(c.begin) + "-" + std::to_string(c.end - 1) + ")";
      if (info.refetches > 0 && !info.changed) {
        DistrustChunksLocked(where + " came back from the registry byte for byte the same");
      } else if (info.refetches >= kMaxChunkRefetches) {
        DistrustChunksLocked(where + " did not match after " + std::to_string(info.refetches) +
                             " re-fetches");
      } else {
        LOG(kWarn) << where << " of " << where_.digest.Short()
                   << " does not match its chunk digest; re-fetching it (got " << got.ToString()
                   << ", want " << c.digest.ToString() << ")";
        info.state = ChunkState::kRefetching;
        info.refetches++;
        info.changed = false;
        chunk_refetches_++;
        present_.Remove(c.begin, c.end);
        compare_.Add(c.begin, c.end);
        got_last_byte_ = false;
        dirty_ = true;
        rewind = frontier_ > c.begin;
        refetch = true;
      }
    }
    if (rewind) RewindLocked(c.begin);
    if (refetch) RefetchRange(c.begin, c.end - c.begin);
  }
  if (refetch) {
    NotifyReplaced(c.begin, c.end);  // pages of it a reader holds are bad
  } else {
    PostHashStep();  // distrusted: a mismatch the frontier waited on is repaired
  }
}

void BlobImpl::FailLocked(const Status& status, bool remove_files) {
  std::vector<Waiter> waiters;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (state_ != BlobState::kFetching) return;
    state_ = BlobState::kFailed;
    failure_ = status;
    discarded_ = remove_files;
    waiters.swap(waiters_);
  }
  if (remove_files) {
    std::lock_guard<std::mutex> p(persist_mu_);  // no state file written after this
    {
      std::lock_guard<std::mutex> l(mu_);
      no_state_ = true;
    }
    ::unlinkat(core_->partial_fd.get(), name_.c_str(), 0);
    ::unlinkat(core_->partial_fd.get(), state_name_.c_str(), 0);
    ::unlinkat(core_->partial_fd.get(), chunks_name_.c_str(), 0);
  }
  TakeFetch(/*close=*/true).reset();
  deferred_.push_back({std::move(waiters), status, -1, Unpin()});
}

std::unique_ptr<fetch::Fetch> BlobImpl::TakeFetch(bool close) {
  std::lock_guard<std::mutex> f(fetch_mu_);
  if (close) {
    fetch_closed_ = true;
    // A Fetch being destroyed may report Failed(kCancelled); that is us stopping it, not an
    // error of the blob.
    std::lock_guard<std::mutex> l(mu_);
    closing_ = true;
  }
  if (fetch_) last_stats_ = fetch_->Stats();
  {
    std::lock_guard<std::mutex> l(mu_);
    sink_fetch_ = nullptr;
  }
  return std::move(fetch_);
}

void BlobImpl::MaybePersistLocked(bool force) {
  auto s = std::make_shared<PartialState>();
  int fd;
  uint64_t seq;
  {
    std::lock_guard<std::mutex> l(mu_);
    persist_queued_ = false;
    // A blob whose fetch failed keeps its partial and state (a later Blob resumes from it).
    if (!owner_ || discarded_ || state_ == BlobState::kVerified || !dirty_) return;
    if (!force) {
      if (persist_inflight_) return;  // the syncer is still writing the previous one
      const auto since = Clock::now() - last_persist_;
      const uint64_t bytes = std::clamp(piece_size_, kMinPersistBytes, kMaxPersistBytes);
      if (since < kPersistInterval && (unpersisted_bytes_ < bytes || since < kMinPersistGap)) {
        return;
      }
    }
    // Snapshot before the fdatasync: everything in it was pwritten before the sync starts, so
    // the state never claims bytes that are not on disk.
    s->present = present_;
    s->verified = verified_;
    // A crash must not lose which pieces to re-fetch first if the digest does not match.
    for (size_t i = 0; i < trouble_.size(); ++i) {
      if (trouble_[i] != 0) s->suspects[i * PieceSize()] = trouble_[i];
    }
    dirty_ = false;
    unpersisted_bytes_ = 0;
    fd = fd_.get();
    seq = ++persist_seq_;
    if (!force) persist_inflight_ = true;
  }
  last_persist_ = Clock::now();
  s->digest = where_.digest;
  s->size = where_.size;
  s->frontier = sha_.bytes_hashed();
  s->sha_state = sha_.SaveState();
  for (const auto& [off, sha] : checkpoints_) {
    if (off % PieceSize() == 0) s->checkpoints.emplace(off, sha.SaveState());
  }
  if (force) {
    WriteState(fd, seq, *s, /*async=*/false);
    return;
  }
  // The fdatasync may take a while: not on the hash thread, which must keep up with the network.
  if (!core_->syncer.Post([w = weak_from_this(), fd, seq, s] {
        if (auto b = w.lock()) b->WriteState(fd, seq, *s, /*async=*/true);
      })) {
    WriteState(fd, seq, *s, /*async=*/true);
  }
}

void BlobImpl::WriteState(int fd, uint64_t seq, const PartialState& s, bool async) {
  std::lock_guard<std::mutex> p(persist_mu_);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (async) persist_inflight_ = false;
    // Committed or discarded meanwhile (both happen under persist_mu_), or a newer one is out.
    if (no_state_ || seq <= persist_written_) return;
  }
  Status st;
  if (::fdatasync(fd) != 0) st = ErrnoStatus(errno, "fdatasync partial/" + name_);
  if (st.ok()) {
    st = WriteFileAtomicAt(core_->partial_fd.get(), state_name_, core_->partial_fd.get(),
                           state_name_ + ".tmp", EncodeState(s));
  }
  if (!st.ok()) {
    if (!persist_failing_) {  // once per failure streak: on a full disk this repeats every second
      LOG(kWarn) << "saving resume state of " << where_.digest.Short() << ": " << st.ToString();
    }
    persist_failing_ = true;
    std::lock_guard<std::mutex> l(mu_);
    dirty_ = true;
  } else {
    persist_failing_ = false;
    std::lock_guard<std::mutex> l(mu_);
    persist_written_ = seq;
  }
}

void BlobImpl::Tick() {
  std::vector<Deferred> answers;
  {
    std::lock_guard<std::mutex> h(hash_mu_);
    TickLocked();
    answers.swap(deferred_);
  }
  for (Deferred& d : answers) Answer(std::move(d.waiters), d.status, d.fd, false);
}

void BlobImpl::TickLocked() {
  bool follower;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (shutdown_ || state_ != BlobState::kFetching) return;
    follower = !owner_;
  }
  if (!follower) {
    MaybePersistLocked(/*force=*/false);
    return;
  }
  // Another process held the partial: see whether it committed or let go.
  Status st = AcquireLocked();
  if (!st.ok()) {
    FailLocked(st, /*remove_files=*/false);
    return;
  }
  std::vector<Waiter> ready;
  std::vector<ByteRange> demand;
  int fd;
  bool owner, verified = false, full = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    owner = owner_;
    fd = fd_.get();
    if (state_ == BlobState::kVerified) {
      verified = true;
      ready.swap(waiters_);
    } else if (owner) {
      const bool strict = core_->options.strict;
      auto it = std::partition(waiters_.begin(), waiters_.end(), [&](const Waiter& w) {
        return strict || !present_.Contains(w.begin, w.end);
      });
      std::move(it, waiters_.end(), std::back_inserter(ready));
      waiters_.erase(it, waiters_.end());
      if (strict) TakeVerifiedWaitersLocked(&ready);
      for (const Waiter& w : waiters_) {
        for (const ByteRange& r : present_.Missing(w.begin, w.end)) demand.push_back(r);
      }
      full = (materialize_ && !core_->options.lazy) || (strict && !waiters_.empty());
    }
  }
  if (owner) {
    LOG(kInfo) << "took over fetching " << where_.digest.Short() << " from another process";
    if (full || !demand.empty()) EnsureFetch(full, demand);
    PostHashStep();  // resumed data past the frontier
  }
  deferred_.push_back({std::move(ready), Status::Ok(), fd, verified ? Unpin() : nullptr});
}

void BlobImpl::Shutdown() {
  {
    std::lock_guard<std::mutex> l(mu_);
    shutdown_ = true;
  }
  TakeFetch(/*close=*/true).reset();  // after this no Sink call arrives
  std::vector<Waiter> waiters;
  {
    std::lock_guard<std::mutex> l(mu_);
    waiters.swap(waiters_);
  }
  Answer(std::move(waiters), Cancelled("cache is shutting down"), -1, /*on_loop_thread=*/false);
  std::lock_guard<std::mutex> h(hash_mu_);
  MaybePersistLocked(/*force=*/true);
}

void BlobImpl::SyncWorkerForTest() {
  // Hash steps re-post themselves, so sync until a round finds nothing queued.
  for (int i = 0; i < 1000; ++i) {
    std::promise<void> done;
    auto f = done.get_future();
    if (!core_->worker.Post([&done] { done.set_value(); })) return;
    f.wait();
    std::promise<void> synced;
    auto g = synced.get_future();
    if (!core_->syncer.Post([&synced] { synced.set_value(); })) return;
    g.wait();
    std::promise<void> checked;
    auto c = checked.get_future();
    if (!core_->chunker.Post([&checked] { checked.set_value(); })) return;
    c.wait();
    std::lock_guard<std::mutex> l(mu_);
    if (!hash_queued_ && !persist_queued_ && !persist_inflight_ && !chunk_step_queued_) return;
  }
}

}  // namespace modelfs::cache
