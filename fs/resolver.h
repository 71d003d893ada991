// Resolver: turns a model name into its manifest and the files its directory shows.
//
// The first resolution of a name asks the registry (an OCI index is followed to its linux/amd64
// manifest) and stores the raw manifest in the cache, so that a model read once can be listed and
// read with the registry gone: when the registry cannot be reached, the stored manifest is used.
// A name resolves once per mount lifetime; "not found" answers are remembered for a few seconds
// so that a shell probing paths does not hammer the registry.
//
// Thread-safe. Resolve() blocks on the network; concurrent resolutions of one name share a
// single request. Never call it on the fetch loop thread.
#pragma once

#include <chrono>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/status.h"
#include "cache/cache.h"
#include "fetch/registry.h"
#include "manifest/layout.h"
#include "manifest/manifest.h"
#include "manifest/name.h"

namespace modelfs::fs {

struct ResolvedModel {
  manifest::ModelName name;
  std::string registry;        // base URL its blobs come from
  std::string manifest_bytes;  // exactly as the registry sent them (served as manifest.json)
  manifest::Manifest manifest;
  std::vector<manifest::ModelFile> files;

  fetch::BlobLocation Locate(const manifest::Descriptor& blob) const;
};

class Resolver {
 public:
  // default_registry: the --registry URL; names without a host resolve against it.
  Resolver(std::string default_registry, fetch::RegistryClient* client, cache::Cache* cache);

  const std::string& default_host() const { return default_host_; }
  // The base URL for a registry host: the --registry URL for its own host, else https://host.
  std::string RegistryUrl(const std::string& host) const;

  StatusOr<std::shared_ptr<const ResolvedModel>> Resolve(const manifest::ModelName& name);
  // Resolves from the cache only (no network): for listing and offline use.
  StatusOr<std::shared_ptr<const ResolvedModel>> ResolveStored(const manifest::ModelName& name);

 private:
  using Result = StatusOr<std::shared_ptr<const ResolvedModel>>;
  Result ResolveUncached(const manifest::ModelName& name);
  StatusOr<std::shared_ptr<const ResolvedModel>> Build(const manifest::ModelName& name,
                                                       std::string bytes);

  const std::string default_registry_;
  const std::string default_host_;
  fetch::RegistryClient* const client_;
  cache::Cache* const cache_;

  std::mutex mu_;
  std::map<std::string, std::shared_future<Result>> resolved_;  // GUARDED_BY(mu_), by CacheKey
  std::map<std::string, std::chrono::steady_clock::time_point> not_found_until_;  // GUARDED_BY(mu_)
};

}  // namespace modelfs::fs
