// The files a model directory shows: one per known Ollama layer, plus config.json for the config
// blob, named by media type ("application/vnd.ollama.image.model" → "model.gguf"). The caller
// also serves manifest.json from the raw manifest bytes; it is not part of ModelFiles().
//
// Naming: model → model.gguf, projector → projector.gguf, adapter → adapter.gguf,
// draft → draft.gguf, template → template, prompt (legacy) → template only when the manifest has
// no template layer (skipped otherwise), system → system, params → params, license → license,
// messages → messages. Unknown media types (tensor, json, embed, …) are skipped. When a name
// repeats, the first layer keeps it and the later ones get ".2", ".3", … in manifest order
// ("license", "license.2"), so names are unique and deterministic.
//
// Thread-safety: pure functions; never throw.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "manifest/manifest.h"

namespace modelfs::manifest {

inline constexpr std::string_view kManifestFileName = "manifest.json";
inline constexpr std::string_view kConfigFileName = "config.json";

struct ModelFile {
  std::string name;  // "model.gguf", "license.2", "config.json"
  Descriptor blob;
};

// config.json first, then the known layers in manifest order.
std::vector<ModelFile> ModelFiles(const Manifest& m);

// Whether a directory entry name is one a model directory can contain: manifest.json,
// config.json, or a layer file name above with an optional ".N" suffix (N in 2..kMaxLayers, no
// leading zeros). The FUSE layer uses it to decide whether MOUNT/a/b is file b of model a or
// model b in namespace a.
bool IsModelFileName(std::string_view name);

}  // namespace modelfs::manifest
