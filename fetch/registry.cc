#include "fetch/registry.h"

#include <condition_variable>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <unordered_map>

#include "base/log.h"
#include "fetch/auth.h"
#include "fetch/blob_fetch.h"
#include "fetch/chunksums.h"
#include "fetch/curl_loop.h"
#include "fetch/http.h"
#include "fetch/url.h"

namespace modelfs::fetch {
namespace {

constexpr size_t kManifestCap = 4u << 20;
constexpr size_t kTokenCap = 1u << 20;
constexpr size_t kChunksumsCap = 32u << 20;  // ~350k chunk lines
constexpr int kMaxSameHostRedirects = 10;
// Connections beyond max_connections for demand parts and for manifests/tokens.
constexpr int kSmallRequestConnections = 4;

constexpr const char* kManifestAccept =
    "Accept: application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json";

std::string ReadFile(const std::string& path, Status* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = ErrnoStatus(errno, "reading " + path);
    return "";
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The message of a registry error body ({"errors":[{"code","message"}]}), or "".
std::string RegistryErrorCodes(const std::string& body, std::string* message) {
  auto j = nlohmann::json::parse(body, nullptr, false);
  std::string codes;
  if (j.is_discarded() || !j.is_object()) return codes;
  auto errs = j.find("errors");
  if (errs == j.end() || !errs->is_array()) return codes;
  for (const auto& e : *errs) {
    if (!e.is_object()) continue;
    auto c = e.find("code");
    if (c != e.end() && c->is_string()) codes += c->get<std::string>() + " ";
    auto m = e.find("message");
    if (message->empty() && m != e.end() && m->is_string()) *message = m->get<std::string>();
  }
  if (message->size() > 200) message->resize(200);
  return codes;
}

std::string StripParams(const std::string& ct) {
  std::string s = ct.substr(0, ct.find(';'));
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.pop_back();
  return s;
}

class RegistryClientImpl;

// The handle the cache holds. Posts to the loop; its destructor cancels synchronously.
class FetchHandle : public Fetch {
 public:
  FetchHandle(std::shared_ptr<CurlLoop> loop, std::shared_ptr<BlobFetch> f,
              RegistryClientImpl* client)
      : loop_(std::move(loop)), f_(std::move(f)), client_(client) {}
  ~FetchHandle() override;
  void Demand(uint64_t offset, uint64_t len) override {
    auto f = f_;
    loop_->Post([f, offset, len] { f->Demand(offset, len); });
  }
  void Refetch(uint64_t offset, uint64_t len) override {
    auto f = f_;
    loop_->Post([f, offset, len] { f->Refetch(offset, len); });
  }
  FetchStats Stats() const override { return f_->Stats(); }

 private:
  std::shared_ptr<CurlLoop> loop_;
  std::shared_ptr<BlobFetch> f_;
  RegistryClientImpl* client_;  // only touched on the loop thread while the loop runs
};

class RegistryClientImpl : public RegistryClient, public BlobFetchHost {
 public:
  explicit RegistryClientImpl(ClientOptions options) : options_(std::move(options)) {}

  Status Init() {
    transport_.insecure = options_.insecure;
    transport_.proxy = options_.proxy;  // --proxy (issue 7)
    transport_.user_agent = options_.user_agent;
    transport_.connect_timeout_s = options_.connect_timeout_s;
    if (!options_.ca_file.empty()) {
      Status err;
      std::string extra = ReadFile(options_.ca_file, &err);
      if (!err.ok()) return err.Annotate("--ca-file");
      if (extra.find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
        return InvalidArgument("--ca-file " + options_.ca_file + " holds no PEM certificate");
      }
      // A CA blob replaces libcurl's default CA file, so put the system bundle in front: the
      // extra anchors are trusted in addition to the system ones.
      std::string system;
      const curl_version_info_data* v = curl_version_info(CURLVERSION_NOW);
      std::string bundle = (v && v->cainfo) ? v->cainfo : "/etc/ssl/certs/ca-certificates.crt";
      Status ignored;
      system = ReadFile(bundle, &ignored);
      transport_.ca_pem = system + "\n" + extra;
    }
    if (options_.insecure) {
      LOG(kWarn) << "*** TLS certificate verification is DISABLED (--insecure): registry and CDN "
                    "traffic can be intercepted or altered; blob digests are still verified ***";
    }
    for (const auto& [host, cred] : options_.credentials) {
      std::string h = NormalizeRegistryHost(host);
      if (!h.empty()) credentials_[h] = cred;
    }
    LoopOptions lo;
    int maxc = std::max(1, options_.max_connections);
    lo.max_total_connections = maxc + options_.fetch.demand_slots + kSmallRequestConnections;
    lo.max_host_connections = lo.max_total_connections;
    auto loop = CurlLoop::Create(lo);
    if (!loop.ok()) return loop.status();
    loop_ = std::shared_ptr<CurlLoop>(std::move(loop).value());
    for (const auto& m : options_.mirror.mirrors) {
      if (!ParseUrl(TrimRegistry(m))) {
        return InvalidArgument("--mirror must be an http(s) URL: " + m);
      }
    }
    mirrors_ = std::make_unique<MirrorSet>(options_.mirror);
    loop_->OnShutdown([this] {
      for (auto& f : fetches_) f->Shutdown();
      fetches_.clear();
    });
    return Status::Ok();
  }

  ~RegistryClientImpl() override {
    if (loop_) loop_->Stop();
  }

  // ---- Public API (caller threads) --------------------------------------------------------

  StatusOr<ManifestResponse> GetManifest(const std::string& registry_in,
                                         const std::string& repository,
                                         const std::string& reference) override {
    std::string registry = TrimRegistry(registry_in);
    return FromSources<ManifestResponse>(
        registry, nullptr,
        [&](const std::string& url) { return GetManifestAt(url, repository, reference); },
        [&](const ManifestResponse& r, const std::string& mirror) {
          if (reference.rfind("sha256:", 0) == 0 && Sha256::Of(r.body).ToString() != reference) {
            return DataLoss("manifest " + reference + " from mirror " + mirror +
                            " has another digest");
          }
          return Status::Ok();
        });
  }

  // Tries each healthy mirror of registry in order, then registry itself. `at(url)` fetches
  // from one source; `check(answer, mirror)` rejects a mirror's answer (a mirror is never
  // trusted more than the origin). A mirror that cannot be reached is reported unhealthy; one
  // that lacks the thing just falls through.
  template <typename T, typename At, typename Check>
  StatusOr<T> FromSources(const std::string& registry, const Digest* digest, At at, Check check) {
    for (const auto& src : mirrors_->Sources(registry, 0, digest)) {
      if (!src.mirror) break;
      StatusOr<T> r = at(src.url);
      if (r.ok()) {
        if (Status bad = check(*r, src.url); !bad.ok()) r = bad;
      }
      if (r.ok()) {
        mirrors_->ReportSuccess(src.url);
        return r;
      }
      if (r.status().code() == Code::kCancelled) return r.status();
      if (r.status().code() == Code::kUnavailable) {
        mirrors_->ReportFailure(src.url, r.status().message());
      } else {
        LOG(kInfo) << "mirror " << RedactUrl(src.url) << ": " << r.status().message()
                   << "; trying the next source";
      }
    }
    return at(registry);
  }

  StatusOr<ManifestResponse> GetManifestAt(const std::string& registry,
                                           const std::string& repository,
                                           const std::string& reference) {
    auto parts = ParseUrl(registry);
    if (!parts) return InvalidArgument("registry must be an http(s) URL: " + RedactUrl(registry));
    std::string name = repository + (reference.rfind("sha256:", 0) == 0 ? "@" : ":") + reference;
    HttpRequest req;
    req.url = registry + "/v2/" + repository + "/manifests/" + reference;
    req.headers.push_back(kManifestAccept);
    req.follow_redirects = true;
    req.max_body = kManifestCap;
    req.timeout_s = options_.request_timeout_s;
    ASSIGN_OR_RETURN(HttpResponse r, Blocking(registry, repository, std::move(req)));
    if (!r.error.ok()) return r.error;
    if (r.body_too_large) {
      return ResourceExhausted("manifest of " + name + " at " + registry + " is over 4 MiB");
    }
    if (r.status == 200) return ManifestResponse{std::move(r.body), StripParams(r.content_type)};
    std::string msg;
    std::string codes = RegistryErrorCodes(r.body, &msg);
    if (r.status == 404 || codes.find("MANIFEST_UNKNOWN") != std::string::npos ||
        codes.find("NAME_UNKNOWN") != std::string::npos) {
      return NotFound("model " + name + " not found at " + registry);
    }
    return StatusFor(r, parts->authority, "manifest of " + name, msg);
  }

  StatusOr<std::string> GetBlob(const BlobLocation& where, uint64_t max_bytes) override {
    return FromSources<std::string>(
        TrimRegistry(where.registry), &where.digest,
        [&](const std::string& url) {
          BlobLocation at = where;
          at.registry = url;
          return GetBlobAt(at, max_bytes);
        },
        [&](const std::string& body, const std::string& mirror) {
          if (Sha256::Of(body) == where.digest) return Status::Ok();
          mirrors_->MarkSuspect(where.digest);
          return DataLoss("blob " + where.digest.Short() + " from mirror " + mirror +
                          " has another digest");
        });
  }

  StatusOr<std::string> GetBlobAt(const BlobLocation& where, uint64_t max_bytes) {
    std::string registry = TrimRegistry(where.registry);
    auto parts = ParseUrl(registry);
    if (!parts) return InvalidArgument("registry must be an http(s) URL: " + RedactUrl(registry));
    if (where.size > max_bytes) {
      return ResourceExhausted("blob " + where.digest.Short() + " is " +
                               std::to_string(where.size) + " bytes, over the " +
                               std::to_string(max_bytes) + "-byte limit for in-memory blobs");
    }
    HttpRequest req;
    req.url = registry + "/v2/" + where.repository + "/blobs/" + where.digest.ToString();
    req.follow_redirects = true;  // curl never sends our Authorization to another host
    req.max_body = static_cast<size_t>(std::min<uint64_t>(max_bytes, SIZE_MAX));
    req.timeout_s = options_.request_timeout_s;
    ASSIGN_OR_RETURN(HttpResponse r, Blocking(registry, where.repository, std::move(req)));
    if (!r.error.ok()) return r.error;
    if (r.body_too_large) {
      return ResourceExhausted("blob " + where.digest.Short() + " is over the " +
                               std::to_string(max_bytes) + "-byte limit for in-memory blobs");
    }
    if (r.status == 200) return std::move(r.body);
    std::string msg;
    RegistryErrorCodes(r.body, &msg);
    if (r.status == 404) {
      return NotFound("blob " + where.digest.ToString() + " not found in " + where.repository +
                      " at " + registry);
    }
    return StatusFor(r, parts->authority, "blob " + where.digest.Short(), msg);
  }

  std::unique_ptr<Fetch> Start(const BlobLocation& where_in, std::vector<ByteRange> wanted,
                               Sink* sink) override {
    BlobLocation where = where_in;
    where.registry = TrimRegistry(where.registry);
    auto f = std::make_shared<BlobFetch>(this, where, options_.fetch, sink);
    auto handle = std::make_unique<FetchHandle>(loop_, f, this);
    if (!ParseUrl(where.registry)) {
      sink->Failed(
          InvalidArgument("registry must be an http(s) URL: " + RedactUrl(where.registry)));
      return handle;
    }
    bool ok = loop_->Post([this, f, digest = where.digest, wanted = std::move(wanted)]() mutable {
      if (completed_from_mirror_.erase(digest) > 0) {
        // Fetched completely from a mirror before, and asked for again: the cache did not
        // commit it (digest mismatch). The mirror is suspect for this blob.
        LOG(kWarn) << "blob " << digest.Short() << " was fetched from a mirror and is fetched "
                   << "again (failed verification?); fetching it from the origin";
        mirrors_->MarkSuspect(digest);
      }
      if (loop_->stopping()) {
        f->Begin(std::move(wanted));  // every request it makes is cancelled at once
        f->Shutdown();                // so the Sink hears kCancelled
        return;
      }
      fetches_.push_back(f);
      f->Begin(std::move(wanted));
    });
    if (!ok) sink->Failed(Cancelled("fetcher is shut down"));
    return handle;
  }

  void GetChunksums(const BlobLocation& where_in, ChunksumsFn done) override {
    BlobLocation where = where_in;
    where.registry = TrimRegistry(where.registry);  // asked of the registry, never a mirror
    // Shared so that done is still ours to call if the loop refuses (and drops) the closure.
    auto cb = std::make_shared<ChunksumsFn>(std::move(done));
    bool posted = loop_->Post([this, where, cb] { ChunksumsAt(where, std::move(*cb)); });
    // The loop has stopped and runs nothing any more: this thread is the only one left to answer.
    if (!posted) (*cb)(Cancelled("fetcher is shut down"));
  }

  // Loop thread: unregisters and cancels.
  void Forget(const std::shared_ptr<BlobFetch>& f) {
    f->Cancel();
    std::erase(fetches_, f);
  }

  // ---- BlobFetchHost (loop thread) --------------------------------------------------------

  CurlLoop* loop() override { return loop_.get(); }
  const TransportConfig& transport() override { return transport_; }

  std::string AuthHeader(const std::string& registry, const std::string& repository) override {
    auto hint = hints_.find(HintKey(registry, repository));
    if (hint == hints_.end()) return "";
    if (hint->second.scheme == AuthScheme::kBasic) {
      const Credentials* c = CredentialsFor(registry);
      return c ? "Authorization: " + BasicAuthHeaderValue(c->username, c->password) : "";
    }
    auto tok = tokens_.find(TokenKey(registry, hint->second));
    if (tok == tokens_.end() || Clock::now() >= tok->second.expiry) return "";
    return "Authorization: Bearer " + tok->second.token;
  }

  void InvalidateAuth(const std::string& registry, const std::string& repository,
                      const std::string& header) override {
    auto hint = hints_.find(HintKey(registry, repository));
    if (hint == hints_.end() || header.empty()) return;
    auto tok = tokens_.find(TokenKey(registry, hint->second));
    if (tok != tokens_.end() && "Authorization: Bearer " + tok->second.token == header) {
      tokens_.erase(tok);
    }
  }

  void Resolve(const BlobLocation& where,
               std::function<void(StatusOr<ResolvedUrl>)> done) override {
    std::string url =
        where.registry + "/v2/" + where.repository + "/blobs/" + where.digest.ToString();
    ResolveHop(where, url, 0, std::move(done));
  }

  void ResolveFrom(const BlobLocation& where, size_t first,
                   std::function<void(StatusOr<ResolvedUrl>)> done) override {
    ResolveSource(where, mirrors_->Sources(where.registry, first, &where.digest), 0,
                  std::move(done));
  }

  void MirrorFailed(const std::string& registry, const std::string& why,
                    bool unhealthy) override {
    if (unhealthy) mirrors_->ReportFailure(registry, why);
  }

  void MirrorCompleted(const BlobLocation& where) override {
    completed_from_mirror_.insert(where.digest);
  }

  bool TryAcquireSlot(bool demand) override {
    int cap = std::max(1, options_.max_connections) + (demand ? options_.fetch.demand_slots : 0);
    if (slots_used_ >= cap) return false;
    slots_used_++;
    return true;
  }
  void AcquireSlot() override { slots_used_++; }
  void ReleaseSlot() override { slots_used_--; }

  void RequestSchedule() override {
    if (schedule_timer_ || loop_->stopping()) return;
    schedule_timer_ = loop_->AddTimer(0, [this] {
      schedule_timer_ = 0;
      // Round-robin so no blob starves the others of freed slots.
      if (fetches_.empty()) return;
      size_t n = fetches_.size();
      size_t start = rr_++ % n;
      auto snapshot = fetches_;
      for (size_t i = 0; i < n; ++i) snapshot[(start + i) % n]->Schedule();
    });
  }

 private:
  friend class FetchHandle;

  struct CachedToken {
    std::string token;
    Clock::time_point expiry;
  };
  using TokenCallback = std::function<void(Status)>;

  static std::string HintKey(const std::string& registry, const std::string& repository) {
    return registry + " " + repository;
  }
  static std::string TokenKey(const std::string& registry, const Challenge& c) {
    return registry + " " + c.realm + " " + c.service + " " + c.scope;
  }

  const Credentials* CredentialsFor(const std::string& registry) const {
    std::string host = NormalizeRegistryHost(registry);
    auto it = credentials_.find(host);
    if (it != credentials_.end()) return &it->second;
    if (host == "registry-1.docker.io" || host == "docker.io") {
      for (const char* alias : {"index.docker.io", "docker.io", "registry-1.docker.io"}) {
        it = credentials_.find(alias);
        if (it != credentials_.end()) return &it->second;
      }
    }
    return nullptr;
  }

  Status StatusFor(const HttpResponse& r, const std::string& host, const std::string& what,
                   const std::string& server_msg) {
    std::string detail = server_msg.empty() ? "" : ": " + server_msg;
    if (r.status == 401) return Unauthenticated("authentication failed for " + host + detail);
    if (r.status == 403)
      return PermissionDenied("access to " + what + " denied by " + host + detail);
    if (r.status == 429 || r.status >= 500) {
      return Unavailable("registry " + host + " answered HTTP " + std::to_string(r.status) +
                         " for " + what + detail);
    }
    return InvalidArgument("registry " + host + " answered HTTP " + std::to_string(r.status) +
                           " for " + what + detail);
  }

  // Caller thread: runs an authenticated request on the loop and waits for it.
  StatusOr<HttpResponse> Blocking(const std::string& registry, const std::string& repository,
                                  HttpRequest req) {
    if (loop_->InLoopThread()) return Internal("blocking registry call on the fetch loop thread");
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    HttpResponse out;
    bool posted = loop_->Post([&, req = std::move(req)]() mutable {
      AuthedRequest(registry, repository, std::move(req), 0, [&](HttpResponse r) {
        std::lock_guard<std::mutex> lock(m);
        if (done) return;
        out = std::move(r);
        done = true;
        cv.notify_one();
      });
    });
    if (!posted) return Cancelled("registry client is shutting down");
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return done; });
    return out;
  }

