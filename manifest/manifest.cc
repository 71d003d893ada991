#include "manifest/manifest.h"

#include <cmath>
#include <cstdio>
#include <new>
#include <nlohmann/json.hpp>

namespace modelfs::manifest {
namespace {

using Json = nlohmann::json;

constexpr size_t kMaxMediaTypeChars = 255;
constexpr size_t kMaxPlatformsListed = 8;

constexpr std::string_view kDockerManifestV1Prefix =
    "application/vnd.docker.distribution.manifest.v1";

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

// Untrusted text for a message: non-printable bytes become '?', and it is cut at 80 chars.
std::string Printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 80)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  if (s.size() > 80) out += "...";
  return out;
}

Status FieldError(std::string_view path, std::string_view what) {
  return InvalidArgument(std::string(path) + ": " + std::string(what));
}

std::string Join(std::string_view path, std::string_view key) {
  return path.empty() ? std::string(key) : std::string(path) + "." + std::string(key);
}

// Rejects JSON nested deeper than kMaxNestingDepth before handing it to the parser, so hostile
// input cannot make parsing or destruction expensive. Brackets inside strings are skipped.
Status CheckNesting(std::string_view body, std::string_view what) {
  size_t depth = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxNestingDepth) {
        return InvalidArgument(std::string(what) + " nests deeper than " +
                               std::to_string(kMaxNestingDepth) + " levels");
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return Status::Ok();
}

