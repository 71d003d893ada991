#include "fs/control.h"

#include <pthread.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>

#include "base/log.h"
#include "base/metrics.h"
#include "cache/admin.h"
#include "manifest/name.h"

namespace modelfs::fs {
namespace {

using Json = nlohmann::json;
constexpr auto kIndexTtl = std::chrono::seconds(2);
constexpr auto kRateWindow = std::chrono::seconds(5);
constexpr char kXattrPrefix[] = "user.modelfs.";

metrics::Counter g_requested("modelfs_fetch_requested_bytes_total",
                             "Bytes asked for in Range requests");
// Retries by cause, one labelled series per cause the fetcher reports (fetch/blob_fetch.cc).
metrics::Counter& Retries(const std::string& cause) {
  static const auto* counters = [] {
    auto* m = new std::map<std::string, metrics::Counter*>;
    for (const char* c : {"connection", "short_body", "bad_response", "http_5xx", "throttled",
                          "stall", "url_refused", "mirror", "resolve", "other"}) {
      (*m)[c] = new metrics::Counter("modelfs_fetch_retries_total",
                                     "Part requests retried, by cause",
                                     std::string("cause=\"") + c + "\"");
    }
    return m;
  }();
  auto it = counters->find(cause);
  return *(it != counters->end() ? it->second : counters->at("other"));
}
metrics::Counter g_stalls("modelfs_fetch_stalls_total",
                          "Part requests that received nothing for --stall-timeout");
metrics::Counter g_slow("modelfs_fetch_slow_refetches_total",
                        "Parts re-requested on a fresh connection for being slow");
metrics::Counter g_mismatch("modelfs_digest_mismatches_total",
                            "Blobs whose bytes did not match their digest");
metrics::Gauge g_in_flight("modelfs_blobs_fetching", "Blobs being fetched now");
metrics::Gauge g_parts("modelfs_fetch_parts_in_flight", "Range requests in flight now");
metrics::Gauge g_cache_bytes("modelfs_cache_bytes", "Bytes on disk under blobs/ and partial/");
metrics::Gauge g_cache_limit("modelfs_cache_limit_bytes", "The cache size limit (0: none)");

std::vector<std::string> SplitKey(const std::string& key) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i <= key.size(); ++i) {
    if (i == key.size() || key[i] == '/') {
      out.push_back(key.substr(start, i - start));
      start = i + 1;
    }
  }
  return out;
}

Json PartsJson(const std::vector<fetch::PartStatus>& parts) {
  Json out = Json::array();
  for (const auto& p : parts) {
    out.push_back({{"next", p.next},
                   {"end", p.end},
                   {"demand", p.demand},
                   {"rate_bytes_per_s", static_cast<uint64_t>(p.rate)},
                   {"tries", p.tries},
                   {"slow_refetches", p.slow_refetches}});
  }
  return out;
}

// A counter delta across a Fetch being replaced (its stats restart from zero).
uint64_t Delta(uint64_t now, uint64_t before) { return now >= before ? now - before : now; }

}  // namespace

Control::Control(Resolver* resolver, cache::Cache* cache, ControlOptions options)
    : resolver_(resolver), cache_(cache), options_(std::move(options)) {
  g_cache_limit.Set(static_cast<double>(options_.cache_limit));
  thread_ = std::thread([this] { Run(); });
}

Control::~Control() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Control::Run() {
  pthread_setname_np(pthread_self(), "modelfs-stats");
  std::unique_lock<std::mutex> l(mu_);
  while (!stop_) {
    SampleLocked();
    cv_.wait_for(l, std::chrono::seconds(1), [&] { return stop_; });
  }
}

void Control::SampleLocked() {
  const auto now = Clock::now();
  std::vector<cache::BlobStatus> live = cache_->ListBlobs();
  for (auto& [digest, t] : tracked_) t.live = false;
  int fetching = 0, parts = 0;
  for (cache::BlobStatus& s : live) {
    if (s.state == cache::BlobState::kFetching) ++fetching;
    parts += s.fetch.parts_in_flight;
    UpdateLocked(std::move(s), now);
  }
  g_in_flight.Set(fetching);
  g_parts.Set(parts);
  for (auto it = tracked_.begin(); it != tracked_.end();) {
    Tracked& t = it->second;
    if (!t.live) {
      if (t.gone == Clock::time_point()) {
        t.gone = now;
        // Closed after it was committed (or by another process): say so.
        if (t.status.state != cache::BlobState::kFailed && cache_->HasBlob(it->first)) {
          t.status.state = cache::BlobState::kVerified;
          t.status.bytes_present = t.status.hash_frontier = t.status.size;
        }
        t.status.fetch.parts_in_flight = 0;
        t.status.fetch.parts.clear();
      }
      if (now - t.gone > options_.keep_done) {
        it = tracked_.erase(it);
        continue;
      }
    } else {
      t.gone = Clock::time_point();
    }
    ++it;
  }
}