  // Loop thread: sends req with whatever auth we hold for (registry, repository); on a 401,
  // answers the challenge and retries (twice at most, so a stale cached token is replaced).
  void AuthedRequest(const std::string& registry, const std::string& repository, HttpRequest req,
                     int round, HttpCallback done) {
    HttpRequest sent = req;
    std::string auth = AuthHeader(registry, repository);
    if (!auth.empty()) sent.headers.push_back(auth);
    StartHttp(loop_.get(), transport_, std::move(sent),
              [this, registry, repository, req = std::move(req), round, auth,
               done = std::move(done)](HttpResponse r) mutable {
                if (!r.error.ok() || r.status != 401 || round >= 2) {
                  done(std::move(r));
                  return;
                }
                StatusOr<Challenge> ch = Status(Code::kInvalidArgument, "no challenge");
                for (const auto& h : r.www_authenticate) {
                  ch = ParseChallenge(h);
                  if (ch.ok()) break;
                }
                if (!ch.ok()) {
                  done(std::move(r));  // a 401 we cannot answer
                  return;
                }
                hints_[HintKey(registry, repository)] = *ch;
                if (ch->scheme == AuthScheme::kBasic) {
                  if (!CredentialsFor(registry)) {
                    r.error = Unauthenticated("registry " + NormalizeRegistryHost(registry) +
                                              " requires a login (Basic auth) and no "
                                              "credentials are configured for it");
                    done(std::move(r));
                    return;
                  }
                  if (!auth.empty()) {  // our credentials were refused
                    done(std::move(r));
                    return;
                  }
                  AuthedRequest(registry, repository, std::move(req), round + 1, std::move(done));
                  return;
                }
                // Bearer: drop the token that was refused, then fetch (or join a fetch of) one.
                InvalidateAuth(registry, repository, auth);
                GetToken(registry, *ch,
                         [this, registry, repository, req = std::move(req), round,
                          done = std::move(done)](Status s) mutable {
                           if (!s.ok()) {
                             HttpResponse fail;
                             fail.error = s;
                             done(std::move(fail));
                             return;
                           }
                           AuthedRequest(registry, repository, std::move(req), round + 1,
                                         std::move(done));
                         });
              });
  }

