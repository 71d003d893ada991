#include "cache/blob.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/stat.h>
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
constexpr uint64_t kPersistBytes = 256ull << 20;            // persist at least this often...
constexpr auto kPersistInterval = std::chrono::seconds(1);  // ...or this often
constexpr size_t kMaxStateFile = 64 << 20;
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

}  // namespace

// ---------------------------------------------------------------------------------------------
// Worker

Worker::Worker() {
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
  pthread_setname_np(pthread_self(), "modelfs-hash");
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
      state_name_(where.digest.FileName() + ".state") {
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
  RangeSet present;
  uint64_t frontier = 0;
  Sha256 sha;
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
    if (present.TotalBytes() != st->present.TotalBytes()) {
      LOG(kWarn) << what << " claims " << st->present.TotalBytes() - present.TotalBytes()
                 << " bytes that are holes on disk; fetching them again";
    }
    if (st->hash_reset) {
      LOG(kWarn) << what << ": saved hash state is unusable here; hashing from the start";
    } else if (st->frontier <= present.PrefixEnd()) {
      frontier = st->frontier;
      sha = *Sha256::LoadState(st->sha_state);  // DecodeState checked it loads
    } else {
      LOG(kWarn) << what << ": hashed prefix has holes; hashing from the start";
    }
    LOG(kDebug) << "resuming " << where_.digest.Short() << ": " << present.TotalBytes() << " of "
                << where_.size << " bytes present, hashed to " << frontier;
  }
  sha_ = sha;
  piece_sha_ = Sha256();
  piece_digests_.clear();
  if (piece_size_ > 0) {
    // Digests of pieces hashed before the restart are unknown (repair would re-hash them).
    piece_digests_.assign(frontier / piece_size_, {Digest(), false});
    piece_valid_ = frontier % piece_size_ == 0;
  }
  std::lock_guard<std::mutex> l(mu_);
  present_ = std::move(present);
  frontier_ = frontier;
  dirty_ = false;
  unpersisted_bytes_ = 0;
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
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!owner_ || state_ != BlobState::kFetching || shutdown_ || closing_) {
      return Cancelled("blob " + where_.digest.Short() + " is no longer being fetched");
    }
    fd = fd_.get();
  }
  Status st = PwriteFull(fd, data, len, offset);
  if (!st.ok()) {
    if (st.code() == Code::kResourceExhausted) {
      if (!core_->disk_full.exchange(true)) {
        LOG(kWarn) << "cache disk full: fetching paused (" << st.message() << ")";
      }
    } else {
      LOG(kError) << "writing partial/" << name_ << ": " << st.ToString();
    }
    return st;
  }
  if (core_->disk_full.load(std::memory_order_relaxed) && core_->disk_full.exchange(false)) {
    LOG(kInfo) << "cache disk has room again: fetching resumed";
  }
  std::vector<Waiter> done;
  bool hash = false, persist = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    present_.Add(offset, offset + len);
    dirty_ = true;
    unpersisted_bytes_ += len;
    if (!core_->options.strict) {
      // Only a waiter overlapping this write can have just become complete.
      auto it = std::partition(waiters_.begin(), waiters_.end(), [&](const Waiter& w) {
        return w.end <= offset || w.begin >= offset + len || !present_.Contains(w.begin, w.end);
      });
      std::move(it, waiters_.end(), std::back_inserter(done));
      waiters_.erase(it, waiters_.end());
    }
    if (!hash_queued_ && present_.RunEnd(frontier_) > frontier_) hash = hash_queued_ = true;
    if (unpersisted_bytes_ >= kPersistBytes && !persist_queued_) persist = persist_queued_ = true;
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
        b->MaybePersistLocked(/*force=*/true);
      }
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
  {
    std::lock_guard<std::mutex> l(mu_);
    hash_queued_ = false;  // a Write after this point queues another step
    if (state_ != BlobState::kFetching || !owner_ || shutdown_) return;
    from = frontier_;
    to = present_.RunEnd(from);
    if (to - from > kHashStepBytes) {
      to = from + kHashStepBytes;
      more = true;
    }
    fd = fd_.get();
  }
  while (from < to) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kHashChunk, to - from));
    // Data just written is still in the page cache, so this read is cheap.
    Status st = PreadFull(fd, buf_.data(), n, from);
    if (!st.ok()) {
      FailLocked(st.Annotate("hashing partial/" + name_), /*remove_files=*/false);
      return;
    }
    sha_.Update(buf_.data(), n);
    if (piece_size_ > 0) {
      // Repair seam: one SHA-256 per piece, so a mismatch can later name the bad piece.
      uint64_t pos = from;
      const char* p = buf_.data();
      size_t left = n;
      while (left > 0) {
        uint64_t piece_end = std::min((pos / piece_size_ + 1) * piece_size_, where_.size);
        size_t k = static_cast<size_t>(std::min<uint64_t>(left, piece_end - pos));
        piece_sha_.Update(p, k);
        pos += k;
        p += k;
        left -= k;
        if (pos == piece_end) {
          piece_digests_.push_back({piece_sha_.Peek(), piece_valid_});
          piece_sha_ = Sha256();
          piece_valid_ = true;
        }
      }
    }
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
    LOG(kError) << "digest mismatch for " << where_.digest.ToString() << ": got " << got.ToString()
                << "; discarding the partial blob";
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
  int fd;
  {
    std::lock_guard<std::mutex> l(mu_);
    fd = fd_.get();
  }
  const int partial = core_->partial_fd.get(), blobs = core_->blobs_fd.get();
  // Data durable before the name says "complete"; the open fd keeps working across the rename.
  Status st = FsyncFd(fd, "partial/" + name_);
  if (st.ok() && ::renameat(partial, name_.c_str(), blobs, name_.c_str()) != 0) {
    st = ErrnoStatus(errno, "commit partial/" + name_ + " to blobs/");
  }
  if (!st.ok()) {
    FailLocked(st, /*remove_files=*/false);
    return;
  }
  ::unlinkat(partial, state_name_.c_str(), 0);
  for (int dfd : {blobs, partial}) {
    Status s = FsyncFd(dfd, "cache directory");
    if (!s.ok()) {
      LOG(kWarn) << s.ToString();
    }
  }
  // Drop the Fetch before announcing kVerified, so a verified blob never has one. Waits for the
  // loop thread; we hold only hash_mu_, which it never takes.
  TakeFetch(/*close=*/true).reset();
  std::vector<Waiter> waiters;
  {
    std::lock_guard<std::mutex> l(mu_);
    state_ = BlobState::kVerified;
    dirty_ = false;
    waiters.swap(waiters_);
  }
  LOG(kInfo) << "verified " << where_.digest.ToString() << " (" << where_.size << " bytes)";
  deferred_.push_back({std::move(waiters), Status::Ok(), fd, Unpin()});
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
    ::unlinkat(core_->partial_fd.get(), name_.c_str(), 0);
    ::unlinkat(core_->partial_fd.get(), state_name_.c_str(), 0);
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
  return std::move(fetch_);
}

void BlobImpl::MaybePersistLocked(bool force) {
  PartialState s;
  int fd;
  {
    std::lock_guard<std::mutex> l(mu_);
    persist_queued_ = false;
    // A blob whose fetch failed keeps its partial and state (a later Blob resumes from it).
    if (!owner_ || discarded_ || state_ == BlobState::kVerified || !dirty_) return;
    if (!force && unpersisted_bytes_ < kPersistBytes &&
        Clock::now() - last_persist_ < kPersistInterval) {
      return;
    }
    // Snapshot before the fdatasync: everything in it was pwritten before the sync starts, so
    // the state never claims bytes that are not on disk.
    s.present = present_;
    dirty_ = false;
    unpersisted_bytes_ = 0;
    fd = fd_.get();
  }
  last_persist_ = Clock::now();
  s.digest = where_.digest;
  s.size = where_.size;
  s.frontier = sha_.bytes_hashed();
  s.sha_state = sha_.SaveState();
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
    std::lock_guard<std::mutex> l(mu_);
    if (!hash_queued_ && !persist_queued_) return;
  }
}

}  // namespace modelfs::cache
