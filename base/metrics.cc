#include "base/metrics.h"

#include <cstdio>
#include <map>
#include <mutex>

namespace modelfs::metrics {
namespace {

std::mutex& RegistryMu() {
  static std::mutex mu;
  return mu;
}
std::vector<const Metric*>& Registry() {  // GUARDED_BY(RegistryMu())
  static std::vector<const Metric*> all;
  return all;
}

std::string Number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.15g", v);  // 0.005, not 0.0050000000000000001
  return buf;
}

std::string Sample(const std::string& name, const std::string& labels, const std::string& extra,
                   const std::string& value) {
  std::string l = labels;
  if (!extra.empty()) l += (l.empty() ? "" : ",") + extra;
  return name + (l.empty() ? "" : "{" + l + "}") + " " + value + "\n";
}

}  // namespace

Metric::Metric(std::string name, std::string help, std::string labels)
    : name_(std::move(name)), help_(std::move(help)), labels_(std::move(labels)) {
  std::lock_guard<std::mutex> l(RegistryMu());
  Registry().push_back(this);
}

void Counter::Render(std::string* out) const {
  *out += Sample(name(), labels(), "", std::to_string(value()));
}

void Gauge::Render(std::string* out) const {
  *out += Sample(name(), labels(), "", Number(value()));
}

Histogram::Histogram(std::string name, std::string help, std::vector<double> bounds)
    : Metric(std::move(name), std::move(help), ""),
      bounds_(std::move(bounds)),
      buckets_(bounds_.size() + 1) {}

void Histogram::Observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  double s = sum_.load(std::memory_order_relaxed);
  while (!sum_.compare_exchange_weak(s, s + v, std::memory_order_relaxed)) {
  }
}

void Histogram::Render(std::string* out) const {
  uint64_t cumulative = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += buckets_[i].load(std::memory_order_relaxed);
    std::string le = i < bounds_.size() ? Number(bounds_[i]) : "+Inf";
    *out += Sample(name() + "_bucket", labels(), "le=\"" + le + "\"", std::to_string(cumulative));
  }
  // _count equals the +Inf bucket as rendered (not a second, later load).
  *out += Sample(name() + "_sum", labels(), "", Number(sum_.load(std::memory_order_relaxed)));
  *out += Sample(name() + "_count", labels(), "", std::to_string(cumulative));
}

std::string RenderText() {
  std::map<std::string, std::vector<const Metric*>> families;
  {
    std::lock_guard<std::mutex> l(RegistryMu());
    for (const Metric* m : Registry()) families[m->name()].push_back(m);
  }
  std::string out;
  for (const auto& [name, members] : families) {
    out += "# HELP " + name + " " + members.front()->help() + "\n";
    out += "# TYPE " + name + " " + members.front()->type() + "\n";
    for (const Metric* m : members) m->Render(&out);
  }
  return out;
}

namespace {
// At namespace scope, so the family is rendered (with zeros) before the first read.
Histogram g_read_wait("modelfs_read_wait_seconds",
                      "Time a FUSE read waited for its bytes to be present (0 when they were)",
                      {0.001, 0.005, 0.025, 0.1, 0.25, 1, 2.5, 10, 30});
Counter g_evictions("modelfs_cache_evictions_total",
                    "Complete blobs evicted (least recently used) to stay under --cache-max");
const char kFetchBytesHelp[] = "Blob bytes received, by source (origin registry, mirror, CDN)";
Counter g_origin_bytes("modelfs_fetch_bytes_total", kFetchBytesHelp, "source=\"origin\"");
Counter g_mirror_bytes("modelfs_fetch_bytes_total", kFetchBytesHelp, "source=\"mirror\"");
Counter g_cdn_bytes("modelfs_fetch_bytes_total", kFetchBytesHelp, "source=\"cdn\"");
}  // namespace

Histogram& ReadWaitSeconds() { return g_read_wait; }
Counter& CacheEvictions() { return g_evictions; }

Counter& FetchBytes(std::string_view source) {
  if (source == "mirror") return g_mirror_bytes;
  if (source == "cdn") return g_cdn_bytes;
  return g_origin_bytes;
}

}  // namespace modelfs::metrics