  // Loop thread: makes sure a valid token for (registry, challenge) is cached. Concurrent
  // callers for the same key share one token request (single flight).
  void GetToken(const std::string& registry, const Challenge& ch, TokenCallback done) {
    std::string key = TokenKey(registry, ch);
    auto cached = tokens_.find(key);
    if (cached != tokens_.end() && Clock::now() < cached->second.expiry) {
      done(Status::Ok());
      return;
    }
    auto& waiters = token_waiters_[key];
    waiters.push_back(std::move(done));
    if (waiters.size() > 1) return;  // a request is already out

    std::string host = NormalizeRegistryHost(registry);
    auto finish = [this, key](Status s) {
      auto it = token_waiters_.find(key);
      if (it == token_waiters_.end()) return;
      auto ws = std::move(it->second);
      token_waiters_.erase(it);
      for (auto& w : ws) w(s);
    };
    auto url = TokenUrl(ch);
    if (!url.ok()) {
      finish(Unauthenticated("authentication failed for " + host + ": " + url.status().message()));
      return;
    }
    auto realm = ParseUrl(ch.realm);
    auto reg = ParseUrl(registry);
    HttpRequest req;
    req.url = *url;
    req.follow_redirects = true;
    req.max_body = kTokenCap;
    req.timeout_s = options_.request_timeout_s;
    const Credentials* cred = CredentialsFor(registry);
    // Credentials go to the realm only over https, or to the registry's own host.
    bool may_send =
        realm && reg && (realm->scheme == "https" || realm->authority == reg->authority);
    if (cred && may_send) {
      req.headers.push_back("Authorization: " +
                            BasicAuthHeaderValue(cred->username, cred->password));
    } else if (cred) {
      LOG(kWarn) << "not sending credentials for " << host << " to plain-http token realm "
                 << RedactUrl(ch.realm) << "; asking anonymously";
    }
    bool with_creds = cred && may_send;
    StartHttp(
        loop_.get(), transport_, std::move(req),
        [this, key, host, with_creds, realm_url = RedactUrl(ch.realm), finish](HttpResponse r) {
          if (!r.error.ok()) {
            finish(r.error.code() == Code::kCancelled
                       ? r.error
                       : Unavailable("token service " + realm_url + ": " + r.error.message()));
            return;
          }
          if (r.status == 401 || r.status == 403) {
            finish(Unauthenticated(
                "authentication failed for " + host +
                (with_creds ? " (credentials rejected)" : " (anonymous access refused)")));
            return;
          }
          if (r.status != 200) {
            finish(Unavailable("token service " + realm_url + " answered HTTP " +
                               std::to_string(r.status)));
            return;
          }
          auto t = ParseTokenResponse(r.body);
          if (!t.ok()) {
            finish(Unavailable("token service " + realm_url + ": " + t.status().message()));
            return;
          }
          // Renew a little early so a token does not expire mid-request.
          double life = t->expires_in_s - std::min(30.0, t->expires_in_s * 0.1);
          tokens_[key] = CachedToken{
              t->token, Clock::now() + std::chrono::milliseconds(
                                           static_cast<int64_t>(std::max(1.0, life) * 1000))};
          finish(Status::Ok());
        });
  }