// Parses a capped, JSON-object body. `what` is "manifest" or "index" for messages.
StatusOr<Json> ParseObject(std::string_view body, std::string_view what) {
  if (body.size() > kMaxManifestBytes) {
    return InvalidArgument(std::string(what) + " is " + std::to_string(body.size()) +
                           " bytes (limit " + std::to_string(kMaxManifestBytes) + ")");
  }
  RETURN_IF_ERROR(CheckNesting(body, what));
  Json root;
  try {  // parse() reports syntax errors as a discarded value; this only guards bad_alloc.
    root = Json::parse(body.begin(), body.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  } catch (...) {
    return ResourceExhausted(std::string(what) + " could not be parsed: out of memory");
  }
  if (root.is_discarded()) return InvalidArgument(std::string(what) + " is not valid JSON");
  if (!root.is_object()) {
    return InvalidArgument(std::string(what) + " is a JSON " + root.type_name() +
                           ", not an object");
  }
  return root;
}

const Json* Field(const Json& object, const char* key) {
  auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

std::string FormatDouble(double d) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", d);
  return buf;
}

// A short printable-ASCII string field (media types, platform names).
StatusOr<std::string> ParseShortString(const Json& j, std::string_view path) {
  if (!j.is_string())
    return FieldError(path, std::string("must be a string, got ") + j.type_name());
  const auto& s = j.get_ref<const std::string&>();
  if (s.empty()) return FieldError(path, "is empty");
  if (s.size() > kMaxMediaTypeChars) {
    return FieldError(path, "is " + std::to_string(s.size()) + " chars (limit " +
                                std::to_string(kMaxMediaTypeChars) + ")");
  }
  for (char c : s) {
    if (c < 0x20 || c >= 0x7f)
      return FieldError(path, "contains a non-printable or non-ASCII byte");
  }
  return s;
}

StatusOr<uint64_t> ParseSize(const Json& j, std::string_view path) {
  const std::string limit = std::to_string(kMaxBlobSize) + " (2^44)";
  if (j.is_number_unsigned()) {
    auto v = j.get<uint64_t>();
    if (v > kMaxBlobSize) {
      return FieldError(path, std::to_string(v) + " exceeds the limit " + limit);
    }
    return v;
  }
  if (j.is_number_integer()) {  // signed: the parser only uses this type for negatives
    return FieldError(path, "must not be negative, got " + std::to_string(j.get<int64_t>()));
  }
  if (j.is_number_float()) {
    double d = j.get<double>();
    if (std::isfinite(d) && d >= 0 && std::floor(d) == d && d > static_cast<double>(kMaxBlobSize)) {
      return FieldError(path, FormatDouble(d) + " exceeds the limit " + limit);
    }
    return FieldError(path, "must be an unsigned integer, got " + FormatDouble(d));
  }
  return FieldError(path, std::string("must be an unsigned integer, got a ") + j.type_name());
}

StatusOr<Descriptor> ParseDescriptor(const Json& j, const std::string& path) {
  if (!j.is_object()) {
    return FieldError(path, std::string("must be an object, got ") + j.type_name());
  }
  Descriptor d;

  const Json* media_type = Field(j, "mediaType");
  if (media_type == nullptr) return FieldError(Join(path, "mediaType"), "missing");
  ASSIGN_OR_RETURN(d.media_type, ParseShortString(*media_type, Join(path, "mediaType")));

  const Json* digest = Field(j, "digest");
  if (digest == nullptr) return FieldError(Join(path, "digest"), "missing");
  if (!digest->is_string()) {
    return FieldError(Join(path, "digest"),
                      std::string("must be a string, got ") + digest->type_name());
  }
  StatusOr<Digest> parsed = Digest::Parse(digest->get_ref<const std::string&>());
  if (!parsed.ok()) return FieldError(Join(path, "digest"), parsed.status().message());
  d.digest = *parsed;

  const Json* size = Field(j, "size");
  if (size == nullptr) return FieldError(Join(path, "size"), "missing");
  ASSIGN_OR_RETURN(d.size, ParseSize(*size, Join(path, "size")));

  if (const Json* platform = Field(j, "platform"); platform != nullptr) {
    std::string ppath = Join(path, "platform");
    if (!platform->is_object()) {
      return FieldError(ppath, std::string("must be an object, got ") + platform->type_name());
    }
    if (const Json* os = Field(*platform, "os"); os != nullptr) {
      ASSIGN_OR_RETURN(d.platform_os, ParseShortString(*os, Join(ppath, "os")));
    }
    if (const Json* arch = Field(*platform, "architecture"); arch != nullptr) {
      ASSIGN_OR_RETURN(d.platform_arch, ParseShortString(*arch, Join(ppath, "architecture")));
    }
  }
  return d;
}

Status CheckSchemaVersion(const Json& root) {
  const Json* v = Field(root, "schemaVersion");
  if (v == nullptr) return FieldError("schemaVersion", "missing");
  if (v->is_number_unsigned() && v->get<uint64_t>() == 2) return Status::Ok();
  if (v->is_number()) return FieldError("schemaVersion", "want 2, got " + v->dump());
  return FieldError("schemaVersion", std::string("want 2, got a ") + v->type_name());
}

bool IsManifestType(std::string_view t) { return t == kDockerManifestV2 || t == kOciManifest; }
bool IsIndexType(std::string_view t) { return t == kDockerManifestList || t == kOciIndex; }

// The kind a (lowercased) media type names; NotFound when it names neither.
StatusOr<DocumentKind> KindOf(std::string_view type, std::string_view source) {
  if (IsManifestType(type)) return DocumentKind::kManifest;
  if (IsIndexType(type)) return DocumentKind::kIndex;
  if (type.substr(0, kDockerManifestV1Prefix.size()) == kDockerManifestV1Prefix) {
    return InvalidArgument("Docker schema 1 manifests are not supported (" + std::string(source) +
                           " " + Printable(type) + ")");
  }
  return NotFound("not a manifest type");
}

// The body's optional top-level "mediaType", validated.
StatusOr<std::string> BodyMediaType(const Json& root) {
  const Json* mt = Field(root, "mediaType");
  if (mt == nullptr) return std::string();
  return ParseShortString(*mt, "mediaType");
}

}  // namespace

StatusOr<DocumentKind> Classify(std::string_view body, std::string_view content_type) {
  std::string ct = Lower(content_type.substr(0, content_type.find(';')));
  while (!ct.empty() && (ct.back() == ' ' || ct.back() == '\t')) ct.pop_back();
  size_t first = ct.find_first_not_of(" \t");
  ct.erase(0, first == std::string::npos ? ct.size() : first);
  if (StatusOr<DocumentKind> k = KindOf(ct, "Content-Type");
      k.ok() || k.status().code() != Code::kNotFound) {
    return k;
  }

  ASSIGN_OR_RETURN(Json root, ParseObject(body, "manifest"));
  ASSIGN_OR_RETURN(std::string media_type, BodyMediaType(root));
  if (!media_type.empty()) {
    StatusOr<DocumentKind> k = KindOf(media_type, "mediaType");
    if (k.ok() || k.status().code() != Code::kNotFound) return k;
    return FieldError("mediaType", "unsupported " + Printable(media_type));
  }
  if (const Json* v = Field(root, "schemaVersion");
      v != nullptr && v->is_number_unsigned() && v->get<uint64_t>() == 1) {
    return InvalidArgument("Docker schema 1 manifests are not supported (schemaVersion 1)");
  }
  if (Field(root, "manifests") != nullptr) return DocumentKind::kIndex;
  if (Field(root, "layers") != nullptr || Field(root, "config") != nullptr) {
    return DocumentKind::kManifest;
  }
  return InvalidArgument(
      "cannot tell a manifest from an index: no known Content-Type, mediaType, layers or "
      "manifests");
}

