// Metrics: a tiny process-wide registry of counters, gauges and histograms, rendered in the
// Prometheus text exposition format (version 0.0.4) for MOUNT/.modelfs/metrics and --metrics.
//
//   metrics::Counter kStalls("modelfs_fetch_stalls_total", "Parts that received nothing ...");
//   kStalls.Add();
//   metrics::Counter kOrigin("modelfs_fetch_bytes_total", "Bytes fetched", "source=\"origin\"");
//
// Metrics are meant to be objects of static storage duration (or to outlive every RenderText
// call): a constructor registers the object, nothing unregisters it. Several objects may share a
// name with different label sets; they are rendered as one family (HELP/TYPE once).
//
// Thread-safety: Add/Set/Observe are lock-free (relaxed atomics) and may be called from any
// thread, including the fetch loop; RenderText takes a registry mutex only to walk the list.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace modelfs::metrics {

class Metric {
 public:
  Metric(std::string name, std::string help, std::string labels);
  virtual ~Metric() = default;
  Metric(const Metric&) = delete;
  Metric& operator=(const Metric&) = delete;

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::string& labels() const { return labels_; }  // `a="x",b="y"`, or empty
  virtual const char* type() const = 0;
  // Appends this metric's sample lines (no HELP/TYPE) to out.
  virtual void Render(std::string* out) const = 0;

 private:
  const std::string name_, help_, labels_;
};

class Counter final : public Metric {
 public:
  Counter(std::string name, std::string help, std::string labels = "")
      : Metric(std::move(name), std::move(help), std::move(labels)) {}
  void Add(uint64_t n = 1) { v_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t value() const { return v_.load(std::memory_order_relaxed); }
  const char* type() const override { return "counter"; }
  void Render(std::string* out) const override;

 private:
  std::atomic<uint64_t> v_{0};
};

class Gauge final : public Metric {
 public:
  Gauge(std::string name, std::string help, std::string labels = "")
      : Metric(std::move(name), std::move(help), std::move(labels)) {}
  void Set(double v) { v_.store(v, std::memory_order_relaxed); }
  double value() const { return v_.load(std::memory_order_relaxed); }
  const char* type() const override { return "gauge"; }
  void Render(std::string* out) const override;

 private:
  std::atomic<double> v_{0};
};

// Cumulative buckets with fixed upper bounds (ascending), plus +Inf, _sum and _count.
class Histogram final : public Metric {
 public:
  Histogram(std::string name, std::string help, std::vector<double> bounds);
  void Observe(double v);
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }
  const char* type() const override { return "histogram"; }
  void Render(std::string* out) const override;

 private:
  const std::vector<double> bounds_;
  std::vector<std::atomic<uint64_t>> buckets_;  // per bound, not cumulative; last is +Inf
  std::atomic<uint64_t> count_{0};
  std::atomic<double> sum_{0};
};

// Every registered metric, grouped by name, with # HELP and # TYPE lines.
std::string RenderText();

// Well-known metrics shared by modules (defined in metrics.cc).
Histogram& ReadWaitSeconds();  // how long a FUSE read waited for its bytes
Counter& CacheEvictions();     // complete blobs removed to stay under --cache-max
// Blob bytes accepted from a source: "origin" (the registry), "mirror" or "cdn" (a redirect
// target); anything else counts as "origin".
Counter& FetchBytes(std::string_view source);

}  // namespace modelfs::metrics
