// The operating subcommands of the modelfs binary (issue 6): status, pull, ls, rm, verify, gc.
//
//   status  reads MOUNT/.modelfs/status from running mounts (fs/control.h)
//   pull    materializes models into a cache with the mount's Resolver + Cache + RegistryClient
//   ls, rm, verify, gc   work on a cache directory through cache/admin.h, leaving alone every
//           blob a running mount has open (flock)
//
// Exit codes: 0 ok, 1 failure, 2 usage, 130 interrupted (pull, SIGINT/SIGTERM).
// Each Run* function owns the process's stdout/stderr while it runs; not thread-safe.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "base/log.h"
#include "base/status.h"
#include "cache/cache.h"
#include "fetch/registry.h"

namespace modelfs::tools {

// What pull and the cache commands need; built by modelfs.cc from the same settings as a mount.
struct OpsConfig {
  std::string registry;
  std::string cache_dir;
  fetch::ClientOptions client;
  cache::CacheOptions cache;
  LogLevel log_level = LogLevel::kWarn;
  bool log_level_set = false;
};

int RunStatus(const std::string& mountpoint, bool json);
int RunPull(const OpsConfig& config, const std::vector<std::string>& names);
int RunLs(const OpsConfig& config);
int RunRm(const OpsConfig& config, const std::vector<std::string>& names);
int RunVerify(const OpsConfig& config, const std::vector<std::string>& names);
int RunGc(const OpsConfig& config, std::optional<uint64_t> cache_max, double partial_age_s);

// Registers the subcommands on app; after app.parse(), Run() dispatches the one given.
class OpsCommands {
 public:
  // values: settings by their -o names (registry, cache, concurrency, part_size, credentials,
  // ca_file, log_level, …) as given on the command line; insecure: --insecure.
  using BuildFn = std::function<StatusOr<OpsConfig>(
      const std::map<std::string, std::string>& values, bool insecure)>;

  explicit OpsCommands(CLI::App* app);
  bool parsed() const;
  int Run(const BuildFn& build);

 private:
  CLI::App *status_, *pull_, *ls_, *rm_, *verify_, *gc_;
  std::string mountpoint_;
  bool json_ = false;
  std::vector<std::string> names_;
  std::optional<std::string> registry_, cache_, concurrency_, part_size_, credentials_, ca_file_,
      log_level_, cache_max_;
  std::string partial_age_ = "24h";
  bool insecure_ = false;
};

}  // namespace modelfs::tools
