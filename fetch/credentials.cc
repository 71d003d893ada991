// LoadCredentials: docker config.json `auths`.
#include <cerrno>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "fetch/auth.h"
#include "fetch/registry.h"

namespace modelfs::fetch {

StatusOr<std::map<std::string, Credentials>> LoadCredentials(const std::string& path,
                                                             bool optional) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    int err = errno;
    if (optional && (err == ENOENT || err == ENOTDIR)) return std::map<std::string, Credentials>{};
    return ErrnoStatus(err, "reading credentials file " + path);
  }
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return IoError("reading credentials file " + path);
  return ParseCredentials(ss.str(), path);
}

StatusOr<std::map<std::string, Credentials>> ParseCredentials(std::string_view json,
                                                             const std::string& path) {
  auto j = nlohmann::json::parse(json, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgument("credentials file " + path + " is not a JSON object");
  }
  std::map<std::string, Credentials> out;
  auto auths = j.find("auths");
  if (auths == j.end()) return out;
  if (!auths->is_object())
    return InvalidArgument("credentials file " + path + ": auths is not an object");
  for (auto it = auths->begin(); it != auths->end(); ++it) {
    std::string host = NormalizeRegistryHost(it.key());
    if (host.empty()) {
      return InvalidArgument("credentials file " + path + ": bad registry key '" + it.key() + "'");
    }
    if (!it->is_object()) {
      return InvalidArgument("credentials file " + path + ": entry for " + host +
                             " is not an object");
    }
    Credentials c;
    auto a = it->find("auth");
    if (a != it->end() && a->is_string() && !a->get<std::string>().empty()) {
      auto decoded = Base64Decode(a->get<std::string>());
      size_t colon = decoded ? decoded->find(':') : std::string::npos;
      if (!decoded || colon == std::string::npos) {
        // Do not echo the value: it is a secret.
        return InvalidArgument("credentials file " + path + ": entry for " + host +
                               " has a malformed \"auth\" (want base64 of user:password)");
      }
      c.username = decoded->substr(0, colon);
      c.password = decoded->substr(colon + 1);
    } else {
      auto u = it->find("username");
      auto p = it->find("password");
      if (u != it->end() && u->is_string()) c.username = u->get<std::string>();
      if (p != it->end() && p->is_string()) c.password = p->get<std::string>();
      auto t = it->find("identitytoken");
      if (c.password.empty() && t != it->end() && t->is_string())
        c.password = t->get<std::string>();
    }
    if (c.username.empty() && c.password.empty()) continue;  // e.g. a credential-helper stub
    out[host] = std::move(c);
  }
  return out;
}

}  // namespace modelfs::fetch
