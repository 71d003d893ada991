#include "manifest/layout.h"

#include <array>
#include <map>

namespace modelfs::manifest {
namespace {

constexpr std::string_view kOllamaPrefix = "application/vnd.ollama.image.";
constexpr std::string_view kPromptType = "application/vnd.ollama.image.prompt";
constexpr std::string_view kTemplateType = "application/vnd.ollama.image.template";

struct LayerName {
  std::string_view type_suffix;  // after kOllamaPrefix
  std::string_view file_name;
};

// "prompt" is handled separately: it maps to "template" only without a template layer.
constexpr std::array<LayerName, 10> kLayerNames = {{
    {"model", "model.gguf"},
    {"projector", "projector.gguf"},
    {"adapter", "adapter.gguf"},
    {"draft", "draft.gguf"},
    {"template", "template"},
    {"system", "system"},
    {"params", "params"},
    {"license", "license"},
    {"messages", "messages"},
    {"prompt", "template"},
}};

// The base file name for a layer's media type; empty for unknown types.
std::string_view BaseName(std::string_view media_type) {
  if (media_type.substr(0, kOllamaPrefix.size()) != kOllamaPrefix) return {};
  std::string_view suffix = media_type.substr(kOllamaPrefix.size());
  for (const LayerName& l : kLayerNames) {
    if (l.type_suffix == suffix) return l.file_name;
  }
  return {};
}

}  // namespace

std::vector<ModelFile> ModelFiles(const Manifest& m) {
  bool has_template = false;
  for (const Descriptor& d : m.layers) has_template = has_template || d.media_type == kTemplateType;

  std::vector<ModelFile> files;
  files.push_back({std::string(kConfigFileName), m.config});
  std::map<std::string_view, size_t> seen;  // base name → how many layers used it
  for (const Descriptor& d : m.layers) {
    if (d.media_type == kPromptType && has_template) continue;
    std::string_view base = BaseName(d.media_type);
    if (base.empty()) continue;
    size_t n = ++seen[base];
    std::string name(base);
    if (n > 1) name += "." + std::to_string(n);
    files.push_back({std::move(name), d});
  }
  return files;
}

bool IsModelFileName(std::string_view name) {
  if (name == kManifestFileName || name == kConfigFileName) return true;
  for (const LayerName& l : kLayerNames) {
    if (name.substr(0, l.file_name.size()) != l.file_name) continue;
    std::string_view rest = name.substr(l.file_name.size());
    if (rest.empty()) return true;
    // ".N" with N in [2, kMaxLayers], no leading zeros.
    if (rest.size() < 2 || rest.size() > 5 || rest[0] != '.' || rest[1] == '0') continue;
    size_t n = 0;
    bool digits = true;
    for (char c : rest.substr(1)) {
      digits = digits && c >= '0' && c <= '9';
      n = n * 10 + static_cast<size_t>(c - '0');
    }
    if (digits && n >= 2 && n <= kMaxLayers) return true;
  }
  return false;
}

}  // namespace modelfs::manifest
