#include "fs/resolver.h"

#include "base/log.h"

namespace modelfs::fs {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kNotFoundTtl = std::chrono::seconds(5);

// "http://127.0.0.1:5000/" → "127.0.0.1:5000".
std::string HostOf(const std::string& url) {
  size_t start = url.find("://");
  start = start == std::string::npos ? 0 : start + 3;
  size_t end = url.find('/', start);
  std::string host = url.substr(start, end == std::string::npos ? std::string::npos : end - start);
  for (char& c : host) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return host;
}

std::string TrimSlash(std::string url) {
  while (!url.empty() && url.back() == '/') url.pop_back();
  return url;
}

}  // namespace

fetch::BlobLocation ResolvedModel::Locate(const manifest::Descriptor& blob) const {
  return fetch::BlobLocation{registry, name.Repository(), blob.digest, blob.size};
}

Resolver::Resolver(std::string default_registry, fetch::RegistryClient* client,
                   cache::Cache* cache)
    : default_registry_(TrimSlash(std::move(default_registry))),
      default_host_(HostOf(default_registry_)),
      client_(client),
      cache_(cache) {}

std::string Resolver::RegistryUrl(const std::string& host) const {
  if (host == default_host_) return default_registry_;
  return "https://" + host;
}

StatusOr<std::shared_ptr<const ResolvedModel>> Resolver::Resolve(
    const manifest::ModelName& name) {
  const std::string key = name.CacheKey();
  std::promise<Result> promise;
  {
    std::unique_lock<std::mutex> lock(mu_);
    auto nf = not_found_until_.find(key);
    if (nf != not_found_until_.end()) {
      if (Clock::now() < nf->second) return NotFound("model " + name.ToString() + " not found");
      not_found_until_.erase(nf);
    }
    auto it = resolved_.find(key);
    if (it != resolved_.end()) {
      std::shared_future<Result> pending = it->second;
      lock.unlock();
      return pending.get();
    }
    resolved_.emplace(key, promise.get_future().share());
  }
  Result result = ResolveUncached(name);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!result.ok()) {
      resolved_.erase(key);  // the next lookup tries again
      if (result.status().code() == Code::kNotFound) {
        not_found_until_[key] = Clock::now() + kNotFoundTtl;
      }
    }
  }
  promise.set_value(result);
  return result;
}

Resolver::Result Resolver::ResolveUncached(const manifest::ModelName& name) {
  const std::string registry = RegistryUrl(name.host);
  const std::string repo = name.Repository();
  auto response = client_->GetManifest(registry, repo, name.tag);
  if (!response.ok()) {
    if (response.status().code() == Code::kNotFound) {
      LOG(kInfo) << "model " << name.ToString() << " not found: " << response.status().message();
      return response.status();
    }
    auto stored = ResolveStored(name);
    if (stored.ok()) {
      LOG(kWarn) << "registry unavailable for " << name.ToString() << " ("
                 << response.status().message() << "); using the stored manifest";
      return stored;
    }
    LOG(kError) << "cannot resolve " << name.ToString() << ": " << response.status().ToString();
    if (response.status().code() == Code::kResourceExhausted) {
      // An oversized manifest (hostile registry) is not a full disk: EIO, not ENOSPC (issue 7).
      return DataLoss(response.status().message());
    }
    return response.status();
  }

  // A manifest the registry sent but we cannot use is the registry's fault, not the name's:
  // DataLoss (EIO at the FUSE edge), logged. InvalidArgument would read as "this path cannot
  // name a model" and turn the name into an empty prefix directory (issue 7).
  auto unusable = [&](const Status& s) {
    LOG(kError) << "bad manifest for " << name.ToString() << ": " << s.message();
    return DataLoss("manifest of " + name.ToString() + " is unusable: " + s.message());
  };
  std::string body = std::move(response->body);
  auto kind_or = manifest::Classify(body, response->content_type);
  if (!kind_or.ok()) return unusable(kind_or.status());
  manifest::DocumentKind kind = *kind_or;
  if (kind == manifest::DocumentKind::kIndex) {
    auto picked_or = manifest::PickFromIndex(body);
    if (!picked_or.ok()) return unusable(picked_or.status());
    Digest picked = *picked_or;
    ASSIGN_OR_RETURN(auto inner, client_->GetManifest(registry, repo, picked.ToString()));
    if (Sha256::Of(inner.body) != picked) {
      return DataLoss("manifest " + picked.ToString() + " for " + name.ToString() +
                      " does not match its digest");
    }
    body = std::move(inner.body);
  }
  auto model = Build(name, body);
  if (!model.ok()) return unusable(model.status());
  Status stored = cache_->PutManifest(name.CacheKey(), body);
  if (!stored.ok()) LOG(kWarn) << "cannot store manifest: " << stored.ToString();
  return model;
}

StatusOr<std::shared_ptr<const ResolvedModel>> Resolver::ResolveStored(
    const manifest::ModelName& name) {
  ASSIGN_OR_RETURN(std::string body, cache_->GetManifest(name.CacheKey()));
  return Build(name, std::move(body));
}

StatusOr<std::shared_ptr<const ResolvedModel>> Resolver::Build(const manifest::ModelName& name,
                                                               std::string bytes) {
  ASSIGN_OR_RETURN(manifest::Manifest parsed, manifest::ParseManifest(bytes));
  auto model = std::make_shared<ResolvedModel>();
  model->name = name;
  model->registry = RegistryUrl(name.host);
  model->manifest_bytes = std::move(bytes);
  model->manifest = std::move(parsed);
  model->files = manifest::ModelFiles(model->manifest);
  return std::shared_ptr<const ResolvedModel>(std::move(model));
}

}  // namespace modelfs::fs
