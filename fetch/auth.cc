#include "fetch/auth.h"

#include <cctype>
#include <nlohmann/json.hpp>

#include "fetch/url.h"

namespace modelfs::fetch {
namespace {

bool IsTokenChar(char c) {
  unsigned char u = static_cast<unsigned char>(c);
  if (std::isalnum(u)) return true;
  switch (c) {
    case '!':
    case '#':
    case '$':
    case '%':
    case '&':
    case '\'':
    case '*':
    case '+':
    case '-':
    case '.':
    case '^':
    case '_':
    case '`':
    case '|':
    case '~':
    case '/':
    case ':':  // not a tchar, but seen unquoted in realms; harmless to accept
      return true;
    default:
      return false;
  }
}

bool IEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i])))
      return false;
  }
  return true;
}

class Lexer {
 public:
  explicit Lexer(std::string_view s) : s_(s) {}
  bool done() const { return i_ >= s_.size(); }
  char peek() const { return done() ? '\0' : s_[i_]; }
  void SkipSpace() {
    while (!done() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\r' || s_[i_] == '\n')) ++i_;
  }
  void SkipSpaceAndCommas() {
    while (!done() &&
           (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == ',' || s_[i_] == '\r' || s_[i_] == '\n'))
      ++i_;
  }
  std::string_view Token() {
    size_t b = i_;
    while (!done() && IsTokenChar(s_[i_])) ++i_;
    return s_.substr(b, i_ - b);
  }
  // Token68 may end in '=' padding; we only need to skip it.
  bool Eat(char c) {
    if (peek() != c) return false;
    ++i_;
    return true;
  }
  // After the opening quote: reads to the closing quote, unescaping. Unterminated strings end at
  // the end of input (lenient, never reads past it).
  std::string Quoted() {
    std::string out;
    while (!done()) {
      char c = s_[i_++];
      if (c == '"') return out;
      if (c == '\\' && !done()) c = s_[i_++];
      out += c;
    }
    return out;
  }
  size_t pos() const { return i_; }
  void set_pos(size_t p) { i_ = p; }
  // Skips one unparseable character so the scanner always advances.
  void Skip() {
    if (!done()) ++i_;
  }

 private:
  std::string_view s_;
  size_t i_ = 0;
};

}  // namespace

StatusOr<Challenge> ParseChallenge(std::string_view header) {
  std::optional<Challenge> bearer, basic;
  Lexer lx(header);
  std::optional<Challenge> cur;
  bool cur_known = false;
  auto finish = [&] {
    if (cur && cur_known) {
      if (cur->scheme == AuthScheme::kBearer && !bearer && !cur->realm.empty()) bearer = *cur;
      if (cur->scheme == AuthScheme::kBasic && !basic) basic = *cur;
    }
    cur.reset();
    cur_known = false;
  };
  while (true) {
    lx.SkipSpaceAndCommas();
    if (lx.done()) break;
    size_t start = lx.pos();
    std::string_view name = lx.Token();
    if (name.empty()) {
      lx.Skip();
      continue;
    }
    size_t after_name = lx.pos();
    lx.SkipSpace();
    if (lx.peek() == '=') {
      // name=value: a parameter of the current challenge (or token68 padding; both skipped
      // when there is no current challenge).
      lx.Eat('=');
      while (lx.peek() == '=') lx.Eat('=');  // token68 padding "abc=="
      lx.SkipSpace();
      std::string value;
      if (lx.Eat('"')) {
        value = lx.Quoted();
      } else {
        value = std::string(lx.Token());
      }
      if (cur) {
        if (IEquals(name, "realm"))
          cur->realm = value;
        else if (IEquals(name, "service"))
          cur->service = value;
        else if (IEquals(name, "scope"))
          cur->scope = value;
      }
      continue;
    }
    // A bare token: a new challenge's scheme.
    (void)start;
    (void)after_name;
    finish();
    cur = Challenge{};
    if (IEquals(name, "bearer")) {
      cur->scheme = AuthScheme::kBearer;
      cur_known = true;
    } else if (IEquals(name, "basic")) {
      cur->scheme = AuthScheme::kBasic;
      cur_known = true;
    }
  }
  finish();
  if (bearer) return *bearer;
  if (basic) return *basic;
  return InvalidArgument("no usable Bearer or Basic challenge in WWW-Authenticate");
}

StatusOr<std::string> TokenUrl(const Challenge& c) {
  auto parts = ParseUrl(c.realm);
  if (!parts) return InvalidArgument("token realm is not an http(s) URL: " + RedactUrl(c.realm));
  std::string url = c.realm;
  char sep = url.find('?') == std::string::npos ? '?' : '&';
  if (!c.service.empty()) {
    url += sep;
    url += "service=" + UrlEncode(c.service);
    sep = '&';
  }
  std::string_view scopes = c.scope;
  while (!scopes.empty()) {
    size_t sp = scopes.find(' ');
    std::string_view one = scopes.substr(0, sp);
    if (!one.empty()) {
      url += sep;
      url += "scope=" + UrlEncode(one);
      sep = '&';
    }
    if (sp == std::string_view::npos) break;
    scopes.remove_prefix(sp + 1);
  }
  return url;
}

StatusOr<Token> ParseTokenResponse(std::string_view body) {
  auto j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return InvalidArgument("token response is not JSON");
  Token t;
  for (const char* key : {"token", "access_token"}) {
    auto it = j.find(key);
    if (it != j.end() && it->is_string() && !it->get<std::string>().empty()) {
      t.token = it->get<std::string>();
      break;
    }
  }
  if (t.token.empty()) return InvalidArgument("token response has no token");
  auto it = j.find("expires_in");
  if (it != j.end() && it->is_number() && it->get<double>() > 0) t.expires_in_s = it->get<double>();
  return t;
}

std::string Base64Encode(std::string_view in) {
  static const char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  while (i + 2 < in.size()) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
    i += 3;
  }
  if (i + 1 == in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

std::optional<std::string> Base64Decode(std::string_view in) {
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  bool padding = false;
  for (char c : in) {
    int v;
    if (c >= 'A' && c <= 'Z')
      v = c - 'A';
    else if (c >= 'a' && c <= 'z')
      v = c - 'a' + 26;
    else if (c >= '0' && c <= '9')
      v = c - '0' + 52;
    else if (c == '+')
      v = 62;
    else if (c == '/')
      v = 63;
    else if (c == '=') {
      padding = true;
      continue;
    } else if (c == ' ' || c == '\n' || c == '\r' || c == '\t')
      continue;
    else
      return std::nullopt;
    if (padding) return std::nullopt;  // data after padding
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  if (bits >= 6) return std::nullopt;  // a lone trailing character
  return out;
}

std::string BasicAuthHeaderValue(std::string_view user, std::string_view password) {
  std::string up(user);
  up += ':';
  up += password;
  return "Basic " + Base64Encode(up);
}

std::string NormalizeRegistryHost(std::string_view key) {
  std::string k(key);
  while (!k.empty() && (k.back() == ' ' || k.back() == '\t')) k.pop_back();
  while (!k.empty() && (k.front() == ' ' || k.front() == '\t')) k.erase(0, 1);
  if (k.find("://") == std::string::npos) k = "https://" + k;
  auto p = ParseUrl(k);
  if (!p) return "";
  // Keep explicit default ports out so "host" and "https://host:443" agree.
  return p->authority;
}

}  // namespace modelfs::fetch
