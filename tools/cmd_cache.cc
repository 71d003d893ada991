// modelfs ls / rm / verify / gc: the cache directory as an operator sees it (cache/admin.h).
// Model names come from the stored manifests; nothing a running mount has open is removed.
#include <algorithm>
#include <ctime>
#include <iostream>
#include <map>
#include <set>

#include "cache/admin.h"
#include "manifest/manifest.h"
#include "manifest/name.h"
#include "tools/format.h"
#include "tools/ops.h"

namespace modelfs::tools {
namespace {

struct StoredModel {
  std::string key;                          // host/ns/model/tag
  std::string display;                      // llama3.2:1b
  std::vector<manifest::Descriptor> blobs;  // config + layers
  time_t mtime = 0;
};

std::string HostOf(const std::string& url) {
  size_t start = url.find("://");
  start = start == std::string::npos ? 0 : start + 3;
  size_t end = url.find('/', start);
  std::string host = url.substr(start, end == std::string::npos ? std::string::npos : end - start);
  for (char& c : host) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return host;
}

StatusOr<std::vector<StoredModel>> Models(const OpsConfig& c) {
  ASSIGN_OR_RETURN(auto manifests, cache::ListCacheManifests(c.cache_dir));
  const std::string home = HostOf(c.registry);
  std::vector<StoredModel> out;
  for (auto& m : manifests) {
    StoredModel s;
    s.key = m.key;
    s.mtime = m.mtime;
    std::vector<std::string> k;
    size_t start = 0;
    for (size_t i = 0; i <= m.key.size(); ++i) {
      if (i == m.key.size() || m.key[i] == '/') {
        k.push_back(m.key.substr(start, i - start));
        start = i + 1;
      }
    }
    manifest::ModelName name{k[0], k[1], k[2], k[3]};
    s.display = name.DisplayName(home);
    auto parsed = manifest::ParseManifest(m.bytes);
    if (parsed.ok()) {
      s.blobs = parsed->layers;
      s.blobs.push_back(parsed->config);
    }
    out.push_back(std::move(s));
  }
  return out;
}

// Cache keys for NAMEs, or a usage error.
StatusOr<std::vector<std::string>> Keys(const OpsConfig& c, const std::vector<std::string>& names) {
  std::vector<std::string> keys;
  for (const std::string& n : names) {
    ASSIGN_OR_RETURN(auto name, manifest::ParseModelName(n, HostOf(c.registry)));
    keys.push_back(name.CacheKey());
  }
  return keys;
}

std::string Percent(uint64_t part, uint64_t whole) {
  return whole == 0 ? "100%" : std::to_string(part * 100 / whole) + "%";
}

}  // namespace

int RunLs(const OpsConfig& c) {
  auto models = Models(c);
  auto blobs = cache::ListCacheBlobs(c.cache_dir);
  if (!models.ok() || !blobs.ok()) {
    std::cerr << "modelfs ls: " << (models.ok() ? blobs.status() : models.status()).ToString()
              << "\n";
    return 1;
  }
  const time_t now = ::time(nullptr);
  std::map<Digest, const cache::BlobEntry*> by_digest;
  for (const auto& b : *blobs) {
    if (b.complete || !by_digest.count(b.digest)) by_digest[b.digest] = &b;
  }
  std::map<Digest, std::vector<std::string>> users;
  std::vector<std::vector<std::string>> rows = {{"NAME", "SIZE", "PRESENT", "MODIFIED"}};
  for (const auto& m : *models) {
    uint64_t size = 0, present = 0;
    for (const auto& d : m.blobs) {
      size += d.size;
      users[d.digest].push_back(m.display);
      auto it = by_digest.find(d.digest);
      if (it != by_digest.end()) present += it->second->bytes_present;
    }
    rows.push_back({m.display, HumanBytes(size), Percent(present, size), HumanAge(m.mtime, now)});
  }
  std::cout << Table(rows) << "\n";
  rows = {{"BLOB", "STATE", "SIZE", "ON DISK", "LAST USE", "IN USE", "MODELS"}};
  uint64_t disk = 0;
  for (const auto& b : *blobs) {
    std::string models;
    for (const auto& u : users[b.digest]) models += (models.empty() ? "" : ",") + u;
    disk += b.disk_bytes;
    rows.push_back({b.digest.Short(),
                    b.complete ? "complete" : "partial " + Percent(b.bytes_present, b.size),
                    HumanBytes(b.size), HumanBytes(b.disk_bytes), HumanAge(b.last_use, now),
                    b.in_use ? "yes" : "no", models.empty() ? "-" : models});
  }
  std::cout << Table(rows) << "\n"
            << blobs->size() << " blobs, " << HumanBytes(disk) << " on disk in " << c.cache_dir
            << "\n";
  return 0;
}

int RunRm(const OpsConfig& c, const std::vector<std::string>& names) {
  auto keys = Keys(c, names);
  if (!keys.ok()) {
    std::cerr << "modelfs rm: " << keys.status().message() << "\n";
    return 2;
  }
  auto models = Models(c);
  if (!models.ok()) {
    std::cerr << "modelfs rm: " << models.status().ToString() << "\n";
    return 1;
  }
  std::set<std::string> doomed(keys->begin(), keys->end());
  std::set<Digest> kept;  // referenced by a manifest that stays
  for (const auto& m : *models) {
    if (!doomed.count(m.key)) {
      for (const auto& d : m.blobs) kept.insert(d.digest);
    }
  }
  int rc = 0;
  uint64_t freed = 0;
  for (size_t i = 0; i < keys->size(); ++i) {
    const StoredModel* model = nullptr;
    for (const auto& m : *models) {
      if (m.key == (*keys)[i]) model = &m;
    }
    if (model == nullptr) {
      std::cerr << "modelfs rm: " << names[i] << ": not in the cache\n";
      rc = 1;
      continue;
    }
    uint64_t mine = 0;
    for (const auto& d : model->blobs) {
      if (kept.count(d.digest)) continue;
      auto n = cache::RemoveCacheBlob(c.cache_dir, d.digest);
      if (n.ok()) {
        mine += *n;
      } else if (n.status().code() != Code::kNotFound) {
        std::cerr << "modelfs rm: kept " << d.digest.Short() << ": " << n.status().message()
                  << "\n";
        rc = 1;
      }
      kept.insert(d.digest);  // once
    }
    auto n = cache::RemoveCacheManifest(c.cache_dir, model->key);
    if (n.ok()) mine += *n;
    freed += mine;
    std::cout << "deleted '" << model->display << "' (" << HumanBytes(mine) << " freed)\n";
  }
  std::cout << "freed " << freed << " bytes (" << HumanBytes(freed) << ")\n";
  return rc;
}

int RunVerify(const OpsConfig& c, const std::vector<std::string>& names) {
  auto keys = Keys(c, names);
  if (!keys.ok()) {
    std::cerr << "modelfs verify: " << keys.status().message() << "\n";
    return 2;
  }
  auto blobs = cache::ListCacheBlobs(c.cache_dir);
  auto models = Models(c);
  if (!blobs.ok() || !models.ok()) {
    std::cerr << "modelfs verify: " << (blobs.ok() ? models.status() : blobs.status()).ToString()
              << "\n";
    return 1;
  }
  std::set<Digest> wanted;
  for (const auto& k : *keys) {
    bool found = false;
    for (const auto& m : *models) {
      if (m.key != k) continue;
      found = true;
      for (const auto& d : m.blobs) wanted.insert(d.digest);
    }
    if (!found) {
      std::cerr << "modelfs verify: " << k << ": not in the cache\n";
      return 1;
    }
  }
  int checked = 0, bad = 0;
  for (const auto& b : *blobs) {
    if (!b.complete || (!keys->empty() && !wanted.count(b.digest))) continue;
    ++checked;
    Status st = cache::VerifyCacheBlob(c.cache_dir, b.digest);
    if (st.ok()) {
      std::cout << "ok   " << b.digest.ToString() << "\n";
      continue;
    }
    ++bad;
    std::cout << "BAD  " << b.digest.ToString() << ": " << st.message();
    auto removed = cache::RemoveCacheBlob(c.cache_dir, b.digest);
    if (removed.ok())
      std::cout << "; removed (it is fetched again on next use)\n";
    else
      std::cout << "; NOT removed: " << removed.status().message() << "\n";
  }
  std::cout << checked << " blobs checked, " << bad << " bad\n";
  return bad ? 1 : 0;
}

int RunGc(const OpsConfig& c, std::optional<uint64_t> cache_max, double partial_age_s) {
  auto blobs = cache::ListCacheBlobs(c.cache_dir);
  if (!blobs.ok()) {
    std::cerr << "modelfs gc: " << blobs.status().ToString() << "\n";
    return 1;
  }
  const time_t now = ::time(nullptr);
  uint64_t freed = cache::RemoveStaleCacheTemps(c.cache_dir, partial_age_s);
  uint64_t total = 0;
  std::vector<const cache::BlobEntry*> complete;
  for (const auto& b : *blobs) {
    total += b.disk_bytes;
    if (b.complete) {
      complete.push_back(&b);
      continue;
    }
    // An orphan partial: nobody is fetching it (no lock) and it has not changed for a while.
    if (b.in_use || static_cast<double>(now - b.last_use) < partial_age_s) continue;
    auto n = cache::RemoveCacheBlob(c.cache_dir, b.digest);
    if (n.ok()) {
      std::cout << "dropped partial " << b.digest.Short() << " ("
                << Percent(b.bytes_present, b.size) << " of " << HumanBytes(b.size) << ", "
                << HumanAge(b.last_use, now) << ")\n";
      freed += *n;
      total -= std::min(total, b.disk_bytes);
    }
  }
  if (cache_max) {
    std::sort(complete.begin(), complete.end(),
              [](const auto* a, const auto* b) { return a->last_use < b->last_use; });
    for (const cache::BlobEntry* b : complete) {
      if (total <= *cache_max) break;
      if (b->in_use) continue;
      auto n = cache::RemoveCacheBlob(c.cache_dir, b->digest);
      if (!n.ok()) continue;  // opened by a mount meanwhile
      std::cout << "evicted " << b->digest.Short() << " (" << HumanBytes(b->size) << ", last used "
                << HumanAge(b->last_use, now) << ")\n";
      freed += *n;
      total -= std::min(total, b->disk_bytes);
    }
    if (total > *cache_max) {
      std::cout << "cache is still " << HumanBytes(total) << ": the rest is in use\n";
    }
  }
  std::cout << "freed " << freed << " bytes (" << HumanBytes(freed) << "); cache now "
            << HumanBytes(total) << "\n";
  return 0;
}

}  // namespace modelfs::tools
