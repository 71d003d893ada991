// Registry manifests: classifying a manifest response, parsing an image manifest (Docker v2
// schema 2 or OCI), and picking one manifest out of an image index (OCI index or Docker manifest
// list). Bytes in, structs out: no I/O.
//
// Registries are untrusted, so parsing is strict where it matters and lenient elsewhere: the
// body is capped at kMaxManifestBytes and kMaxNestingDepth, schemaVersion must be 2, there are at
// most kMaxLayers layers (or index entries), every digest is "sha256:<64 hex>", every size is a
// JSON unsigned integer ≤ kMaxBlobSize, media types are 1–255 printable ASCII chars, and the
// config descriptor must be present. Unknown fields are ignored. Every error is InvalidArgument
// and names the offending field ("layers[3].size: …").
//
// Thread-safety: value types; all functions are pure and never throw.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/digest.h"
#include "base/status.h"

namespace modelfs::manifest {

inline constexpr std::string_view kDockerManifestV2 =
    "application/vnd.docker.distribution.manifest.v2+json";
inline constexpr std::string_view kDockerManifestList =
    "application/vnd.docker.distribution.manifest.list.v2+json";
inline constexpr std::string_view kOciManifest = "application/vnd.oci.image.manifest.v1+json";
inline constexpr std::string_view kOciIndex = "application/vnd.oci.image.index.v1+json";

inline constexpr size_t kMaxManifestBytes = size_t{4} << 20;  // 4 MiB
inline constexpr size_t kMaxNestingDepth = 64;                // JSON arrays/objects
inline constexpr size_t kMaxLayers = 4096;                    // also the index entry limit
inline constexpr uint64_t kMaxBlobSize = uint64_t{1} << 44;   // 16 TiB

struct Descriptor {
  std::string media_type;
  Digest digest;
  uint64_t size = 0;
  // From "platform": {"os", "architecture"} (index entries); empty when absent.
  std::string platform_os, platform_arch;
};

struct Manifest {
  std::string media_type;  // the body's "mediaType"; empty if absent (allowed for OCI)
  Descriptor config;
  std::vector<Descriptor> layers;  // in manifest order
};

enum class DocumentKind { kManifest, kIndex };

// Classifies a manifest response by its Content-Type (parameters and case ignored), falling
// back, when the type is absent or not a manifest type (e.g. "application/json"), to the body's
// "mediaType", and when that is absent too, to its shape ("manifests" → index; "layers" or
// "config" → manifest). Schema-1 and unknown manifest types are InvalidArgument.
StatusOr<DocumentKind> Classify(std::string_view body, std::string_view content_type);

// Parses a Docker v2 schema 2 or OCI image manifest.
StatusOr<Manifest> ParseManifest(std::string_view body);

// From an OCI index or Docker manifest list: the digest of the first linux/amd64 entry, else of
// the only entry; otherwise InvalidArgument listing the platforms offered.
StatusOr<Digest> PickFromIndex(std::string_view body);

// The value of the Accept header for manifest requests: Docker v2, OCI manifest, OCI index,
// Docker manifest list (comma-separated, no "Accept:" prefix).
std::string_view AcceptHeader();

}  // namespace modelfs::manifest