void Control::UpdateLocked(cache::BlobStatus s, Clock::time_point now) {
  Tracked& t = tracked_[s.digest];
  const fetch::FetchStats& f = s.fetch;
  g_requested.Add(Delta(f.bytes_requested, t.counted.bytes_requested));
  for (const auto& [cause, n] : f.retries_by_cause) {
    auto before = t.counted.retries_by_cause.find(cause);
    Retries(cause).Add(Delta(n, before == t.counted.retries_by_cause.end() ? 0 : before->second));
  }
  g_stalls.Add(Delta(f.stalls, t.counted.stalls));
  g_slow.Add(Delta(f.slow_refetches, t.counted.slow_refetches));
  t.counted = f;
  if (s.state == cache::BlobState::kFailed && !t.mismatch_counted &&
      s.last_error.find("digest mismatch") != std::string::npos) {
    t.mismatch_counted = true;
    g_mismatch.Add();
  }
  t.history.emplace_back(now, s.bytes_present);
  while (t.history.size() > 2 && now - t.history.front().first > kRateWindow) {
    t.history.pop_front();
  }
  t.status = std::move(s);
  t.live = true;
}

void Control::Observe(cache::BlobStatus s) {
  std::lock_guard<std::mutex> l(mu_);
  UpdateLocked(std::move(s), Clock::now());
}

double Control::RateLocked(const Tracked& t) const {
  if (!t.live || t.status.state != cache::BlobState::kFetching || t.history.size() < 2) return 0;
  const auto& [t0, b0] = t.history.front();
  const auto& [t1, b1] = t.history.back();
  double dt = std::chrono::duration<double>(t1 - t0).count();
  return dt > 0 && b1 >= b0 ? static_cast<double>(b1 - b0) / dt : 0;
}

std::string Control::StatusJson() {
  Json blobs = Json::array();
  std::map<Digest, std::vector<std::string>> names;
  if (auto index = Index(false)) {
    for (const auto& [key, model] : index->manifests) {
      const std::string name = model->name.DisplayName(resolver_->default_host());
      names[model->manifest.config.digest].push_back(name);
      for (const auto& l : model->manifest.layers) names[l.digest].push_back(name);
    }
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    SampleLocked();
    for (const auto& [digest, t] : tracked_) {
      const cache::BlobStatus& s = t.status;
      Json b = {
          {"digest", digest.ToString()},
          {"size", s.size},
          {"state", std::string(cache::BlobStateName(s.state))},
          {"bytes_present", s.bytes_present},
          {"hash_frontier", s.hash_frontier},
          {"rate_bytes_per_s", static_cast<uint64_t>(RateLocked(t))},
          {"open", t.live},
          {"parts_in_flight", s.fetch.parts_in_flight},
          {"bytes_fetched", s.fetch.bytes_written},
          {"slow_refetches", s.fetch.slow_refetches},
          {"retries", s.fetch.retries},
          {"retries_by_cause", s.fetch.retries_by_cause},
          {"parts", PartsJson(s.fetch.parts)},
          {"stalls", s.fetch.stalls},
          {"splits", s.fetch.splits},
          {"chunks",
           {{"total", s.chunks},
            {"verified", s.chunks_verified},
            {"refetched", s.chunk_refetches},
            {"distrusted", s.chunks_distrusted}}},
          {"last_error", !s.last_error.empty() ? s.last_error : s.fetch.last_error},
          {"models", names[digest]},
      };
      blobs.push_back(std::move(b));
    }
  }
  const uint64_t used = cache::CacheDiskBytes(cache_->dir());
  g_cache_bytes.Set(static_cast<double>(used));
  Json out = {
      {"mountpoint", options_.mountpoint},
      {"registry", options_.registry},
      {"cache", {{"dir", cache_->dir()}, {"bytes_used", used}, {"limit", options_.cache_limit}}},
      {"blobs", std::move(blobs)},
  };
  return out.dump(2) + "\n";
}

std::string Control::MetricsText() {
  {
    std::lock_guard<std::mutex> l(mu_);
    SampleLocked();
  }
  g_cache_bytes.Set(static_cast<double>(cache::CacheDiskBytes(cache_->dir())));
  return metrics::RenderText();
}

std::vector<std::pair<std::string, std::string>> Control::BlobXattrs(
    const manifest::Descriptor& blob) {
  cache::BlobStatus s;
  bool found = false;
  // Fresh numbers for a blob the cache has alive: ask it now, not the last once-a-second sample.
  for (cache::BlobStatus& live : cache_->ListBlobs()) {
    if (live.digest == blob.digest) {
      s = std::move(live);
      found = true;
    }
  }
  if (!found) {
    s.digest = blob.digest;
    s.size = blob.size;
    auto disk = cache::StatCacheBlob(cache_->dir(), blob.digest);
    if (disk.ok() && disk->complete) {
      s.state = cache::BlobState::kVerified;
      s.bytes_present = s.hash_frontier = blob.size;
    } else if (disk.ok()) {
      s.state = disk->in_use ? cache::BlobState::kFetching : cache::BlobState::kMissing;
      s.bytes_present = disk->bytes_present;
    }
    std::lock_guard<std::mutex> l(mu_);
    auto it = tracked_.find(blob.digest);
    if (it != tracked_.end() && it->second.status.state == cache::BlobState::kFailed &&
        s.state != cache::BlobState::kVerified) {
      s.state = cache::BlobState::kFailed;
      s.last_error = it->second.status.last_error;
    }
  }
  std::string error = !s.last_error.empty() ? s.last_error : s.fetch.last_error;
  const std::string p = kXattrPrefix;
  return {{p + "digest", blob.digest.ToString()},
          {p + "size", std::to_string(blob.size)},
          {p + "bytes_present", std::to_string(s.bytes_present)},
          {p + "hash_frontier", std::to_string(s.hash_frontier)},
          {p + "state", std::string(cache::BlobStateName(s.state))},
          {p + "last_error", error}};
}

