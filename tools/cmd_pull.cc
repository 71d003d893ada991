// modelfs pull NAME…: resolve each model (storing its manifest) and materialize every blob it
// references into the cache, with `ollama pull`-style progress. The same Resolver, Cache and
// RegistryClient as a mount, so a mount (or another pull) fetching the same blob in the same
// cache is waited for (flock on the partial), never downloaded twice.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <deque>
#include <iostream>
#include <set>
#include <thread>

#include "cache/admin.h"
#include "fs/resolver.h"
#include "manifest/name.h"
#include "tools/format.h"
#include "tools/ops.h"

namespace modelfs::tools {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kTick = std::chrono::milliseconds(100);
constexpr auto kPlainEvery = std::chrono::seconds(2);
constexpr auto kRateWindow = std::chrono::seconds(3);
constexpr int kBarWidth = 20;

volatile sig_atomic_t g_interrupted = 0;

void OnSignal(int) { g_interrupted = 1; }

struct Layer {
  std::string model;  // display name of the first model that has it
  fetch::BlobLocation where;
  std::shared_ptr<cache::Blob> blob;
  std::deque<std::pair<Clock::time_point, uint64_t>> history;
  uint64_t present = 0;
  cache::BlobState state = cache::BlobState::kMissing;
  std::string error;
  bool reported = false;  // its verified/failed line was printed
  uint64_t start_present = 0;
};

double Rate(const Layer& l) {
  if (l.history.size() < 2) return 0;
  double dt =
      std::chrono::duration<double>(l.history.back().first - l.history.front().first).count();
  return dt > 0.2 ? static_cast<double>(l.history.back().second - l.history.front().second) / dt
                  : 0;
}

std::string Bar(double frac) {
  int full = static_cast<int>(std::floor(frac * kBarWidth + 1e-9));
  std::string out = "▕";
  for (int i = 0; i < kBarWidth; ++i) out += i < full ? "█" : " ";
  return out + "▏";
}

// "pulling 6a0746a1ec1a: 45% ▕█████████           ▏ 1.2 GB/2.0 GB  85 MB/s  9s"
std::string ProgressLine(const Layer& l, bool tty) {
  const uint64_t size = l.where.size;
  const double frac = size ? static_cast<double>(l.present) / static_cast<double>(size) : 1.0;
  std::string line = "pulling " + l.where.digest.Short() + ": " +
                     std::to_string(static_cast<int>(frac * 100)) + "%";
  if (tty) line += " " + Bar(frac);
  if (l.state == cache::BlobState::kVerified) return line + " " + HumanBytes(size);
  line += " " + HumanBytes(l.present) + "/" + HumanBytes(size);
  double rate = Rate(l);
  if (rate > 0) {
    line += "  " + HumanBytes(static_cast<uint64_t>(rate)) + "/s  " +
            HumanDuration(static_cast<double>(size - l.present) / rate);
  }
  if (l.state == cache::BlobState::kFailed) line += "  failed";
  return line;
}

void Update(Layer& l, const std::string& cache_dir, Clock::time_point now) {
  cache::BlobStatus s = l.blob->GetStatus();
  l.state = s.state;
  l.present = std::max(l.present, s.bytes_present);
  if (s.state == cache::BlobState::kFetching && s.fetch.bytes_written == 0) {
    // Another process may hold the partial: its saved state tells how far it got.
    auto disk = cache::StatCacheBlob(cache_dir, l.where.digest);
    if (disk.ok() && !disk->complete) l.present = std::max(l.present, disk->bytes_present);
  }
  if (s.state == cache::BlobState::kFailed) {
    l.error = !s.last_error.empty() ? s.last_error : s.fetch.last_error;
  }
  l.history.emplace_back(now, l.present);
  while (l.history.size() > 2 && now - l.history.front().first > kRateWindow) l.history.pop_front();
}

bool Done(const Layer& l) {
  return l.state == cache::BlobState::kVerified || l.state == cache::BlobState::kFailed;
}

}  // namespace

