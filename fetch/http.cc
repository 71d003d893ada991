#include "fetch/http.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <ctime>

#include "fetch/url.h"

namespace modelfs::fetch {
namespace {

class HttpTransfer : public Transfer {
 public:
  HttpTransfer(HttpRequest req, HttpCallback done) : req_(std::move(req)), done_(std::move(done)) {}

  size_t OnHeader(const char* data, size_t n) override {
    if (long code = StatusLineCode(data, n)) {
      // A new response (redirect hop, 100-continue): forget the previous one's headers.
      resp_.status = code;
      resp_.www_authenticate.clear();
      resp_.content_type.clear();
      resp_.retry_after.clear();
      return n;
    }
    std::string v;
    if (HeaderValue(data, n, "www-authenticate", &v))
      resp_.www_authenticate.push_back(v);
    else if (HeaderValue(data, n, "content-type", &v))
      resp_.content_type = v;
    else if (HeaderValue(data, n, "retry-after", &v))
      resp_.retry_after = v;
    else if (n <= 2 && req_.stop_after_headers && resp_.status == 200) {
      // A full body is coming that we do not want; other replies are small.
      stopped_at_headers_ = true;
      return 0;
    }
    return n;
  }

  size_t OnBody(const char* data, size_t n) override {
    if (resp_.body.size() + n > req_.max_body) {
      resp_.body_too_large = true;
      return 0;
    }
    resp_.body.append(data, n);
    return n;
  }

  void OnDone(CURLcode rc, bool cancelled) override {
    HttpResponse r = std::move(resp_);
    if (cancelled) {
      r.error = Cancelled("shutting down");
    } else if (rc == CURLE_OK ||
               (rc == CURLE_WRITE_ERROR && (stopped_at_headers_ || r.body_too_large))) {
      long code = 0;
      curl_easy_getinfo(easy(), CURLINFO_RESPONSE_CODE, &code);
      if (code) r.status = code;
      char* redirect = nullptr;
      if (curl_easy_getinfo(easy(), CURLINFO_REDIRECT_URL, &redirect) == CURLE_OK && redirect) {
        r.redirect_url = redirect;
      }
    } else {
      auto host = ParseUrl(req_.url);
      r.error = CurlStatus(rc, error_buffer(), host ? host->authority : RedactUrl(req_.url));
    }
    auto done = std::move(done_);
    done(std::move(r));
  }

 private:
  HttpRequest req_;
  HttpCallback done_;
  HttpResponse resp_;
  bool stopped_at_headers_ = false;
};

}  // namespace

void ConfigureEasy(CURL* e, const TransportConfig& c, const std::string& url, bool follow) {
  curl_easy_setopt(e, CURLOPT_URL, url.c_str());
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
  bool https = url.rfind("https://", 0) == 0 || url.rfind("HTTPS://", 0) == 0;
  // Plain http only where the starting URL is already http.
  curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, https ? "https" : "http,https");
  curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, follow ? 1L : 0L);
  curl_easy_setopt(e, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(e, CURLOPT_TCP_KEEPIDLE, 30L);
  curl_easy_setopt(e, CURLOPT_TCP_KEEPINTVL, 15L);
  curl_easy_setopt(e, CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_2TLS));
  curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);  // prefer multiplexing onto an h2 connection
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                   static_cast<long>(std::max(1.0, c.connect_timeout_s * 1000)));
  if (!c.user_agent.empty()) curl_easy_setopt(e, CURLOPT_USERAGENT, c.user_agent.c_str());
  // An explicit --proxy; without it libcurl honours HTTP(S)_PROXY and NO_PROXY itself.
  if (!c.proxy.empty()) curl_easy_setopt(e, CURLOPT_PROXY, c.proxy.c_str());
  if (c.insecure) {
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
  } else if (!c.ca_pem.empty()) {
    // With OpenSSL, a CA blob is loaded in addition to the default CA file/path, so the extra
    // anchors do not replace the system store.
    curl_blob blob{const_cast<char*>(c.ca_pem.data()), c.ca_pem.size(), CURL_BLOB_COPY};
    curl_easy_setopt(e, CURLOPT_CAINFO_BLOB, &blob);
  }
}

Status CurlStatus(CURLcode rc, const char* errbuf, const std::string& what) {
  std::string reason = (errbuf && *errbuf) ? errbuf : curl_easy_strerror(rc);
  switch (rc) {
    case CURLE_ABORTED_BY_CALLBACK:
      return Cancelled("request to " + what + " cancelled");
    case CURLE_OPERATION_TIMEDOUT:
      return Unavailable("timed out talking to " + what + ": " + reason);
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
      return Unavailable("TLS verification of " + what + " failed: " + reason +
                         " (use --ca-file for a private CA)");
    default:
      return Unavailable("cannot reach " + what + ": " + reason);
  }
}

void StartHttp(CurlLoop* loop, const TransportConfig& config, HttpRequest request,
               HttpCallback done) {
  std::string url = request.url;
  bool follow = request.follow_redirects;
  double timeout = request.timeout_s;
  std::vector<std::string> headers = request.headers;
  auto t = std::make_unique<HttpTransfer>(std::move(request), std::move(done));
  if (t->ok()) {
    ConfigureEasy(t->easy(), config, url, follow);
    long ms = static_cast<long>(std::max(1.0, timeout * 1000));
    curl_easy_setopt(t->easy(), CURLOPT_TIMEOUT_MS, ms);
    curl_easy_setopt(t->easy(), CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(t->easy(), CURLOPT_LOW_SPEED_TIME,
                     static_cast<long>(std::max(1.0, std::ceil(timeout))));
    for (const auto& h : headers) t->AddHeader(h);
  }
  loop->Add(std::move(t));
}

bool HeaderValue(const char* data, size_t n, std::string_view name, std::string* value) {
  if (n <= name.size() || data[name.size()] != ':') return false;
  for (size_t i = 0; i < name.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(data[i])) != name[i]) return false;
  }
  std::string_view v(data + name.size() + 1, n - name.size() - 1);
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() &&
         (v.back() == '\r' || v.back() == '\n' || v.back() == ' ' || v.back() == '\t'))
    v.remove_suffix(1);
  value->assign(v);
  return true;
}

long StatusLineCode(const char* data, size_t n) {
  std::string_view s(data, n);
  if (s.rfind("HTTP/", 0) != 0) return 0;
  size_t sp = s.find(' ');
  if (sp == std::string_view::npos || sp + 4 > s.size()) return 0;
  long code = 0;
  for (size_t i = sp + 1; i < sp + 4; ++i) {
    if (!std::isdigit(static_cast<unsigned char>(s[i]))) return 0;
    code = code * 10 + (s[i] - '0');
  }
  return code;
}

double ParseRetryAfter(const std::string& value) {
  if (value.empty()) return -1;
  bool digits = std::all_of(value.begin(), value.end(),
                            [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
  if (digits) {
    if (value.size() > 9) return 1e9;
    return static_cast<double>(std::stol(value));
  }
  time_t when = curl_getdate(value.c_str(), nullptr);
  if (when < 0) return -1;
  double d = std::difftime(when, std::time(nullptr));
  return d < 0 ? 0 : d;
}

}  // namespace modelfs::fetch
