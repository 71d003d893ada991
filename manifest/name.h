// ModelName: an Ollama model reference, "[scheme://][host/][namespace/]model[:tag]", parsed and
// validated so every accepted name can be sent to a registry and used as a cache path.
//
// Rules (a stricter reading of Ollama's types/model/name.go):
//   host       1–350 chars of [A-Za-z0-9._-], not starting with '.' or '-', plus an optional
//              ":port" (1–65535); defaults to the caller's default host.
//   namespace  1–80 chars, [A-Za-z0-9_][A-Za-z0-9_-]* (no dots); defaults to "library".
//   model      1–80 chars, [A-Za-z0-9_][A-Za-z0-9_.-]*.
//   tag        1–80 chars, [A-Za-z0-9_][A-Za-z0-9_.-]*; defaults to "latest".
// A leading "http://" or "https://" is dropped; other schemes and digest references
// ("name@sha256:…") are rejected. Names compare case-insensitively: the fields keep the case
// the user typed, and CacheKey()/Repository() fold it. Consequently no accepted name yields a
// CacheKey component that is empty, ".", "..", or contains '/', NUL or a control character.
//
// Thread-safety: value type; all functions are pure and never throw.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace modelfs::manifest {

inline constexpr std::string_view kDefaultNamespace = "library";
inline constexpr std::string_view kDefaultTag = "latest";

struct ModelName {
  std::string host;   // "registry.ollama.ai", "hf.co", "127.0.0.1:5000" (case as typed)
  std::string ns;     // "library"
  std::string model;  // "llama3.2"
  std::string tag;    // "1b", "latest", "Q4_K_M" (case as typed)

  // "<ns>/<model>", lowercase: the repository path sent to the registry (/v2/<repo>/…).
  std::string Repository() const;
  // The tag for the manifest request, case preserved (Hugging Face quant tags like Q4_K_M).
  const std::string& RequestTag() const { return tag; }
  // "host/ns/model:tag", case preserved; ParseModelName() accepts it back unchanged.
  std::string ToString() const;
  // Ollama's shortest display form (DisplayShortest): drops the host when it equals
  // default_host (case-insensitively), then also the namespace when it is "library". The tag is
  // always kept: "llama3.2:1b", "user/m:latest", "hf.co/user/repo:Q4_K_M".
  std::string DisplayName(std::string_view default_host) const;
  // "host/ns/model/tag", lowercase: four path components, each safe as a directory name.
  std::string CacheKey() const;

  friend bool operator==(const ModelName&, const ModelName&) = default;  // exact, case-sensitive
};

// Parses "[http(s)://][host/][namespace/]model[:tag]". The tag is split at the last ':' only if
// it comes after the last '/'. One part is a model, two are namespace/model, three are
// host/namespace/model; more is invalid. default_host must itself be a valid host.
// InvalidArgument, quoting (a truncated, escaped copy of) the input, on any violation.
StatusOr<ModelName> ParseModelName(std::string_view text, std::string_view default_host);

// The FUSE layout: the components of a path under the mountpoint.
//   {"model[:tag]"}, {"ns", "model[:tag]"} or {"host[:port]", "ns", "model[:tag]"}.
// A tag may only appear in the last component; a ':' in the first of three components is a port.
StatusOr<ModelName> ParseModelPath(const std::vector<std::string>& components,
                                   std::string_view default_host);

// Whether a string is a valid host ("hf.co", "127.0.0.1:5000") / namespace ("library"); the
// FUSE layer uses them to decide whether a path component can be a host or namespace prefix.
bool IsValidHost(std::string_view host);
bool IsValidNamespace(std::string_view ns);

}  // namespace modelfs::manifest
