#include "fetch/url.h"

#include <cctype>

namespace modelfs::fetch {
namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace

std::optional<UrlParts> ParseUrl(std::string_view url) {
  size_t colon = url.find("://");
  if (colon == std::string_view::npos) return std::nullopt;
  UrlParts p;
  p.scheme = Lower(url.substr(0, colon));
  if (p.scheme != "http" && p.scheme != "https") return std::nullopt;
  std::string_view rest = url.substr(colon + 3);
  size_t end = rest.find_first_of("/?#");
  std::string_view auth = rest.substr(0, end);
  if (auth.empty() || auth.find('@') != std::string_view::npos) return std::nullopt;
  std::string a = Lower(auth);
  // Split off the port, minding IPv6 literals ("[::1]:5000").
  std::string host = a;
  std::string port;
  if (!a.empty() && a.front() == '[') {
    size_t close = a.find(']');
    if (close == std::string::npos) return std::nullopt;
    host = a.substr(0, close + 1);
    if (close + 1 < a.size()) {
      if (a[close + 1] != ':') return std::nullopt;
      port = a.substr(close + 2);
    }
  } else if (size_t c = a.rfind(':'); c != std::string::npos) {
    host = a.substr(0, c);
    port = a.substr(c + 1);
  }
  for (char ch : port) {
    if (!std::isdigit(static_cast<unsigned char>(ch))) return std::nullopt;
  }
  if (host.empty()) return std::nullopt;
  if ((p.scheme == "https" && port == "443") || (p.scheme == "http" && port == "80")) port.clear();
  p.host = host;
  p.authority = port.empty() ? host : host + ":" + port;
  p.path = end == std::string_view::npos ? "/" : std::string(rest.substr(end));
  if (!p.path.empty() && p.path.front() != '/') p.path = "/" + p.path;
  return p;
}

std::string RedactUrl(std::string_view url) {
  size_t q = url.find_first_of("?#");
  std::string out(url.substr(0, q));
  if (q != std::string_view::npos) out += "?…";
  return out;
}

bool SameOrigin(std::string_view a, std::string_view b) {
  auto pa = ParseUrl(a);
  auto pb = ParseUrl(b);
  return pa && pb && pa->scheme == pb->scheme && pa->authority == pb->authority;
}

std::string UrlEncode(std::string_view s) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

std::string TrimRegistry(std::string_view registry) {
  while (!registry.empty() && registry.back() == '/') registry.remove_suffix(1);
  return std::string(registry);
}

}  // namespace modelfs::fetch
