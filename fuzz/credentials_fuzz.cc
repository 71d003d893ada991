// docker config.json credentials (a user's file, but parsed by a daemon that may run as root).
// Invariant: no error message echoes an "auth" value (a secret).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fetch/registry.h"
#include "fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  auto creds = modelfs::fetch::ParseCredentials(in, "config.json");
  if (creds.ok()) {
    for (const auto& [host, c] : *creds) {
      FUZZ_CHECK(!host.empty());
      FUZZ_CHECK(!c.username.empty() || !c.password.empty());
    }
  } else if (creds.status().message().find("malformed \"auth\"") != std::string::npos) {
    // The secret must not be quoted back: the message is bounded by its fixed text + host.
    FUZZ_CHECK(creds.status().message().find("base64 of user:password") != std::string::npos);
  }
  return 0;
}
