// Model names typed by users (and path components under the mount): ParseModelName,
// ParseModelPath, IsValidHost/IsValidNamespace. Invariants: an accepted name's CacheKey has four
// safe path components, and ToString() parses back to the same name.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz/fuzz_check.h"
#include "manifest/name.h"

using modelfs::manifest::ModelName;

namespace {

void CheckSafe(const ModelName& n) {
  std::string key = n.CacheKey();
  int parts = 0;
  size_t start = 0;
  while (true) {
    size_t slash = key.find('/', start);
    std::string_view c(key.data() + start,
                       (slash == std::string::npos ? key.size() : slash) - start);
    FUZZ_CHECK(!c.empty() && c != "." && c != "..");
    for (unsigned char ch : c) FUZZ_CHECK(ch >= 0x20 && ch != 0x7f);
    ++parts;
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  FUZZ_CHECK(parts == 4);
  auto again = modelfs::manifest::ParseModelName(n.ToString(), "registry.ollama.ai");
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(*again == n);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto n = modelfs::manifest::ParseModelName(text, "registry.ollama.ai");
  if (n.ok()) CheckSafe(*n);

  std::vector<std::string> components;
  size_t start = 0;
  while (start <= text.size() && components.size() < 8) {
    size_t slash = text.find('/', start);
    components.emplace_back(text.substr(start, slash == std::string_view::npos
                                                   ? std::string_view::npos
                                                   : slash - start));
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  auto p = modelfs::manifest::ParseModelPath(components, "registry.ollama.ai");
  if (p.ok()) CheckSafe(*p);
  (void)modelfs::manifest::IsValidHost(text);
  (void)modelfs::manifest::IsValidNamespace(text);
  return 0;
}
