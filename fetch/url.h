// Small URL helpers for the fetch module: the parts of an absolute http(s) URL we compare
// (scheme, host[:port]) and a form safe to log. Pure; safe for concurrent use.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace modelfs::fetch {

struct UrlParts {
  std::string scheme;     // lowercase: "http" or "https" (others are rejected)
  std::string host;       // lowercase, without port or brackets' contents changed
  std::string authority;  // host[:port] as written (lowercased); default ports omitted
  std::string path;       // from the first '/' (or "/"), including any query
};

// nullopt for non-http(s) URLs, userinfo ("user:pw@host"), or an empty host.
std::optional<UrlParts> ParseUrl(std::string_view url);

// The URL without "?query" or "#fragment": signed CDN URLs carry credentials in the query.
std::string RedactUrl(std::string_view url);

// True when a and b have the same scheme and host[:port].
bool SameOrigin(std::string_view a, std::string_view b);

// Percent-encodes everything but unreserved characters (RFC 3986).
std::string UrlEncode(std::string_view s);

// Registry base URL without trailing slashes: "https://host:5000/" -> "https://host:5000".
std::string TrimRegistry(std::string_view registry);

}  // namespace modelfs::fetch
