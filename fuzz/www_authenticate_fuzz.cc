// WWW-Authenticate headers and token responses from an untrusted registry: ParseChallenge,
// TokenUrl, ParseTokenResponse, Base64 and registry-host normalization. Invariants: a Bearer
// challenge has a realm; a token URL starts with its realm; Base64 round-trips.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fetch/auth.h"
#include "fuzz/fuzz_check.h"

namespace fetch = modelfs::fetch;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  auto c = fetch::ParseChallenge(in);
  if (c.ok()) {
    if (c->scheme == fetch::AuthScheme::kBearer) FUZZ_CHECK(!c->realm.empty());
    auto url = fetch::TokenUrl(*c);
    if (url.ok()) FUZZ_CHECK(url->rfind(c->realm, 0) == 0);
  }
  (void)fetch::ParseTokenResponse(in);
  auto decoded = fetch::Base64Decode(in);
  if (decoded) (void)fetch::Base64Encode(*decoded);
  std::string encoded = fetch::Base64Encode(in);
  auto back = fetch::Base64Decode(encoded);
  FUZZ_CHECK(back && *back == in);
  std::string host = fetch::NormalizeRegistryHost(in);
  FUZZ_CHECK(host.find('/') == std::string::npos);
  return 0;
}