int RunPull(const OpsConfig& config, const std::vector<std::string>& names) {
  const bool tty = ::isatty(STDOUT_FILENO) == 1;
  auto client = fetch::RegistryClient::Create(config.client);
  if (!client.ok()) {
    std::cerr << "modelfs pull: " << client.status().ToString() << "\n";
    return 1;
  }
  cache::CacheOptions options = config.cache;
  options.lazy = false;
  auto cache = cache::Cache::Open(config.cache_dir, client->get(), options);
  if (!cache.ok()) {
    std::cerr << "modelfs pull: " << cache.status().ToString() << "\n";
    return 1;
  }
  fs::Resolver resolver(config.registry, client->get(), cache->get());

  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  const auto start = Clock::now();
  int rc = 0;
  std::vector<Layer> layers;
  std::set<Digest> seen;
  std::vector<std::string> pulled;
  for (const std::string& text : names) {
    auto name = manifest::ParseModelName(text, resolver.default_host());
    if (!name.ok()) {
      std::cerr << "modelfs pull: " << name.status().message() << "\n";
      return 2;
    }
    std::cout << "pulling manifest " << name->DisplayName(resolver.default_host()) << std::endl;
    auto model = resolver.Resolve(*name);
    if (!model.ok()) {
      std::cerr << "error: " << text << ": " << model.status().ToString() << std::endl;
      rc = 1;
      continue;
    }
    pulled.push_back(name->DisplayName(resolver.default_host()));
    std::vector<manifest::Descriptor> blobs = (*model)->manifest.layers;
    blobs.push_back((*model)->manifest.config);
    for (const manifest::Descriptor& d : blobs) {
      if (!seen.insert(d.digest).second) continue;
      Layer l;
      l.model = pulled.back();
      l.where = (*model)->Locate(d);
      auto blob = (*cache)->OpenBlob(l.where);
      if (!blob.ok()) {
        std::cerr << "error: " << d.digest.ToString() << ": " << blob.status().ToString()
                  << std::endl;
        rc = 1;
        continue;
      }
      l.blob = std::move(*blob);
      l.blob->Materialize();
      l.start_present = l.blob->GetStatus().bytes_present;
      layers.push_back(std::move(l));
    }
    if (g_interrupted) break;
  }

  // Progress until every layer is verified or failed, or we are interrupted.
  size_t drawn = 0;  // bar lines on screen below the cursor's block start (tty)
  auto last_plain = Clock::now();
  while (!g_interrupted) {
    const auto now = Clock::now();
    bool all_done = true;
    std::vector<std::string> events;
    for (Layer& l : layers) {
      Update(l, config.cache_dir, now);
      all_done = all_done && Done(l);
      if (Done(l) && !l.reported) {
        l.reported = true;
        events.push_back(l.state == cache::BlobState::kVerified
                             ? "verified " + l.where.digest.ToString() + " (" +
                                   HumanBytes(l.where.size) + ")"
                             : "failed " + l.where.digest.ToString() + ": " + l.error);
        if (l.state == cache::BlobState::kFailed) rc = 1;
      }
    }
    if (tty) {
      std::string out;
      if (drawn > 0) out += "\x1b[" + std::to_string(drawn) + "A\r\x1b[J";
      for (const std::string& e : events) out += e + "\n";
      for (const Layer& l : layers) out += ProgressLine(l, true) + "\n";
      drawn = layers.size();
      std::cout << out << std::flush;
    } else {
      bool periodic = now - last_plain >= kPlainEvery;
      if (periodic) last_plain = now;
      for (const Layer& l : layers) {
        if (periodic && !Done(l)) std::cout << ProgressLine(l, false) << "\n";
      }
      for (const std::string& e : events) std::cout << e << "\n";
      std::cout << std::flush;
    }
    if (all_done) break;
    std::this_thread::sleep_for(kTick);
  }

  uint64_t total = 0, fetched = 0;
  for (const Layer& l : layers) {
    total += l.where.size;
    fetched += l.present - std::min(l.present, l.start_present);
  }
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  if (g_interrupted) {
    layers.clear();
    (*cache)->Shutdown();  // saves every partial's resume state
    std::cout << "interrupted: partial downloads are kept in " << config.cache_dir
              << "; run the same command to resume" << std::endl;
    return 130;
  }
  for (const std::string& p : pulled) {
    if (rc == 0) std::cout << "success: " << p << std::endl;
  }
  std::cout << (rc == 0 ? "pulled " : "failed after ") << layers.size() << " blobs, "
            << HumanBytes(total) << " (" << HumanBytes(fetched) << " downloaded) in "
            << HumanDuration(secs);
  if (secs > 0 && fetched > 0) {
    std::cout << ", " << HumanBytes(static_cast<uint64_t>(static_cast<double>(fetched) / secs))
              << "/s";
  }
  std::cout << std::endl;
  layers.clear();
  (*cache)->Shutdown();
  return rc;
}

}  // namespace modelfs::tools
