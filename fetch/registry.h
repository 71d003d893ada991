// RegistryClient: the OCI distribution API as modelfs uses it, plus the part-parallel blob
// Fetcher over the same connection pool.
//
//   GET  <registry>/v2/<repository>/manifests/<reference>     (GetManifest)
//   GET  <registry>/v2/<repository>/blobs/<digest>            (Fetcher::Start, GetBlob)
//   GET  <registry>/v2/<repository>/chunksums/<digest>        (Fetcher::GetChunksums)
//
// Auth: a 401 with `WWW-Authenticate: Bearer realm=…,service=…,scope=…` is answered by asking the
// realm for a token (anonymously, or with the credentials configured for that registry host),
// then retrying with `Authorization: Bearer`; a Basic challenge is answered with basic auth.
// Tokens are cached per (registry, scope) until they expire. Blob and chunksums GETs follow
// redirects; the Authorization header is never sent to a host other than the registry's. Only
// http and https URLs are followed, and plain http only where the registry URL itself says http.
//
// Mirrors (ClientOptions::mirror, fetch/mirrors.h): manifests, small blobs and blob URL
// resolution for the mirrored registry try each healthy mirror in order, then the registry
// itself. A blob's parts go to the source that resolved it; parts failing there (or 404s) move
// the whole fetch to the next source, keeping the bytes written. A pull-through mirror that
// answers a Range with a full 200 is still pulling the blob: the fetch polls it until it
// answers 206 (FetchOptions::mirror_warm_wait_s). Refetch() and a second Start() of a blob
// that a mirror served completely (it failed verification) go to the registry itself. Small
// blobs and digest-addressed manifests from a mirror are checked against their digest here.
//
// Thread-safe. Blocking calls (GetManifest, GetBlob) must not be made on the fetch loop thread
// (they return kInternal there). The client owns the fetch loop thread ("modelfs-curl"): one
// libcurl multi handle and every easy handle live there. Destroying the client cancels every
// request and joins that thread: blocked callers get kCancelled, so does every GetChunksums
// still waiting, and each Fetch that still had work gets Sink::Failed(kCancelled). Fetch handles
// may outlive the client (they go idle).
//
// TLS: ca_file's certificates are trusted in addition to the system store (the system bundle and
// the file are handed to libcurl together as one CA blob). Proxies: libcurl's HTTP(S)_PROXY /
// NO_PROXY environment handling applies. Logs and error messages never carry credentials,
// tokens, or the query string of a (signed) URL.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"
#include "fetch/fetcher.h"
#include "fetch/mirrors.h"

namespace modelfs::fetch {

struct Credentials {
  std::string username;
  std::string password;  // or an identity token
};

struct ClientOptions {
  std::string ca_file;          // extra trust anchors (PEM); empty = system CAs only
  bool insecure = false;        // skip TLS verification (loudly logged)
  // --proxy: every request goes through this proxy ("http://host:3128"); empty = libcurl's
  // HTTP(S)_PROXY / NO_PROXY environment handling. NO_PROXY applies either way.
  std::string proxy;
  // Credentials by registry host ("registry.example.com:5000"); see LoadCredentials.
  std::map<std::string, Credentials> credentials;
  FetchOptions fetch;
  // --mirror: registries tried before mirror.origin (the mount's default registry) for its
  // manifests and blobs; see fetch/mirrors.h. No mirrors: every request goes to its registry.
  MirrorOptions mirror;
  int max_connections = 64;     // across all blobs and registries
  double connect_timeout_s = 10;
  double request_timeout_s = 30;  // for manifests, tokens and other small requests
  std::string user_agent = "modelfs/0.1";
};

// Reads credentials from a docker-style config file (`{"auths": {"host": {"auth": base64(user:pw)}
// or {"username":…,"password":…}}}`). A missing file is not an error when optional is true.
StatusOr<std::map<std::string, Credentials>> LoadCredentials(const std::string& path,
                                                            bool optional);
// The parsing half of LoadCredentials (pure, for tests and fuzzing): `source` names the file in
// errors. Never echoes a secret.
StatusOr<std::map<std::string, Credentials>> ParseCredentials(std::string_view json,
                                                             const std::string& source);

struct ManifestResponse {
  std::string body;          // the exact bytes the registry sent
  std::string content_type;  // Content-Type header, parameters stripped
};

class RegistryClient : public Fetcher {
 public:
  static StatusOr<std::unique_ptr<RegistryClient>> Create(ClientOptions options);
  ~RegistryClient() override;

  // reference is a tag or a "sha256:…" digest. NotFound when the registry says the manifest
  // or repository is unknown; Unavailable when the registry cannot be reached; Unauthenticated
  // when credentials are rejected. Bodies over 4 MiB are refused.
  virtual StatusOr<ManifestResponse> GetManifest(const std::string& registry,
                                                 const std::string& repository,
                                                 const std::string& reference) = 0;
  // A whole small blob (config, template, params…) in memory; refuses blobs over max_bytes.
  virtual StatusOr<std::string> GetBlob(const BlobLocation& where, uint64_t max_bytes) = 0;

 protected:
  RegistryClient() = default;
};

}  // namespace modelfs::fetch
