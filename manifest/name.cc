#include "manifest/name.h"

#include <cstddef>

namespace modelfs::manifest {
namespace {

constexpr size_t kMaxHostChars = 350;
constexpr size_t kMaxPartChars = 80;
// Generous bound on a whole name (scheme + host + ns + model + tag + separators), checked first
// so hostile input is rejected before any further work.
constexpr size_t kMaxNameBytes = 1024;
constexpr size_t kQuoteChars = 60;

bool IsAlnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return a.size() == b.size() && Lower(a) == Lower(b);
}

// A printable, truncated rendering of untrusted input for error messages: quotes, backslashes
// and non-printable bytes are escaped, and anything past kQuoteChars becomes "...".
std::string Quote(std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  size_t n = 0;
  for (char ch : s) {
    if (n++ == kQuoteChars) {
      out += "...";
      break;
    }
    auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20 || c >= 0x7f) {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += ch;
    }
  }
  out += '"';
  return out;
}

std::string DescribeChar(char ch) {
  auto c = static_cast<unsigned char>(ch);
  if (c == 0) return "a NUL byte";
  if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') {
    return "whitespace";
  }
  if (c < 0x20 || c == 0x7f) return "a control character";
  if (c >= 0x80) return "a non-ASCII byte";
  return std::string("'") + ch + "'";
}

// Rejects bytes that are never valid anywhere in a name, with a message naming the first one.
Status CheckBytes(std::string_view text) {
  for (char ch : text) {
    auto c = static_cast<unsigned char>(ch);
    if (c == '@') {
      return InvalidArgument("digest references (name@sha256:...) are not supported");
    }
    if (c == '\\' || c <= 0x20 || c == 0x7f) return InvalidArgument("contains " + DescribeChar(ch));
  }
  return Status::Ok();
}

// Namespace, model and tag: [A-Za-z0-9_] then [A-Za-z0-9_-] plus '.' when allow_dot.
Status CheckPart(std::string_view kind, std::string_view part, bool allow_dot) {
  if (part.empty()) return InvalidArgument(std::string(kind) + " is empty");
  if (part.size() > kMaxPartChars) {
    return InvalidArgument(std::string(kind) + " is " + std::to_string(part.size()) +
                           " chars (limit " + std::to_string(kMaxPartChars) + ")");
  }
  if (!IsAlnum(part[0]) && part[0] != '_') {
    return InvalidArgument(std::string(kind) + " " + Quote(part) +
                           " must start with a letter, digit or '_'");
  }
  for (char c : part) {
    if (IsAlnum(c) || c == '_' || c == '-' || (allow_dot && c == '.')) continue;
    return InvalidArgument(std::string(kind) + " " + Quote(part) + " may not contain " +
                           DescribeChar(c));
  }
  return Status::Ok();
}

Status CheckHost(std::string_view host) {
  if (host.empty()) return InvalidArgument("host is empty");
  if (host.size() > kMaxHostChars) {
    return InvalidArgument("host is " + std::to_string(host.size()) + " chars (limit " +
                           std::to_string(kMaxHostChars) + ")");
  }
  std::string_view hostname = host;
  size_t colon = host.find(':');
  if (colon != std::string_view::npos) {
    hostname = host.substr(0, colon);
    std::string_view port = host.substr(colon + 1);
    bool digits = !port.empty() && port.size() <= 5;
    for (char c : port) digits = digits && IsDigit(c);
    unsigned value = 0;
    if (digits) {
      for (char c : port) value = value * 10 + static_cast<unsigned>(c - '0');
    }
    if (!digits || value == 0 || value > 65535) {
      return InvalidArgument("host " + Quote(host) + " has an invalid port (want 1-65535)");
    }
  }
  if (hostname.empty()) return InvalidArgument("host " + Quote(host) + " has no hostname");
  if (hostname[0] == '.' || hostname[0] == '-') {
    return InvalidArgument("host " + Quote(host) + " may not start with '.' or '-'");
  }
  for (char c : hostname) {
    if (IsAlnum(c) || c == '.' || c == '-' || c == '_') continue;
    return InvalidArgument("host " + Quote(host) + " may not contain " + DescribeChar(c));
  }
  return Status::Ok();
}

Status CheckName(const ModelName& n) {
  RETURN_IF_ERROR(CheckHost(n.host));
  RETURN_IF_ERROR(CheckPart("namespace", n.ns, /*allow_dot=*/false));
  RETURN_IF_ERROR(CheckPart("model", n.model, /*allow_dot=*/true));
  RETURN_IF_ERROR(CheckPart("tag", n.tag, /*allow_dot=*/true));
  return Status::Ok();
}

// Splits "model[:tag]" at the last ':'; tag is empty-but-present (set has_tag) for "model:".
void SplitTag(std::string_view s, std::string_view* rest, std::string_view* tag, bool* has_tag) {
  size_t colon = s.rfind(':');
  size_t slash = s.rfind('/');
  *has_tag = colon != std::string_view::npos && (slash == std::string_view::npos || colon > slash);
  *rest = *has_tag ? s.substr(0, colon) : s;
  *tag = *has_tag ? s.substr(colon + 1) : std::string_view();
}

}  // namespace

std::string ModelName::Repository() const { return Lower(ns) + "/" + Lower(model); }

std::string ModelName::ToString() const { return host + "/" + ns + "/" + model + ":" + tag; }