// ---------------------------------------------------------------------------------------------
// The directory trees

bool Control::Owns(const std::vector<std::string>& path) {
  return !path.empty() && (path[0] == kControlDirName || path[0] == kOllamaDirName);
}

std::shared_ptr<const Control::OllamaIndex> Control::Index(bool fresh) {
  {
    std::lock_guard<std::mutex> l(index_mu_);
    if (index_ && !fresh && Clock::now() - index_->built < kIndexTtl) return index_;
  }
  auto index = std::make_shared<OllamaIndex>();
  index->built = Clock::now();
  for (const std::string& key : cache_->ListManifests()) {
    std::vector<std::string> k = SplitKey(key);
    if (k.size() != 4) continue;
    auto name =
        manifest::ParseModelPath({k[0], k[1], k[2] + ":" + k[3]}, resolver_->default_host());
    if (!name.ok()) continue;
    auto model = resolver_->ResolveStored(*name);
    if (!model.ok()) {
      LOG(kDebug) << "ollama view: skipping " << key << ": " << model.status().ToString();
      continue;
    }
    index->manifests[key] = *model;
    index->blobs.emplace((*model)->manifest.config.digest.FileName(),
                         std::make_pair(*model, (*model)->manifest.config));
    for (const auto& layer : (*model)->manifest.layers) {
      index->blobs.emplace(layer.digest.FileName(), std::make_pair(*model, layer));
    }
  }
  std::lock_guard<std::mutex> l(index_mu_);
  index_ = index;
  return index;
}

StatusOr<ControlEntry> Control::Lookup(const std::vector<std::string>& path) {
  ControlEntry e;
  if (path.size() == 1 && Owns(path)) return e;
  if (path[0] == kControlDirName) {
    if (path.size() == 2 && (path[1] == "status" || path[1] == "metrics")) {
      e.kind = ControlEntry::Kind::kGenerated;
      return e;
    }
    return NotFound("no such control file");
  }
  // .ollama/…
  if (path.size() == 2 && (path[1] == "manifests" || path[1] == "blobs")) return e;
  for (bool fresh : {false, true}) {
    auto index = Index(fresh);
    if (path[1] == "blobs" && path.size() == 3) {
      auto it = index->blobs.find(path[2]);
      if (it == index->blobs.end()) continue;
      e.kind = ControlEntry::Kind::kBlob;
      e.model = it->second.first;
      e.blob = it->second.second;
      return e;
    }
    if (path[1] == "manifests" && path.size() >= 3 && path.size() <= 6) {
      std::string prefix;
      for (size_t i = 2; i < path.size(); ++i) prefix += (i > 2 ? "/" : "") + path[i];
      if (path.size() == 6) {
        auto it = index->manifests.find(prefix);
        if (it == index->manifests.end()) continue;
        e.kind = ControlEntry::Kind::kManifest;
        e.model = it->second;
        return e;
      }
      auto it = index->manifests.lower_bound(prefix + "/");
      if (it != index->manifests.end() && it->first.rfind(prefix + "/", 0) == 0) return e;
    }
  }
  return NotFound("not in the cache");
}

std::vector<std::pair<std::string, bool>> Control::List(const std::vector<std::string>& path) {
  std::vector<std::pair<std::string, bool>> out;
  if (path.size() == 1 && path[0] == kControlDirName)
    return {{"status", false}, {"metrics", false}};
  if (path.size() == 1) return {{"blobs", true}, {"manifests", true}};
  auto index = Index(true);
  if (path[1] == "blobs" && path.size() == 2) {
    for (const auto& [name, _] : index->blobs) out.push_back({name, false});
    return out;
  }
  if (path[1] != "manifests") return out;
  const size_t depth = path.size() - 2;  // components of the key already given
  std::string prefix;
  for (size_t i = 2; i < path.size(); ++i) prefix += path[i] + "/";
  std::string last;
  for (const auto& [key, _] : index->manifests) {
    if (key.rfind(prefix, 0) != 0) continue;
    std::vector<std::string> k = SplitKey(key);
    if (depth >= k.size() || k[depth] == last) continue;
    last = k[depth];
    out.push_back({last, depth < 3});
  }
  return out;
}

StatusOr<std::string> Control::Generate(const std::vector<std::string>& path) {
  if (path.size() == 2 && path[1] == "status") return StatusJson();
  if (path.size() == 2 && path[1] == "metrics") return MetricsText();
  return NotFound("no such control file");
}

}  // namespace modelfs::fs
