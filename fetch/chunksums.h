// Chunksums: the per-chunk digests a registry may publish for a blob (Ollama's
// `GET /v2/<repo>/chunksums/<digest>`), one line per chunk:
//
//   sha256:<64 hex> <start>-<end>
//
// <start> and <end> are decimal byte offsets, <end> inclusive. The two fields are separated by
// one or more spaces or tabs, and spaces or tabs before the line end are ignored (Ollama calls
// the pairs "whitespace-separated"). The chunks must be contiguous and in order, start at 0 and
// cover the blob exactly ([0, blob_size)); a blank final line (a trailing "\n") and "\r\n" line
// ends are accepted, nothing else is (no leading blanks, no blank lines, no comments, no extra
// fields, no leading zeros beyond "0", no signs). A registry is untrusted, so the parser bounds
// its work: at most kMaxChunks lines, and it never allocates more than the input implies.
//
// Thread-safety: pure function; never throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "base/digest.h"
#include "base/status.h"

namespace modelfs::fetch {

inline constexpr size_t kMaxChunks = 1u << 20;

struct Chunk {
  Digest digest;
  uint64_t begin = 0;  // first byte
  uint64_t end = 0;    // exclusive (the line's <end> + 1)
};

// InvalidArgument naming the line ("chunksums line 3: …") on any violation; a blob of size 0
// has no chunks (the text must then be empty).
StatusOr<std::vector<Chunk>> ParseChunksums(std::string_view text, uint64_t blob_size);

}  // namespace modelfs::fetch
