// Registry auth helpers, all pure (no I/O), safe for concurrent use:
//  - ParseChallenge: a `WWW-Authenticate` header value into {scheme, realm, service, scope}.
//  - TokenUrl / ParseTokenResponse: the Docker token protocol's request and reply.
//  - Base64 and basic-auth header encoding; credentials key normalization.
// The token cache and the single-flight refresh live in the client (registry.cc), on the fetch
// loop thread, so they need no lock.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "base/status.h"

namespace modelfs::fetch {

enum class AuthScheme { kBearer, kBasic };

struct Challenge {
  AuthScheme scheme = AuthScheme::kBearer;
  std::string realm;
  std::string service;
  std::string scope;  // may hold several scopes separated by spaces
};

// Parses a header value that may list several challenges ("Bearer realm=…, Basic realm=…");
// returns the first Bearer challenge, else the first Basic one. Scheme and parameter names are
// case-insensitive; values are tokens or quoted strings with backslash escapes. Unknown schemes
// and parameters are skipped. InvalidArgument when there is no usable challenge (a Bearer one
// needs a realm). Never crashes on hostile input; bounded work (linear in the input).
StatusOr<Challenge> ParseChallenge(std::string_view www_authenticate);

// realm?service=…&scope=…&scope=… (one scope parameter per space-separated scope). InvalidArgument
// unless the realm is an absolute http(s) URL.
StatusOr<std::string> TokenUrl(const Challenge& challenge);

struct Token {
  std::string token;
  double expires_in_s = 60;  // the spec's default when the server omits it
};
// {"token": …} or {"access_token": …}, optional "expires_in" (seconds).
StatusOr<Token> ParseTokenResponse(std::string_view body);

std::string Base64Encode(std::string_view data);
// Standard alphabet, padding optional, whitespace ignored; nullopt on junk.
std::optional<std::string> Base64Decode(std::string_view text);
// "Basic base64(user:password)".
std::string BasicAuthHeaderValue(std::string_view user, std::string_view password);

// Credentials-file key or registry URL -> "host[:port]", lowercase: "https://Host:5000/v1/" ->
// "host:5000"; "index.docker.io" stays. Empty when nothing usable.
std::string NormalizeRegistryHost(std::string_view key);

}  // namespace modelfs::fetch
