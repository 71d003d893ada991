// The resume record of a partial blob, partial/sha256-<hex>.state. A text file:
//
//   modelfs-partial-state 2
//   digest sha256:<64 hex>
//   size <bytes>
//   frontier <bytes hashed from offset 0>
//   sha256 <hex of Sha256::SaveState() at the frontier>
//   checkpoint <offset> <hex state>  SHA-256 state after [0, offset), at piece boundaries below
//                                    the frontier (repair restarts hashing from one); ascending
//   range <begin> <end>              one line per present range, ascending, disjoint
//   verified <begin> <end>           bytes of chunks that matched their chunk digest (a subset
//                                    of the present ranges; partial/sha256-<hex>.chunks holds
//                                    the chunk digests); ascending, disjoint
//   suspect <offset> <troubles>      repair ranking of the piece starting at offset: fetch
//                                    troubles seen while it was partly written; ascending,
//                                    non-zero only
//   checksum <64 hex>                SHA-256 of every byte above this line
//
// Versions 1 (no checkpoint lines) and 2 (no verified lines) are still read.
// Decode trusts nothing: any malformed line, unknown version, wrong digest or size, unsorted or
// out-of-bounds range, frontier outside the present prefix or bad checksum rejects the whole
// file (the caller then starts from nothing). A well-formed hash state this build cannot load
// only resets the frontier to 0. Pure; thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "base/digest.h"
#include "base/range_set.h"
#include "base/status.h"

namespace modelfs::cache {

struct PartialState {
  Digest digest;
  uint64_t size = 0;
  RangeSet present;
  uint64_t frontier = 0;
  std::string sha_state;  // Sha256::SaveState() after hashing [0, frontier)
  // Sha256::SaveState() after hashing [0, offset), for some offsets <= frontier.
  std::map<uint64_t, std::string> checkpoints;
  RangeSet verified;  // within present
  std::map<uint64_t, uint32_t> suspects;  // fetch troubles by piece start offset (< size)
  // Decode only: the saved hash state was unusable here, so frontier and sha_state were reset
  // to the start (the present ranges are still good).
  bool hash_reset = false;
};

inline constexpr int kStateVersion = 3;

std::string EncodeState(const PartialState& state);
// Fails (kDataLoss for corruption, kFailedPrecondition for another version/blob/size) when the
// text is not a valid record for exactly this digest and size.
StatusOr<PartialState> DecodeState(std::string_view text, const Digest& digest, uint64_t size);

}  // namespace modelfs::cache
