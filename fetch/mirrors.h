// MirrorSet: the registries tried, in order, before the origin (--mirror), with containerd
// hosts.toml semantics, and what modelfs remembers about each of them.
//
// Sources for a request to the mirrored registry (the mount's --registry) are numbered
// 0..n-1 for the mirrors in the order given and n for the origin itself. A mirror that fails
// (connection error, timeout, 5xx, 429) is marked down for backoff_s and skipped meanwhile, so
// a dead mirror costs one timeout, not one per part or per blob; a mirror that lacks something
// (404) is not marked down — the next source is asked. Requests to any other registry host
// are not mirrored (Sources() returns just that registry).
//
// Mirrors are never trusted more than the origin: the cache verifies every blob's digest
// whatever its source. A blob whose bytes from a mirror were suspect (the same blob fetched
// again after a complete fetch from a mirror, which only happens when it failed verification,
// or a Refetch) is marked suspect and taken from the origin only for suspect_ttl_s.
//
// Safe for concurrent use (one mutex). The clock is injectable for tests.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "base/digest.h"

namespace modelfs::fetch {

struct MirrorOptions {
  std::string origin;                // the mirrored registry's base URL ("https://r.example")
  std::vector<std::string> mirrors;  // base URLs, tried in this order before the origin
  double backoff_s = 30;             // a failed mirror is skipped this long
  double suspect_ttl_s = 3600;       // a blob that was bad from a mirror comes from the origin
};

class MirrorSet {
 public:
  using Clock = std::chrono::steady_clock;
  using NowFn = std::function<Clock::time_point()>;

  struct Source {
    std::string url;   // base URL, no trailing slash
    size_t index = 0;  // position in the source order; the origin is mirror_count()
    bool mirror = false;
  };

  explicit MirrorSet(MirrorOptions options, NowFn now = {});

  size_t mirror_count() const { return mirrors_.size(); }
  // True when requests to `registry` go through the mirrors (same scheme and host:port as the
  // origin, and at least one mirror is configured).
  bool Applies(const std::string& registry) const;

  // The sources to try for a request to `registry`, in order, starting at index `first`:
  // healthy mirrors (none when digest is suspect), then `registry` itself, which is always last
  // and always present. For an unmirrored registry: just {registry}.
  std::vector<Source> Sources(const std::string& registry, size_t first = 0,
                              const Digest* digest = nullptr) const;

  // A mirror failed in a way that says it is unhealthy: skip it for backoff_s. Logs once per
  // outage. No-op for URLs that are not mirrors.
  void ReportFailure(const std::string& mirror_url, const std::string& why);
  // A mirror answered well: forget an earlier failure.
  void ReportSuccess(const std::string& mirror_url);
  bool Healthy(const std::string& mirror_url) const;

  void MarkSuspect(const Digest& digest);
  bool Suspect(const Digest& digest) const;

 private:
  Clock::time_point Now() const { return now_ ? now_() : Clock::now(); }
  int IndexOf(const std::string& url) const;  // -1 when not a mirror

  const MirrorOptions options_;
  const std::vector<std::string> mirrors_;  // trimmed
  const std::string origin_;                // trimmed
  const NowFn now_;

  mutable std::mutex mu_;
  std::vector<Clock::time_point> down_until_;          // GUARDED_BY(mu_), per mirror
  std::map<Digest, Clock::time_point> suspect_until_;  // GUARDED_BY(mu_)
};

}  // namespace modelfs::fetch
