// Small helpers for the cache's file I/O: whole-buffer pread/pwrite, atomic replace of a small
// file, directory opening that never follows a symlink. Every path is a single name relative
// to a directory fd (no '/'), so a symlink planted inside the cache is refused, not followed.
// Stateless; safe for concurrent use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>
#include <string_view>

#include "base/status.h"
#include "base/unique_fd.h"

namespace modelfs::cache {

// Writes all of [data, data + len) at offset, retrying EINTR and short writes.
Status PwriteFull(int fd, const void* data, size_t len, uint64_t offset);
// Reads exactly len bytes at offset; a short file is kDataLoss.
Status PreadFull(int fd, void* data, size_t len, uint64_t offset);

// Opens (creating with mode 0755 when create) the directory name inside dir_fd, or the path
// itself when dir_fd is AT_FDCWD. A symlink or a non-directory is kFailedPrecondition.
StatusOr<UniqueFd> OpenDirAt(int dir_fd, const std::string& name, bool create);
// The names in dir_fd (not "." or ".."), sorted; empty when it cannot be read. Reads through a
// fresh open file description: a dup would share (and race on) the directory offset.
std::vector<std::string> ListDirAt(int dir_fd);

// Writes bytes to tmp_name (in tmp_dir_fd), fsyncs it and renames it over name (in dir_fd, same
// filesystem). Readers see the old or the new contents, never a mix. tmp_name must be unique to
// the writer. The directory entry is not fsynced (callers that need it call FsyncFd(dir_fd)).
Status WriteFileAtomicAt(int dir_fd, const std::string& name, int tmp_dir_fd,
                         const std::string& tmp_name, std::string_view bytes);

// Reads a whole regular file (no symlink) of at most max_bytes.
StatusOr<std::string> ReadFileAt(int dir_fd, const std::string& name, size_t max_bytes);

Status FsyncFd(int fd, std::string_view what);

}  // namespace modelfs::cache