  // Loop thread: resolves the blob at sources[i], falling through to the next source when a
  // mirror fails or lacks it. The last source is the origin, whose answer is final.
  void ResolveSource(const BlobLocation& where, std::vector<MirrorSet::Source> sources, size_t i,
                     std::function<void(StatusOr<ResolvedUrl>)> done) {
    MirrorSet::Source src = sources[i];
    BlobLocation at = where;
    at.registry = src.url;
    std::string url = src.url + "/v2/" + where.repository + "/blobs/" + where.digest.ToString();
    ResolveHop(at, url, 0,
               [this, where, sources = std::move(sources), i, src,
                done = std::move(done)](StatusOr<ResolvedUrl> r) mutable {
                 if (r.ok()) {
                   r->registry = src.url;
                   r->source = src.index;
                   r->mirror = src.mirror;
                   if (src.mirror) mirrors_->ReportSuccess(src.url);
                   done(std::move(r));
                   return;
                 }
                 if (!src.mirror || i + 1 >= sources.size() ||
                     r.status().code() == Code::kCancelled) {
                   done(std::move(r));
                   return;
                 }
                 if (r.status().code() == Code::kUnavailable) {
                   mirrors_->ReportFailure(src.url, r.status().message());
                 } else {
                   LOG(kInfo) << "mirror " << RedactUrl(src.url) << ": "
                              << r.status().message() << "; trying the next source";
                 }
                 ResolveSource(where, std::move(sources), i + 1, std::move(done));
               });
  }

