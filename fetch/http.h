// Small HTTP requests on the CurlLoop (manifests, tokens, blob URL resolution, small blobs), and
// the easy-handle settings every request shares. Loop thread only, except TransportConfig, which
// is an immutable value.
#pragma once

#include <curl/curl.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "fetch/curl_loop.h"

namespace modelfs::fetch {

// Settings shared by every easy handle; built once by the client.
struct TransportConfig {
  std::string ca_pem;  // extra trust anchors (contents of --ca-file), added to the system CAs
  bool insecure = false;
  std::string proxy;  // CURLOPT_PROXY when set; else libcurl reads HTTP(S)_PROXY / NO_PROXY
  std::string user_agent;
  double connect_timeout_s = 10;
};

// Applies TLS, protocol, keepalive, timeout and redirect policy to an easy handle for `url`:
// redirects are followed (when follow) at most 10 times and only to https, or also to http when
// `url` itself is http.
void ConfigureEasy(CURL* easy, const TransportConfig& config, const std::string& url, bool follow);

// A curl failure as a user-facing Status: Cancelled for shutdown, Unavailable with the reason
// ("connection refused", "timed out", DNS…) otherwise. `what` names the target.
Status CurlStatus(CURLcode rc, const char* errbuf, const std::string& what);

struct HttpRequest {
  std::string url;
  std::vector<std::string> headers;  // "Name: value"
  bool follow_redirects = false;
  size_t max_body = 4u << 20;
  double timeout_s = 30;            // total; also a low-speed limit of 1 B/s over this window
  bool stop_after_headers = false;  // abort a 200 once its headers are in (skip the body)
};

struct HttpResponse {
  Status error;     // non-OK: no usable HTTP reply (transport error, shutdown, auth failure)
  long status = 0;  // HTTP status of the final response
  std::string body;
  bool body_too_large = false;
  std::string content_type;
  std::vector<std::string> www_authenticate;
  std::string retry_after;
  std::string redirect_url;  // absolute Location target when not following
};

using HttpCallback = std::function<void(HttpResponse)>;

// Loop thread. Starts the request; done runs exactly once on the loop thread.
void StartHttp(CurlLoop* loop, const TransportConfig& config, HttpRequest request,
               HttpCallback done);

// Case-insensitive header-name match on a raw header line; sets *value (trimmed) on a match.
bool HeaderValue(const char* data, size_t n, std::string_view name, std::string* value);
// "HTTP/1.1 206 Partial Content" -> 206; 0 when not a status line.
long StatusLineCode(const char* data, size_t n);

// Retry-After: delta-seconds or an HTTP date; negative when absent or unparseable.
double ParseRetryAfter(const std::string& value);

}  // namespace modelfs::fetch
