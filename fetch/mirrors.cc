#include "fetch/mirrors.h"

#include "base/log.h"
#include "fetch/url.h"

namespace modelfs::fetch {
namespace {

std::vector<std::string> Trimmed(const std::vector<std::string>& urls) {
  std::vector<std::string> out;
  for (const auto& u : urls) out.push_back(TrimRegistry(u));
  return out;
}

std::chrono::steady_clock::duration Secs(double s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(s));
}

}  // namespace

MirrorSet::MirrorSet(MirrorOptions options, NowFn now)
    : options_(std::move(options)),
      mirrors_(Trimmed(options_.mirrors)),
      origin_(TrimRegistry(options_.origin)),
      now_(std::move(now)),
      down_until_(mirrors_.size()) {}

bool MirrorSet::Applies(const std::string& registry) const {
  return !mirrors_.empty() && !origin_.empty() && SameOrigin(TrimRegistry(registry), origin_);
}

std::vector<MirrorSet::Source> MirrorSet::Sources(const std::string& registry, size_t first,
                                                  const Digest* digest) const {
  std::string reg = TrimRegistry(registry);
  std::vector<Source> out;
  if (!Applies(reg)) {
    out.push_back({reg, 0, false});
    return out;
  }
  auto now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  bool suspect = false;
  if (digest) {
    auto it = suspect_until_.find(*digest);
    suspect = it != suspect_until_.end() && now < it->second;
  }
  if (!suspect) {
    for (size_t i = first; i < mirrors_.size(); ++i) {
      if (now >= down_until_[i]) out.push_back({mirrors_[i], i, true});
    }
  }
  out.push_back({reg, mirrors_.size(), false});
  return out;
}

int MirrorSet::IndexOf(const std::string& url) const {
  std::string u = TrimRegistry(url);
  for (size_t i = 0; i < mirrors_.size(); ++i) {
    if (mirrors_[i] == u) return static_cast<int>(i);
  }
  return -1;
}

void MirrorSet::ReportFailure(const std::string& mirror_url, const std::string& why) {
  int i = IndexOf(mirror_url);
  if (i < 0) return;
  auto now = Now();
  bool was_up;
  {
    std::lock_guard<std::mutex> lock(mu_);
    was_up = now >= down_until_[i];
    down_until_[i] = now + Secs(options_.backoff_s);
  }
  if (was_up) {
    LOG(kWarn) << "mirror " << RedactUrl(mirrors_[i]) << " failed (" << why << "); skipping it for "
               << options_.backoff_s << " s";
  }
}

void MirrorSet::ReportSuccess(const std::string& mirror_url) {
  int i = IndexOf(mirror_url);
  if (i < 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  down_until_[i] = Clock::time_point{};
}

bool MirrorSet::Healthy(const std::string& mirror_url) const {
  int i = IndexOf(mirror_url);
  if (i < 0) return true;
  auto now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  return now >= down_until_[i];
}

void MirrorSet::MarkSuspect(const Digest& digest) {
  auto now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  std::erase_if(suspect_until_, [&](const auto& kv) { return kv.second <= now; });
  suspect_until_[digest] = now + Secs(options_.suspect_ttl_s);
}

bool MirrorSet::Suspect(const Digest& digest) const {
  auto now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = suspect_until_.find(digest);
  return it != suspect_until_.end() && now < it->second;
}

}  // namespace modelfs::fetch