  // Loop thread. When the loop is stopping, StartHttp completes the request at once with
  // kCancelled, so done still runs exactly once.
  void ChunksumsAt(const BlobLocation& where, ChunksumsFn done) {
    auto parts = ParseUrl(where.registry);
    if (!parts) {
      done(InvalidArgument("registry must be an http(s) URL: " + RedactUrl(where.registry)));
      return;
    }
    HttpRequest req;
    req.url = where.registry + "/v2/" + where.repository + "/chunksums/" + where.digest.ToString();
    req.follow_redirects = true;  // curl never sends our Authorization to another host
    req.max_body = kChunksumsCap;
    req.timeout_s = options_.request_timeout_s;
    AuthedRequest(where.registry, where.repository, std::move(req), 0,
                  [this, where, host = parts->authority, done = std::move(done)](HttpResponse r) {
                    done(ChunksumsFrom(where, host, r));
                  });
  }

  StatusOr<std::vector<Chunk>> ChunksumsFrom(const BlobLocation& where, const std::string& host,
                                             const HttpResponse& r) {
    std::string what = "chunksums of blob " + where.digest.Short();
    if (!r.error.ok()) return r.error;
    if (r.body_too_large) {
      return ResourceExhausted(what + " from " + host + " are over the " +
                               std::to_string(kChunksumsCap >> 20) + " MiB limit");
    }
    // A registry without the endpoint says so with 404 (docker-registry, with a JSON error
    // body), 405 or 501: the same as publishing none for this blob.
    if (r.status == 404 || r.status == 405 || r.status == 501) {
      return NotFound("registry " + host + " publishes no chunksums for blob " +
                      where.digest.Short() + " (HTTP " + std::to_string(r.status) + ")");
    }
    if (r.status != 200) {
      std::string msg;
      RegistryErrorCodes(r.body, &msg);
      return StatusFor(r, host, what, msg);
    }
    auto chunks = ParseChunksums(r.body, where.size);
    if (!chunks.ok()) return DataLoss(what + " from " + host + ": " + chunks.status().message());
    LOG(kDebug) << what << " from " << host << ": " << chunks->size() << " chunks";
    return chunks;
  }

