#include "fetch/curl_loop.h"

#include <pthread.h>

#include <algorithm>
#include <future>

#include "base/log.h"

namespace modelfs::fetch {
namespace {

// Trampolines: nothing may throw across libcurl. A throwing handler aborts its transfer.
size_t WriteTrampoline(char* data, size_t size, size_t nmemb, void* user) noexcept {
  try {
    return static_cast<Transfer*>(user)->OnBody(data, size * nmemb);
  } catch (...) {
    return 0;
  }
}

size_t HeaderTrampoline(char* data, size_t size, size_t nmemb, void* user) noexcept {
  try {
    return static_cast<Transfer*>(user)->OnHeader(data, size * nmemb);
  } catch (...) {
    return 0;
  }
}

std::once_flag g_curl_init;

}  // namespace

Transfer::Transfer() {
  easy_ = curl_easy_init();
  if (!easy_) return;
  curl_easy_setopt(easy_, CURLOPT_PRIVATE, this);
  curl_easy_setopt(easy_, CURLOPT_WRITEFUNCTION, &WriteTrampoline);
  curl_easy_setopt(easy_, CURLOPT_WRITEDATA, this);
  curl_easy_setopt(easy_, CURLOPT_HEADERFUNCTION, &HeaderTrampoline);
  curl_easy_setopt(easy_, CURLOPT_HEADERDATA, this);
  curl_easy_setopt(easy_, CURLOPT_ERRORBUFFER, errbuf_);
}

Transfer::~Transfer() {
  if (easy_) curl_easy_cleanup(easy_);
  if (headers_) curl_slist_free_all(headers_);
}

void Transfer::AddHeader(const std::string& line) {
  curl_slist* n = curl_slist_append(headers_, line.c_str());
  if (n) headers_ = n;
}

StatusOr<std::unique_ptr<CurlLoop>> CurlLoop::Create(const LoopOptions& options) {
  std::call_once(g_curl_init, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  std::unique_ptr<CurlLoop> loop(new CurlLoop());
  loop->multi_ = curl_multi_init();
  if (!loop->multi_) return Internal("curl_multi_init failed");
  curl_multi_setopt(loop->multi_, CURLMOPT_PIPELINING, static_cast<long>(CURLPIPE_MULTIPLEX));
  curl_multi_setopt(loop->multi_, CURLMOPT_MAX_TOTAL_CONNECTIONS,
                    static_cast<long>(options.max_total_connections));
  curl_multi_setopt(loop->multi_, CURLMOPT_MAX_HOST_CONNECTIONS,
                    static_cast<long>(options.max_host_connections));
  // Keep enough idle connections for every part slot to be reused.
  curl_multi_setopt(loop->multi_, CURLMOPT_MAXCONNECTS,
                    static_cast<long>(options.max_total_connections));
  CurlLoop* raw = loop.get();
  std::promise<void> started;
  auto started_f = started.get_future();
  loop->thread_ = std::thread([raw, &started] {
    pthread_setname_np(pthread_self(), "modelfs-curl");
    raw->thread_id_ = std::this_thread::get_id();
    started.set_value();
    raw->Run();
  });
  started_f.wait();
  return loop;
}

CurlLoop::~CurlLoop() {
  Stop();
  if (multi_) curl_multi_cleanup(multi_);
}

bool CurlLoop::Post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    tasks_.push_back(std::move(fn));
  }
  curl_multi_wakeup(multi_);
  return true;
}

bool CurlLoop::RunSync(std::function<void()> fn) {
  if (InLoopThread()) {
    fn();
    return true;
  }
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  bool posted = Post([&] {
    fn();
    std::lock_guard<std::mutex> lock(m);
    done = true;
    cv.notify_one();
  });
  if (!posted) {
    // The loop is closing: wait until its thread has run its last closure.
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return exited_; });
    return false;
  }
  std::unique_lock<std::mutex> lock(m);
  cv.wait(lock, [&] { return done; });
  return true;
}

void CurlLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_requested_) {
      // Already stopping (or stopped); just wait for the thread if it is ours to join.
    }
    stop_requested_ = true;
  }
  if (multi_) curl_multi_wakeup(multi_);
  if (thread_.joinable()) thread_.join();
}

void CurlLoop::Add(std::unique_ptr<Transfer> t) {
  Transfer* raw = t.get();
  if (stopping_ || !raw->ok()) {
    raw->OnDone(raw->ok() ? CURLE_ABORTED_BY_CALLBACK : CURLE_OUT_OF_MEMORY, stopping_);
    return;
  }
  if (raw->headers_) curl_easy_setopt(raw->easy_, CURLOPT_HTTPHEADER, raw->headers_);
  owned_[raw] = std::move(t);
  pending_add_.push_back(raw);
}

void CurlLoop::Remove(Transfer* t) {
  auto it = owned_.find(t);
  if (it == owned_.end()) return;
  auto p = std::find(pending_add_.begin(), pending_add_.end(), t);
  if (p != pending_add_.end()) {
    pending_add_.erase(p);
  } else {
    curl_multi_remove_handle(multi_, t->easy_);
  }
  owned_.erase(it);
}

