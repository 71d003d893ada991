#include "cache/file_util.h"

#include <algorithm>

#include <dirent.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

namespace modelfs::cache {

Status PwriteFull(int fd, const void* data, size_t len, uint64_t offset) {
  const char* p = static_cast<const char*>(data);
  while (len > 0) {
    ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "pwrite");
    }
    if (n == 0) return IoError("pwrite wrote nothing");
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status PreadFull(int fd, void* data, size_t len, uint64_t offset) {
  char* p = static_cast<char*>(data);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "pread");
    }
    if (n == 0) return DataLoss("file is shorter than expected");
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

StatusOr<UniqueFd> OpenDirAt(int dir_fd, const std::string& name, bool create) {
  if (create && ::mkdirat(dir_fd, name.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoStatus(errno, "mkdir " + name);
  }
  int fd = ::openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    // O_NOFOLLOW on a symlink gives ELOOP; O_DIRECTORY on a file gives ENOTDIR.
    if (errno == ELOOP || errno == ENOTDIR) {
      return FailedPrecondition(name + " is a symlink or not a directory; refusing to use it");
    }
    return ErrnoStatus(errno, "open directory " + name);
  }
  return UniqueFd(fd);
}

Status FsyncFd(int fd, std::string_view what) {
  if (::fsync(fd) != 0) return ErrnoStatus(errno, "fsync " + std::string(what));
  return Status::Ok();
}

Status WriteFileAtomicAt(int dir_fd, const std::string& name, int tmp_dir_fd,
                         const std::string& tmp_name, std::string_view bytes) {
  // A leftover temp (crash) or a planted symlink is removed first; O_EXCL|O_NOFOLLOW then
  // guarantees we write a fresh regular file of our own.
  ::unlinkat(tmp_dir_fd, tmp_name.c_str(), 0);
  UniqueFd fd(::openat(tmp_dir_fd, tmp_name.c_str(),
                       O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (!fd.valid()) return ErrnoStatus(errno, "create " + tmp_name);
  Status st = PwriteFull(fd.get(), bytes.data(), bytes.size(), 0);
  if (st.ok()) st = FsyncFd(fd.get(), tmp_name);
  if (st.ok() && ::renameat(tmp_dir_fd, tmp_name.c_str(), dir_fd, name.c_str()) != 0) {
    st = ErrnoStatus(errno, "rename " + tmp_name + " to " + name);
  }
  if (!st.ok()) ::unlinkat(tmp_dir_fd, tmp_name.c_str(), 0);
  return st;
}

StatusOr<std::string> ReadFileAt(int dir_fd, const std::string& name, size_t max_bytes) {
  UniqueFd fd(::openat(dir_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(errno, "open " + name);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(errno, "stat " + name);
  if (!S_ISREG(st.st_mode)) return FailedPrecondition(name + " is not a regular file");
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return ResourceExhausted(name + " is larger than " + std::to_string(max_bytes) + " bytes");
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < out.size()) {
    ssize_t n = ::pread(fd.get(), out.data() + got, out.size() - got, static_cast<off_t>(got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "read " + name);
    }
    if (n == 0) break;  // shrank under us: return what is there
    got += static_cast<size_t>(n);
  }
  out.resize(got);
  return out;
}

std::vector<std::string> ListDirAt(int dir_fd) {
  std::vector<std::string> out;
  int fd = ::openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return out;
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    ::close(fd);
    return out;
  }
  while (struct dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(std::move(name));
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace modelfs::cache