  // Loop thread: follows same-host redirects of the blob URL; the first URL on another host (a
  // CDN, usually signed) is used for every part, without Authorization.
  void ResolveHop(const BlobLocation& where, std::string url, int hops,
                  std::function<void(StatusOr<ResolvedUrl>)> done) {
    HttpRequest req;
    req.url = url;
    req.follow_redirects = false;
    req.stop_after_headers = true;
    // A registry serving the blob itself answers 206 with one byte and keeps the connection.
    req.headers.push_back("Range: bytes=0-0");
    req.max_body = 64 << 10;
    req.timeout_s = options_.request_timeout_s;
    AuthedRequest(
        where.registry, where.repository, std::move(req), 0,
        [this, where, url, hops, done = std::move(done)](HttpResponse r) mutable {
          auto host = ParseUrl(where.registry);
          std::string h = host ? host->authority : where.registry;
          std::string what = "blob " + where.digest.Short();
          if (!r.error.ok()) {
            done(r.error);
            return;
          }
          if (r.status >= 300 && r.status < 400 && !r.redirect_url.empty()) {
            auto target = ParseUrl(r.redirect_url);
            auto base = ParseUrl(url);
            if (!target) {
              done(PermissionDenied("registry " + h + " redirected " + what +
                                    " to an unsupported URL " + RedactUrl(r.redirect_url)));
              return;
            }
            if (base && base->scheme == "https" && target->scheme != "https") {
              done(PermissionDenied("registry " + h + " redirected " + what +
                                    " from https to plain http (" + RedactUrl(r.redirect_url) +
                                    "); refusing"));
              return;
            }
            if (SameOrigin(r.redirect_url, where.registry)) {
              if (hops + 1 >= kMaxSameHostRedirects) {
                done(FailedPrecondition("too many redirects (a loop?) resolving " + what +
                                        " at " + h));
                return;
              }
              ResolveHop(where, r.redirect_url, hops + 1, std::move(done));
              return;
            }
            ResolvedUrl cdn;
            cdn.url = r.redirect_url;
            cdn.cdn = true;
            done(std::move(cdn));
            return;
          }
          if (r.status >= 200 && r.status < 300) {
            ResolvedUrl u;
            u.url = url;
            u.cdn = !SameOrigin(url, where.registry);
            u.ranged = r.status == 206;
            done(std::move(u));
            return;
          }
          if (r.status == 404) {
            done(NotFound("blob " + where.digest.ToString() + " not found in " + where.repository +
                          " at " + where.registry));
            return;
          }
          done(StatusFor(r, h, what, ""));
        });
  }

