// OpsCommands: command-line registration and dispatch of the operating subcommands.
#include "tools/ops.h"

#include <iostream>

#include "base/units.h"

namespace modelfs::tools {
namespace {

// "24h", "90m", "30s", "2d".
StatusOr<double> ParseAge(const std::string& text) {
  if (!text.empty() && (text.back() == 'd' || text.back() == 'D')) {
    ASSIGN_OR_RETURN(double days, ParseSeconds(text.substr(0, text.size() - 1)));
    return days * 86400;
  }
  return ParseSeconds(text);
}

}  // namespace

OpsCommands::OpsCommands(CLI::App* app) {
  status_ = app->add_subcommand(
      "status", "What running mounts are doing: blobs in flight, rates, retries, cache use.");
  status_->add_option("MOUNTPOINT", mountpoint_, "A modelfs mount (default: every one)");
  status_->add_flag("--json", json_, "Print the daemon's JSON as is");

  auto cache_opts = [&](CLI::App* c) {
    c->add_option("--cache", cache_, "Cache directory (default as for mount)");
    c->add_option("--registry", registry_,
                  "Registry for names without a host (default as for mount)");
    c->add_option("--log-level", log_level_, "debug, info, warn or error (default warn)");
  };
  pull_ = app->add_subcommand(
      "pull",
      "Download models into the cache (no mount needed); Ctrl-C keeps a resumable partial.");
  pull_->add_option("NAME", names_, "Model names, e.g. llama3.2:1b")->required();
  cache_opts(pull_);
  pull_->add_option("--concurrency", concurrency_, "Range parts in flight per blob");
  pull_->add_option("--part-size", part_size_, "Range part size, e.g. 64M");
  pull_->add_option("--credentials", credentials_, "Docker-style config.json with credentials");
  pull_->add_option("--ca-file", ca_file_, "Extra CA certificates (PEM)");
  pull_->add_flag("--insecure", insecure_, "Do not verify TLS certificates (digests still are)");

  ls_ =
      app->add_subcommand("ls", "List the models and blobs in the cache (partials with percent).");
  cache_opts(ls_);
  rm_ = app->add_subcommand(
      "rm",
      "Remove models from the cache, and the blobs no other model uses; reports bytes freed.");
  rm_->add_option("NAME", names_, "Model names")->required();
  cache_opts(rm_);
  verify_ = app->add_subcommand(
      "verify", "Re-hash complete blobs (of NAMEs, or all); remove bad ones; exit 1 if any bad.");
  verify_->add_option("NAME", names_, "Model names (default: every complete blob)");
  cache_opts(verify_);
  gc_ = app->add_subcommand(
      "gc", "Evict least recently used blobs down to --cache-max; drop stale orphan partials.");
  gc_->add_option("--cache-max", cache_max_, "Evict complete blobs until the cache fits, e.g. 50G");
  gc_->add_option("--partial-age", partial_age_,
                  "Drop partials nobody is fetching, unchanged for this long (default 24h)");
  cache_opts(gc_);
}

bool OpsCommands::parsed() const {
  for (CLI::App* c : {status_, pull_, ls_, rm_, verify_, gc_}) {
    if (c->parsed()) return true;
  }
  return false;
}

int OpsCommands::Run(const BuildFn& build) {
  if (status_->parsed()) return RunStatus(mountpoint_, json_);
  std::map<std::string, std::string> values;
  auto set = [&](const char* k, const std::optional<std::string>& v) {
    if (v) values[k] = *v;
  };
  set("registry", registry_);
  set("cache", cache_);
  set("concurrency", concurrency_);
  set("part_size", part_size_);
  set("credentials", credentials_);
  set("ca_file", ca_file_);
  set("log_level", log_level_);
  auto config = build(values, insecure_);
  if (!config.ok()) {
    std::cerr << "modelfs: " << config.status().message() << "\n";
    return 2;
  }
  config->log_level_set = log_level_.has_value();
  if (!config->log_level_set) config->log_level = LogLevel::kWarn;
  SetLogLevel(config->log_level);
  if (pull_->parsed()) return RunPull(*config, names_);
  if (ls_->parsed()) return RunLs(*config);
  if (rm_->parsed()) return RunRm(*config, names_);
  if (verify_->parsed()) return RunVerify(*config, names_);
  std::optional<uint64_t> max;
  if (cache_max_) {
    auto v = ParseSize(*cache_max_);
    if (!v.ok()) {
      std::cerr << "modelfs gc: --cache-max: " << v.status().message() << "\n";
      return 2;
    }
    max = *v;
  }
  auto age = ParseAge(partial_age_);
  if (!age.ok()) {
    std::cerr << "modelfs gc: --partial-age: " << age.status().message() << "\n";
    return 2;
  }
  return RunGc(*config, max, *age);
}

}  // namespace modelfs::tools