StatusOr<Manifest> ParseManifest(std::string_view body) {
  ASSIGN_OR_RETURN(Json root, ParseObject(body, "manifest"));
  RETURN_IF_ERROR(CheckSchemaVersion(root));
  Manifest m;
  ASSIGN_OR_RETURN(m.media_type, BodyMediaType(root));
  if (!m.media_type.empty() && !IsManifestType(m.media_type)) {
    if (IsIndexType(m.media_type)) {
      return FieldError("mediaType",
                        Printable(m.media_type) + " is an image index, not a manifest");
    }
    return FieldError("mediaType", "unsupported " + Printable(m.media_type));
  }

  const Json* config = Field(root, "config");
  if (config == nullptr) return FieldError("config", "missing");
  ASSIGN_OR_RETURN(m.config, ParseDescriptor(*config, "config"));

  const Json* layers = Field(root, "layers");
  if (layers == nullptr) return FieldError("layers", "missing");
  if (!layers->is_array()) {
    return FieldError("layers", std::string("must be an array, got ") + layers->type_name());
  }
  if (layers->size() > kMaxLayers) {
    return InvalidArgument("manifest has " + std::to_string(layers->size()) + " layers (limit " +
                           std::to_string(kMaxLayers) + ")");
  }
  m.layers.reserve(layers->size());
  for (size_t i = 0; i < layers->size(); ++i) {
    ASSIGN_OR_RETURN(Descriptor d,
                     ParseDescriptor((*layers)[i], "layers[" + std::to_string(i) + "]"));
    m.layers.push_back(std::move(d));
  }
  return m;
}

StatusOr<Digest> PickFromIndex(std::string_view body) {
  ASSIGN_OR_RETURN(Json root, ParseObject(body, "index"));
  RETURN_IF_ERROR(CheckSchemaVersion(root));
  ASSIGN_OR_RETURN(std::string media_type, BodyMediaType(root));
  if (!media_type.empty() && !IsIndexType(media_type)) {
    if (IsManifestType(media_type)) {
      return FieldError("mediaType", Printable(media_type) + " is an image manifest, not an index");
    }
    return FieldError("mediaType", "unsupported " + Printable(media_type));
  }

  const Json* manifests = Field(root, "manifests");
  if (manifests == nullptr) return FieldError("manifests", "missing");
  if (!manifests->is_array()) {
    return FieldError("manifests", std::string("must be an array, got ") + manifests->type_name());
  }
  if (manifests->size() > kMaxLayers) {
    return InvalidArgument("index has " + std::to_string(manifests->size()) + " manifests (limit " +
                           std::to_string(kMaxLayers) + ")");
  }
  if (manifests->empty()) return InvalidArgument("index lists no manifests");

  std::vector<Descriptor> entries;
  entries.reserve(manifests->size());
  for (size_t i = 0; i < manifests->size(); ++i) {
    ASSIGN_OR_RETURN(Descriptor d,
                     ParseDescriptor((*manifests)[i], "manifests[" + std::to_string(i) + "]"));
    if (d.platform_os == "linux" && d.platform_arch == "amd64") return d.digest;
    entries.push_back(std::move(d));
  }
  if (entries.size() == 1) return entries[0].digest;

  std::string offered;
  for (size_t i = 0; i < entries.size() && i < kMaxPlatformsListed; ++i) {
    const Descriptor& d = entries[i];
    if (!offered.empty()) offered += ", ";
    offered += (d.platform_os.empty() ? "?" : Printable(d.platform_os)) + "/" +
               (d.platform_arch.empty() ? "?" : Printable(d.platform_arch));
  }
  if (entries.size() > kMaxPlatformsListed) {
    offered += " and " + std::to_string(entries.size() - kMaxPlatformsListed) + " more";
  }
  return InvalidArgument("index has no linux/amd64 manifest among " +
                         std::to_string(entries.size()) + " entries (platforms: " + offered + ")");
}

std::string_view AcceptHeader() {
  static constexpr std::string_view kAccept =
      "application/vnd.docker.distribution.manifest.v2+json, "
      "application/vnd.oci.image.manifest.v1+json, "
      "application/vnd.oci.image.index.v1+json, "
      "application/vnd.docker.distribution.manifest.list.v2+json";
  return kAccept;
}

}  // namespace modelfs::manifest