  ClientOptions options_;
  TransportConfig transport_;
  std::map<std::string, Credentials> credentials_;  // by normalized host
  std::shared_ptr<CurlLoop> loop_;
  std::unique_ptr<MirrorSet> mirrors_;  // safe for concurrent use

  // Loop thread only.
  std::unordered_map<std::string, Challenge> hints_;  // (registry, repository) -> last challenge
  std::unordered_map<std::string, CachedToken> tokens_;
  std::unordered_map<std::string, std::vector<TokenCallback>> token_waiters_;
  std::vector<std::shared_ptr<BlobFetch>> fetches_;
  std::set<Digest> completed_from_mirror_;  // blobs whose every byte arrived, some from a mirror
  int slots_used_ = 0;
  CurlLoop::TimerId schedule_timer_ = 0;
  size_t rr_ = 0;
};

FetchHandle::~FetchHandle() {
  auto f = f_;
  RegistryClientImpl* client = client_;
  if (loop_->InLoopThread()) {
    // Contract breach (destroyed inside a Sink call): cancelling here would free the transfer
    // whose callback is running. Defer to the next loop turn instead of crashing.
    LOG(kError) << "Fetch destroyed on the fetch loop thread; cancel deferred";
    loop_->Post([f, client] { client->Forget(f); });
    return;
  }
  // Once this returns no Sink call can follow: either the loop ran Forget, or it has stopped.
  loop_->RunSync([f, client] { client->Forget(f); });
}

}  // namespace

StatusOr<std::unique_ptr<RegistryClient>> RegistryClient::Create(ClientOptions options) {
  auto c = std::make_unique<RegistryClientImpl>(std::move(options));
  RETURN_IF_ERROR(c->Init());
  return std::unique_ptr<RegistryClient>(std::move(c));
}

RegistryClient::~RegistryClient() = default;

}  // namespace modelfs::fetch