std::string ModelName::DisplayName(std::string_view default_host) const {
  std::string out;
  if (!EqualsIgnoreCase(host, default_host)) {
    out = host + "/" + ns + "/";
  } else if (!EqualsIgnoreCase(ns, kDefaultNamespace)) {
    out = ns + "/";
  }
  return out + model + ":" + tag;
}

std::string ModelName::CacheKey() const {
  return Lower(host) + "/" + Lower(ns) + "/" + Lower(model) + "/" + Lower(tag);
}

bool IsValidHost(std::string_view host) { return CheckHost(host).ok(); }

bool IsValidNamespace(std::string_view ns) {
  return CheckPart("namespace", ns, /*allow_dot=*/false).ok();
}

StatusOr<ModelName> ParseModelName(std::string_view text, std::string_view default_host) {
  auto fail = [&](const Status& s) {
    return InvalidArgument("invalid model name " + Quote(text) + ": " + s.message());
  };
  if (text.empty()) return fail(InvalidArgument("name is empty"));
  if (text.size() > kMaxNameBytes) {
    return fail(InvalidArgument("name is " + std::to_string(text.size()) + " bytes (limit " +
                                std::to_string(kMaxNameBytes) + ")"));
  }
  if (Status s = CheckBytes(text); !s.ok()) return fail(s);

  std::string_view rest = text;
  if (size_t sep = rest.find("://"); sep != std::string_view::npos) {
    std::string scheme = Lower(rest.substr(0, sep));
    if (scheme != "http" && scheme != "https") {
      return fail(InvalidArgument("unsupported scheme " + Quote(rest.substr(0, sep)) +
                                  " (want http:// or https://)"));
    }
    rest = rest.substr(sep + 3);
  }

  std::string_view tag;
  bool has_tag = false;
  SplitTag(rest, &rest, &tag, &has_tag);
  if (has_tag && tag.empty()) return fail(InvalidArgument("tag is empty (nothing after ':')"));

  if (rest.empty()) return fail(InvalidArgument("model is empty"));
  std::vector<std::string_view> parts;
  for (size_t start = 0;;) {
    size_t slash = rest.find('/', start);
    parts.push_back(rest.substr(start, slash == std::string_view::npos ? slash : slash - start));
    if (slash == std::string_view::npos) break;
    if (parts.size() > 3) break;  // already too many; stop splitting hostile input
    start = slash + 1;
  }
  if (parts.size() > 3) {
    return fail(InvalidArgument("too many '/'-separated parts (at most host/namespace/model)"));
  }
  for (std::string_view p : parts) {
    if (p.empty()) return fail(InvalidArgument("has an empty part (leading, trailing or '//')"));
  }

  ModelName n;
  n.host = parts.size() == 3 ? std::string(parts[0]) : std::string(default_host);
  n.ns = parts.size() >= 2 ? std::string(parts[parts.size() - 2]) : std::string(kDefaultNamespace);
  n.model = std::string(parts.back());
  n.tag = has_tag ? std::string(tag) : std::string(kDefaultTag);
  if (parts.size() < 3) {
    if (Status s = CheckHost(n.host); !s.ok()) {
      return InvalidArgument("invalid default host: " + s.message());
    }
  }
  if (Status s = CheckName(n); !s.ok()) return fail(s);
  return n;
}

StatusOr<ModelName> ParseModelPath(const std::vector<std::string>& components,
                                   std::string_view default_host) {
  std::string joined;
  for (const std::string& c : components) {
    if (!joined.empty()) joined += '/';
    joined += c.substr(0, kMaxNameBytes);
  }
  auto fail = [&](const Status& s) {
    return InvalidArgument("invalid model path " + Quote(joined) + ": " + s.message());
  };
  if (components.empty() || components.size() > 3) {
    return fail(InvalidArgument("want 1 to 3 components (host/namespace/model), got " +
                                std::to_string(components.size())));
  }
  for (size_t i = 0; i < components.size(); ++i) {
    const std::string& c = components[i];
    if (c.empty()) return fail(InvalidArgument("has an empty component"));
    if (c.size() > kMaxHostChars) {
      return fail(InvalidArgument("component is " + std::to_string(c.size()) + " chars (limit " +
                                  std::to_string(kMaxHostChars) + ")"));
    }
    if (Status s = CheckBytes(c); !s.ok()) return fail(s);
    if (c.find('/') != std::string::npos) return fail(InvalidArgument("component contains '/'"));
    bool is_last = i + 1 == components.size();
    bool is_host = components.size() == 3 && i == 0;
    if (!is_last && !is_host && c.find(':') != std::string::npos) {
      return fail(InvalidArgument("a tag (':') may only appear in the last component"));
    }
  }

  std::string_view model, tag;
  bool has_tag = false;
  SplitTag(components.back(), &model, &tag, &has_tag);
  if (has_tag && tag.empty()) return fail(InvalidArgument("tag is empty (nothing after ':')"));

  ModelName n;
  n.host = components.size() == 3 ? components[0] : std::string(default_host);
  n.ns =
      components.size() >= 2 ? components[components.size() - 2] : std::string(kDefaultNamespace);
  n.model = std::string(model);
  n.tag = has_tag ? std::string(tag) : std::string(kDefaultTag);
  if (components.size() < 3) {
    if (Status s = CheckHost(n.host); !s.ok()) {
      return InvalidArgument("invalid default host: " + s.message());
    }
  }
  if (Status s = CheckName(n); !s.ok()) return fail(s);
  return n;
}

}  // namespace modelfs::manifest
