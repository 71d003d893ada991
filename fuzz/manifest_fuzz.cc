// Manifest responses from an untrusted registry: Classify, ParseManifest, PickFromIndex, and the
// file names ModelFiles derives from layers. Input: the first line is the Content-Type, the rest
// the body. Invariants: limits hold, and every file name is one component that
// IsModelFileName accepts (so it can never escape the model directory).
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>

#include "fuzz/fuzz_check.h"
#include "manifest/layout.h"
#include "manifest/manifest.h"

namespace mf = modelfs::manifest;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  size_t nl = in.find('\n');
  std::string_view content_type = nl == std::string_view::npos ? "" : in.substr(0, nl);
  std::string_view body = nl == std::string_view::npos ? in : in.substr(nl + 1);

  (void)mf::Classify(body, content_type);
  auto m = mf::ParseManifest(body);
  if (m.ok()) {
    FUZZ_CHECK(m->layers.size() <= mf::kMaxLayers);
    FUZZ_CHECK(m->config.size <= mf::kMaxBlobSize);
    std::set<std::string> names;
    for (const auto& f : mf::ModelFiles(*m)) {
      FUZZ_CHECK(!f.name.empty() && f.name != "." && f.name != "..");
      FUZZ_CHECK(f.name.find('/') == std::string::npos);
      FUZZ_CHECK(f.name.find('\0') == std::string::npos);
      FUZZ_CHECK(mf::IsModelFileName(f.name));
      FUZZ_CHECK(names.insert(f.name).second);  // unique
      FUZZ_CHECK(f.blob.size <= mf::kMaxBlobSize);
    }
  }
  (void)mf::PickFromIndex(body);
  return 0;
}