CurlLoop::TimerId CurlLoop::AddTimer(double delay_s, std::function<void()> fn) {
  TimerId id = next_timer_++;
  auto when =
      Clock::now() + std::chrono::microseconds(static_cast<int64_t>(std::max(0.0, delay_s) * 1e6));
  timers_[id] = {when, std::move(fn)};
  timer_queue_.emplace(when, id);
  return id;
}

void CurlLoop::CancelTimer(TimerId id) { timers_.erase(id); }

void CurlLoop::RunTasks() {
  std::vector<std::function<void()>> tasks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks.swap(tasks_);
  }
  for (auto& fn : tasks) fn();
}

void CurlLoop::AddPending() {
  // Handles are only added here, outside curl callbacks.
  std::vector<Transfer*> adds;
  adds.swap(pending_add_);
  for (Transfer* t : adds) {
    CURLMcode mc = curl_multi_add_handle(multi_, t->easy_);
    if (mc != CURLM_OK) {
      auto own = std::move(owned_[t]);
      owned_.erase(t);
      LOG(kError) << "curl_multi_add_handle: " << curl_multi_strerror(mc);
      own->OnDone(CURLE_FAILED_INIT, false);
    }
  }
}

void CurlLoop::RunTimers() {
  auto now = Clock::now();
  while (!timer_queue_.empty() && timer_queue_.begin()->first <= now) {
    TimerId id = timer_queue_.begin()->second;
    timer_queue_.erase(timer_queue_.begin());
    auto it = timers_.find(id);
    if (it == timers_.end()) continue;  // cancelled
    auto fn = std::move(it->second.second);
    timers_.erase(it);
    fn();
  }
}

int CurlLoop::MsUntilNextTimer() const {
  if (!pending_add_.empty()) return 0;
  constexpr int kMaxWaitMs = 1000;
  for (auto it = timer_queue_.begin(); it != timer_queue_.end(); ++it) {
    if (!timers_.count(it->second)) continue;  // cancelled; removed when due
    auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(it->first - Clock::now()).count() + 1;
    return static_cast<int>(std::clamp<int64_t>(ms, 0, kMaxWaitMs));
  }
  return kMaxWaitMs;
}

void CurlLoop::Run() {
  while (true) {
    RunTasks();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_requested_) break;
    }
    AddPending();
    int running = 0;
    curl_multi_perform(multi_, &running);
    int left = 0;
    // One message at a time: OnDone may remove other handles, which drops their messages.
    while (CURLMsg* msg = curl_multi_info_read(multi_, &left)) {
      if (msg->msg != CURLMSG_DONE) continue;
      CURL* easy = msg->easy_handle;
      CURLcode rc = msg->data.result;
      Transfer* t = nullptr;
      curl_easy_getinfo(easy, CURLINFO_PRIVATE, reinterpret_cast<char**>(&t));
      curl_multi_remove_handle(multi_, easy);
      auto it = owned_.find(t);
      if (it == owned_.end()) continue;
      std::unique_ptr<Transfer> own = std::move(it->second);
      owned_.erase(it);
      own->OnDone(rc, false);
    }
    RunTimers();
    // Drop cancelled timers that sit at the front so the wait is computed from live ones.
    while (!timer_queue_.empty() && !timers_.count(timer_queue_.begin()->second)) {
      timer_queue_.erase(timer_queue_.begin());
    }
    bool have_tasks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      have_tasks = !tasks_.empty() || stop_requested_;
    }
    if (have_tasks) continue;
    curl_multi_poll(multi_, nullptr, 0, MsUntilNextTimer(), nullptr);
  }
  Shutdown();
}

void CurlLoop::Shutdown() {
  stopping_ = true;
  // Closures already posted still run once; transfers they add are cancelled at once.
  RunTasks();
  // Cancel every transfer; their OnDone may chain into more cancellations (never new work).
  while (!owned_.empty()) {
    auto it = owned_.begin();
    Transfer* t = it->first;
    std::unique_ptr<Transfer> own = std::move(it->second);
    owned_.erase(it);
    auto p = std::find(pending_add_.begin(), pending_add_.end(), t);
    if (p != pending_add_.end()) {
      pending_add_.erase(p);
    } else {
      curl_multi_remove_handle(multi_, t->easy_);
    }
    own->OnDone(CURLE_ABORTED_BY_CALLBACK, true);
  }
  timers_.clear();
  timer_queue_.clear();
  for (auto& hook : shutdown_hooks_) hook();
  shutdown_hooks_.clear();
  // Anything posted meanwhile; then close the door.
  while (true) {
    std::vector<std::function<void()>> tasks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (tasks_.empty()) {
        closed_ = true;
        break;
      }
      tasks.swap(tasks_);
    }
    for (auto& fn : tasks) fn();
    // Transfers added by these were completed at once (stopping_).
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    exited_ = true;
  }
  cv_.notify_all();
}

}  // namespace modelfs::fetch
