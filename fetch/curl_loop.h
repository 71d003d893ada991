// CurlLoop: the one thread ("modelfs-curl") that owns the libcurl multi handle and every easy
// handle, plus the timers that drive retries and stall checks.
//
// Threads: Post() and RunSync() are safe from any thread; they hand a closure to the loop under
// a mutex and wake it with curl_multi_wakeup. Everything else (Add, Remove, timers, and every
// Transfer callback) is loop-thread only. Closures posted before Stop() always run exactly once
// (during shutdown if need be); after Stop() Post() returns false.
//
// Ownership: the loop owns every Transfer added to it. A Transfer completes exactly once: either
// OnDone(result) after curl finishes it, or OnDone with cancelled=true at shutdown. Remove()
// destroys a transfer without calling OnDone (its owner already knows).
#pragma once

#include <curl/curl.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/status.h"

namespace modelfs::fetch {

using Clock = std::chrono::steady_clock;

class Transfer {
 public:
  Transfer();
  virtual ~Transfer();
  Transfer(const Transfer&) = delete;
  Transfer& operator=(const Transfer&) = delete;

  CURL* easy() const { return easy_; }
  bool ok() const { return easy_ != nullptr; }
  // Appends a request header ("Name: value"); applied when the loop adds the transfer.
  void AddHeader(const std::string& line);
  const char* error_buffer() const { return errbuf_; }

  // Loop thread, from inside curl_multi_perform: return n to go on, anything else aborts the
  // transfer (it then completes with CURLE_WRITE_ERROR). Must not call Add/Remove.
  virtual size_t OnHeader(const char* data, size_t n) { return n; }
  virtual size_t OnBody(const char* data, size_t n) = 0;
  // Loop thread, outside curl callbacks; the transfer is destroyed right after. May Add/Remove
  // other transfers and set timers.
  virtual void OnDone(CURLcode rc, bool cancelled) = 0;

 private:
  friend class CurlLoop;
  CURL* easy_ = nullptr;
  curl_slist* headers_ = nullptr;
  char errbuf_[CURL_ERROR_SIZE] = {};
};

struct LoopOptions {
  int max_total_connections = 64;
  int max_host_connections = 64;
};

class CurlLoop {
 public:
  using TimerId = uint64_t;

  static StatusOr<std::unique_ptr<CurlLoop>> Create(const LoopOptions& options);
  ~CurlLoop();  // Stop()s if needed

  // Any thread. False (and fn is dropped) once the loop has stopped accepting work.
  bool Post(std::function<void()> fn);
  // Any thread but the loop's: runs fn on the loop and waits. False if the loop has stopped;
  // then the loop thread no longer runs anything, so no callback of ours can still be running.
  bool RunSync(std::function<void()> fn);
  // Any thread but the loop's. Cancels every transfer (OnDone with cancelled=true), drops timers,
  // runs hooks registered with OnShutdown, drains posted closures, joins the thread.
  void Stop();
  bool InLoopThread() const { return std::this_thread::get_id() == thread_id_; }

  // ---- Loop thread only. ----
  // Takes ownership; the handle joins the multi on the next turn. When stopping, completes the
  // transfer at once with cancelled=true.
  void Add(std::unique_ptr<Transfer> t);
  // Destroys t (if still owned) without calling OnDone. Not from inside a curl callback.
  void Remove(Transfer* t);
  TimerId AddTimer(double delay_s, std::function<void()> fn);
  void CancelTimer(TimerId id);
  bool stopping() const { return stopping_; }
  // Run once at shutdown, after transfers are cancelled and before the thread exits.
  void OnShutdown(std::function<void()> fn) { shutdown_hooks_.push_back(std::move(fn)); }

 private:
  CurlLoop() = default;
  void Run();
  void RunTasks();
  void AddPending();
  void RunTimers();
  int MsUntilNextTimer() const;
  void Shutdown();

  CURLM* multi_ = nullptr;
  std::thread thread_;
  std::thread::id thread_id_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::function<void()>> tasks_;  // GUARDED_BY(mu_)
  bool stop_requested_ = false;               // GUARDED_BY(mu_)
  bool closed_ = false;                       // GUARDED_BY(mu_): no more Post()s accepted
  bool exited_ = false;                       // GUARDED_BY(mu_)

  // Loop thread only.
  bool stopping_ = false;
  std::unordered_map<Transfer*, std::unique_ptr<Transfer>> owned_;
  std::vector<Transfer*> pending_add_;
  std::multimap<Clock::time_point, TimerId> timer_queue_;
  std::unordered_map<TimerId, std::pair<Clock::time_point, std::function<void()>>> timers_;
  TimerId next_timer_ = 1;
  std::vector<std::function<void()>> shutdown_hooks_;
};

}  // namespace modelfs::fetch
