// Readahead: for one open file, which bytes to fetch ahead of a read that is about to wait.
//
// A read of missing bytes always fetches its 1 MiB-aligned window (one range request instead of
// many small ones, and boundaries a range cache in front can share). A forward stream — each
// read starting near where the previous one ended — also keeps a readahead window ahead of the
// reader that doubles from 4 MiB up to 64 MiB while the stream lasts, refilled when the reader
// gets within half a window of its end (the page cache's own async-readahead rule). A seek
// resets it. Pure logic; not thread-safe (the caller locks per open file).
#pragma once

#include <cstdint>

#include "base/range_set.h"

namespace modelfs::fs {

class Readahead {
 public:
  static constexpr uint64_t kAlign = 1 << 20;
  static constexpr uint64_t kMinWindow = 4 << 20;
  static constexpr uint64_t kMaxWindow = 64 << 20;

  // The range to prefetch for a read of [offset, offset + len) in a file of `size` bytes.
  ByteRange OnRead(uint64_t offset, uint64_t len, uint64_t size);

  uint64_t window() const { return window_; }

 private:
  uint64_t next_ = 0;       // where a streaming reader's next read is expected
  uint64_t window_ = 0;     // current readahead window; 0 when not streaming
  uint64_t ahead_end_ = 0;  // end of what was already asked for ahead of the stream
};

}  // namespace modelfs::fs
