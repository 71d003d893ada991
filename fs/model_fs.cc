#define FUSE_USE_VERSION 312
#include "fs/model_fs.h"

#include <fuse3/fuse_lowlevel.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <ctime>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/log.h"
#include "base/metrics.h"
#include "fs/control.h"
#include "fs/readahead.h"
#include "manifest/layout.h"

namespace modelfs::fs {
namespace {

constexpr double kFileTimeout = 3600;   // files are pinned to a digest: their attrs never change
constexpr double kDirTimeout = 60;      // a tag may move; re-resolution is per mount for now
constexpr char kManifestFile[] = "manifest.json";
constexpr unsigned kMaxRead = 1 << 20;  // bytes per FUSE read request

// kControlDir/kControlFile: MOUNT/.modelfs and MOUNT/.ollama (fs/control.h); an .ollama
// manifest is a kMemFile and an .ollama blob a kBlobFile of a model that has it.
enum class Kind { kRoot, kDir, kBlobFile, kMemFile, kControlDir, kControlFile };

// An inode. Immutable once published in ModelFs::nodes_; nodes live for the mount's lifetime
// (their number is bounded by distinct valid names looked up), so forget needs no bookkeeping.
struct Node {
  fuse_ino_t ino = 0;
  Kind kind = Kind::kRoot;
  std::vector<std::string> path;               // components under the mountpoint
  std::shared_ptr<const ResolvedModel> model;  // set for a model directory and its files
  manifest::Descriptor blob;                   // kBlobFile
  uint64_t size = 0;                           // files
  mutable std::atomic<bool> page_cache_clean{false};  // see Open
};

// What an open file handle points to (fuse_file_info::fh).
struct OpenFile {
  const Node* node;
  std::shared_ptr<cache::Blob> blob;  // kBlobFile
  std::string content;                // kControlFile: generated at open
  std::mutex mu;                      // the kernel may send one file's reads concurrently
  Readahead readahead;                // GUARDED_BY(mu)
};

struct DirEntry {
  std::string name;
  bool is_dir;
  fuse_ino_t ino = 0;  // 0 until looked up
};

bool LooksLikeHost(const std::string& c) {
  return manifest::IsValidHost(c) &&
         (c.find('.') != std::string::npos || c.find(':') != std::string::npos ||
          c == "localhost");
}

class ModelFs {
 public:
  ModelFs(const MountOptions& options) : options_(options), start_time_(time(nullptr)) {
    auto root = std::make_unique<Node>();
    root->ino = FUSE_ROOT_ID;
    root->kind = Kind::kRoot;
    nodes_.emplace(FUSE_ROOT_ID, std::move(root));
  }

  void SetServices(const Services& s) {
    resolver_ = s.resolver;
    cache_ = s.cache;
    control_ = s.control;
  }

  static ModelFs* From(fuse_req_t req) { return static_cast<ModelFs*>(fuse_req_userdata(req)); }

  void Init(fuse_conn_info* conn) {
    // Reads are answered with fd-backed buffers: let libfuse splice them from the cache file.
    if (conn->capable & FUSE_CAP_SPLICE_WRITE) conn->want |= FUSE_CAP_SPLICE_WRITE;
    if (conn->capable & FUSE_CAP_SPLICE_MOVE) conn->want |= FUSE_CAP_SPLICE_MOVE;
    conn->want &= ~static_cast<unsigned>(FUSE_CAP_WRITEBACK_CACHE);
    conn->max_read = kMaxRead;  // must match -o max_read
    conn->max_readahead = std::max(conn->max_readahead, kMaxRead);
    conn->max_background = 64;
    conn->congestion_threshold = 48;
  }

  void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name_c) {
    const Node* p = Get(parent);
    if (p == nullptr) return (void)fuse_reply_err(req, ENOENT);
    if (!IsDir(*p)) {
      return (void)fuse_reply_err(req, ENOTDIR);
    }
    std::string name(name_c);
    if (name.size() > 255) return (void)fuse_reply_err(req, ENAMETOOLONG);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = children_.find({parent, name});
      if (it != children_.end()) return ReplyEntry(req, nodes_.at(it->second).get());
    }
    auto child = MakeChild(*p, name);
    if (!child.ok()) return (void)fuse_reply_err(req, StatusToErrno(child.status()));
    ReplyEntry(req, Publish(parent, name, std::move(*child)));
  }

  void GetAttr(fuse_req_t req, fuse_ino_t ino) {
    const Node* n = Get(ino);
    if (n == nullptr) return (void)fuse_reply_err(req, ENOENT);
    struct stat st = Stat(*n);
    fuse_reply_attr(req, &st, IsDir(*n) ? kDirTimeout : kFileTimeout);
  }

  void Open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    const Node* n = Get(ino);
    if (n == nullptr) return (void)fuse_reply_err(req, ENOENT);
    if (IsDir(*n)) return (void)fuse_reply_err(req, EISDIR);
    if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC)) {
      return (void)fuse_reply_err(req, EROFS);
    }
    auto file = std::make_unique<OpenFile>();
    file->node = n;
    if (n->kind == Kind::kControlFile) {  // made now, so its size is unknown ahead: direct_io
      auto text = control_->Generate(n->path);
      if (!text.ok()) return (void)fuse_reply_err(req, StatusToErrno(text.status()));
      file->content = std::move(*text);
      fi->direct_io = 1;
      fi->fh = reinterpret_cast<uint64_t>(file.release());
      if (fuse_reply_open(req, fi) != 0) Release(fi);
      return;
    }
    if (n->kind == Kind::kBlobFile) {
      auto blob = cache_->OpenBlob(n->model->Locate(n->blob));
      if (!blob.ok()) {
        LOG(kError) << "open " << Join(n->path) << ": " << blob.status().ToString();
        return (void)fuse_reply_err(req, StatusToErrno(blob.status()));
      }
      file->blob = std::move(*blob);
      file->blob->Materialize();
      // The kernel keeps a verified blob's pages across opens, but only once an open after the
      // verification has dropped whatever it cached before (bytes that a repair replaced).
      cache::BlobStatus status = file->blob->GetStatus();
      fi->keep_cache =
          status.state == cache::BlobState::kVerified && n->page_cache_clean.exchange(true);
      if (control_ != nullptr) control_->Observe(std::move(status));
    } else {
      fi->keep_cache = 1;
    }
    fi->fh = reinterpret_cast<uint64_t>(file.release());
    if (fuse_reply_open(req, fi) != 0) Release(fi);
  }

  void Read(fuse_req_t req, size_t size, off_t off, fuse_file_info* fi) {
    last_read_ns_.store(NowNs(), std::memory_order_relaxed);
    auto* file = reinterpret_cast<OpenFile*>(fi->fh);
    const Node* n = file->node;
    if (n->kind == Kind::kControlFile) return ReadControl(req, *file, size, off);
    uint64_t offset = static_cast<uint64_t>(off);
    if (off < 0) return (void)fuse_reply_err(req, EINVAL);
    if (offset >= n->size || size == 0) return (void)fuse_reply_buf(req, nullptr, 0);
    size = static_cast<size_t>(std::min<uint64_t>(size, n->size - offset));
    if (n->kind == Kind::kMemFile) {
      return (void)fuse_reply_buf(req, n->model->manifest_bytes.data() + offset, size);
    }
    // The window around the read (aligned, and readahead for a stream) starts at the read's
    // own offset, so the bytes it waits for are the first of the request that brings them.
    ByteRange ahead;
    {
      std::lock_guard<std::mutex> lock(file->mu);
      ahead = file->readahead.OnRead(offset, size, n->size);
    }
    ahead.begin = std::max(ahead.begin, offset);
    file->blob->Prefetch(ahead.begin, ahead.size());
    // Parked until the bytes are present, answered from whichever thread brings them. Once the
    // reply is sent the file may be released: nothing below may touch `file`.
    const auto start = std::chrono::steady_clock::now();
    file->blob->WhenReadable(offset, size, [req, offset, size, start](const Status& status,
                                                                     int fd) {
      metrics::ReadWaitSeconds().Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      if (!status.ok()) {
        if (status.code() != Code::kCancelled) LOG(kWarn) << "read failed: " << status.ToString();
        fuse_reply_err(req, EIO);
        return;
      }
      fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
      buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
      buf.buf[0].fd = fd;
      buf.buf[0].pos = static_cast<off_t>(offset);
      fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
    });
  }

  void Release(fuse_file_info* fi) {
    auto* file = reinterpret_cast<OpenFile*>(fi->fh);
    if (file->blob && control_ != nullptr) control_->Observe(file->blob->GetStatus());
    delete file;
  }

  void OpenDir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    const Node* n = Get(ino);
    if (n == nullptr) return (void)fuse_reply_err(req, ENOENT);
    if (!IsDir(*n)) return (void)fuse_reply_err(req, ENOTDIR);
    auto entries = std::make_unique<std::vector<DirEntry>>(List(*n));
    {
      std::lock_guard<std::mutex> lock(mu_);
      (*entries)[0].ino = n->ino;
      for (auto& e : *entries) {
        auto it = children_.find({n->ino, e.name});
        if (it != children_.end()) e.ino = it->second;
      }
    }
    fi->fh = reinterpret_cast<uint64_t>(entries.release());
    if (fuse_reply_open(req, fi) != 0) ReleaseDir(fi);
  }

  void ReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
    auto* entries = reinterpret_cast<std::vector<DirEntry>*>(fi->fh);
    std::vector<char> buf(size);
    size_t used = 0;
    for (size_t i = static_cast<size_t>(off); i < entries->size(); ++i) {
      const DirEntry& e = (*entries)[i];
      struct stat st {};
      // Not 0 (readdir(3) skips those); the inode is only known once the entry is looked up.
      st.st_ino = e.ino != 0 ? e.ino : 0xffffffff;
      st.st_mode = e.is_dir ? S_IFDIR : S_IFREG;
      size_t need = fuse_add_direntry(req, buf.data() + used, size - used, e.name.c_str(), &st,
                                      static_cast<off_t>(i + 1));
      if (need > size - used) break;
      used += need;
    }
    fuse_reply_buf(req, buf.data(), used);
  }

  void ReleaseDir(fuse_file_info* fi) {
    delete reinterpret_cast<std::vector<DirEntry>*>(fi->fh);
  }

 private:
  static bool IsDir(const Node& n) {
    return n.kind == Kind::kRoot || n.kind == Kind::kDir || n.kind == Kind::kControlDir;
  }

  // ---- Control directory, .ollama view and xattrs (fs/control.h) ----

  void ReadControl(fuse_req_t req, const OpenFile& file, size_t size, off_t off) {
    if (off < 0) return (void)fuse_reply_err(req, EINVAL);
    const std::string& c = file.content;
    size_t begin = std::min(c.size(), static_cast<size_t>(off));
    // A copy: once the reply is in the kernel, the reader may close and Release() may free
    // `file` while fuse_reply_buf (or a sanitizer checking its buffer) still runs here.
    const std::string slice = c.substr(begin, std::min(size, c.size() - begin));
    fuse_reply_buf(req, slice.data(), slice.size());
  }

  bool IsControlChild(const Node& parent, const std::string& name) const {
    return control_ != nullptr &&
           (parent.kind == Kind::kControlDir ||
            (parent.kind == Kind::kRoot && (name == kControlDirName || name == kOllamaDirName)));
  }

  StatusOr<std::unique_ptr<Node>> MakeControlChild(const Node& parent, const std::string& name) {
    auto child = std::make_unique<Node>();
    child->path = parent.path;
    child->path.push_back(name);
    ASSIGN_OR_RETURN(ControlEntry e, control_->Lookup(child->path));
    switch (e.kind) {
      case ControlEntry::Kind::kDir:
        child->kind = Kind::kControlDir;
        break;
      case ControlEntry::Kind::kGenerated:
        child->kind = Kind::kControlFile;
        break;
      case ControlEntry::Kind::kManifest:
        child->kind = Kind::kMemFile;
        child->model = e.model;
        child->size = e.model->manifest_bytes.size();
        break;
      case ControlEntry::Kind::kBlob:
        child->kind = Kind::kBlobFile;
        child->model = e.model;
        child->blob = e.blob;
        child->size = e.blob.size;
        break;
    }
    return child;
  }

 public:
  // getxattr(2) with size 0 asks for the length; ERANGE when the buffer is too small.
  void GetXattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
    const Node* n = Get(ino);
    if (n == nullptr) return (void)fuse_reply_err(req, ENOENT);
    // Cheap refusal of what the kernel and ls(1) probe (security.*, system.posix_acl_*).
    if (std::strncmp(name, "user.modelfs.", 13) != 0) return (void)fuse_reply_err(req, ENODATA);
    for (const auto& [key, value] : Xattrs(*n)) {
      if (key != name) continue;
      if (size == 0) return (void)fuse_reply_xattr(req, value.size());
      if (size < value.size()) return (void)fuse_reply_err(req, ERANGE);
      return (void)fuse_reply_buf(req, value.data(), value.size());
    }
    fuse_reply_err(req, ENODATA);
  }

  void ListXattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
    const Node* n = Get(ino);
    if (n == nullptr) return (void)fuse_reply_err(req, ENOENT);
    std::string names;
    for (const auto& [key, value] : Xattrs(*n)) names += key + '\0';
    if (size == 0) return (void)fuse_reply_xattr(req, names.size());
    if (size < names.size()) return (void)fuse_reply_err(req, ERANGE);
    fuse_reply_buf(req, names.data(), names.size());
  }

 private:
  std::vector<std::pair<std::string, std::string>> Xattrs(const Node& n) {
    if (n.kind != Kind::kBlobFile || control_ == nullptr) return {};
    return control_->BlobXattrs(n.blob);
  }

  static std::string Join(const std::vector<std::string>& path) {
    std::string out;
    for (const auto& c : path) out += (out.empty() ? "" : "/") + c;
    return out;
  }

  const Node* Get(fuse_ino_t ino) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = nodes_.find(ino);
    return it == nodes_.end() ? nullptr : it->second.get();
  }

  // Inserts child under (parent, name) unless a racing lookup already did; returns the winner.
  const Node* Publish(fuse_ino_t parent, const std::string& name, std::unique_ptr<Node> child) {
    std::lock_guard<std::mutex> lock(mu_);
    auto [it, inserted] = children_.emplace(std::make_pair(parent, name), next_ino_);
    if (!inserted) return nodes_.at(it->second).get();
    child->ino = next_ino_++;
    const Node* out = child.get();
    nodes_.emplace(out->ino, std::move(child));
    return out;
  }

  StatusOr<std::unique_ptr<Node>> MakeChild(const Node& parent, const std::string& name) {
    if (IsControlChild(parent, name)) return MakeControlChild(parent, name);
    auto child = std::make_unique<Node>();
    child->path = parent.path;
    child->path.push_back(name);
    if (parent.model && manifest::IsModelFileName(name)) {
      child->model = parent.model;
      if (name == kManifestFile) {
        child->kind = Kind::kMemFile;
        child->size = parent.model->manifest_bytes.size();
        return child;
      }
      for (const auto& f : parent.model->files) {
        if (f.name == name) {
          child->kind = Kind::kBlobFile;
          child->blob = f.blob;
          child->size = f.blob.size;
          return child;
        }
      }
      return NotFound(Join(child->path) + ": the model has no such file");
    }
    const auto& path = child->path;
    if (path.size() > 3) return NotFound("path too deep for a model name");
    child->kind = Kind::kDir;
    Status model_error = NotFound("no model " + Join(path));
    auto model_name = manifest::ParseModelPath(path, resolver_->default_host());
    if (model_name.ok()) {
      auto model = resolver_->Resolve(*model_name);
      if (model.ok()) {
        child->model = std::move(*model);
        return child;
      }
      model_error = model.status();
    } else {
      model_error = model_name.status();
    }
    LOG(kDebug) << "lookup " << Join(path) << ": not a model: " << model_error.ToString();
    // Not a model: a namespace (depth 1) or host (depth 1) or host/namespace (depth 2) prefix.
    bool prefix = (path.size() == 1 && (manifest::IsValidNamespace(name) || LooksLikeHost(name))) ||
                  (path.size() == 2 && LooksLikeHost(path[0]) && manifest::IsValidNamespace(name));
    if (prefix && (model_error.code() == Code::kNotFound ||
                   model_error.code() == Code::kInvalidArgument)) {
      return child;
    }
    return model_error;
  }

  struct stat Stat(const Node& n) const {
    struct stat st {};
    st.st_ino = n.ino;
    st.st_uid = options_.uid;
    st.st_gid = options_.gid;
    st.st_atime = st.st_mtime = st.st_ctime = start_time_;
    if (IsDir(n)) {
      st.st_mode = S_IFDIR | (0555 & ~options_.umask);
      st.st_nlink = 2;
    } else {
      st.st_mode = S_IFREG | (0444 & ~options_.umask);
      st.st_nlink = 1;
      st.st_size = static_cast<off_t>(n.size);
      st.st_blocks = static_cast<blkcnt_t>((n.size + 511) / 512);
      st.st_blksize = 1 << 20;
    }
    return st;
  }

  void ReplyEntry(fuse_req_t req, const Node* n) {
    fuse_entry_param e{};
    e.ino = n->ino;
    e.attr = Stat(*n);
    e.attr_timeout = e.entry_timeout = IsDir(*n) ? kDirTimeout : kFileTimeout;
    fuse_reply_entry(req, &e);
  }

  // Directory contents: a model's files, or the stored models under a prefix.
  std::vector<DirEntry> List(const Node& n) {
    std::vector<DirEntry> out = {{".", true}, {"..", true}};
    if (n.kind == Kind::kControlDir) {
      for (auto& [name, is_dir] : control_->List(n.path)) out.push_back({name, is_dir});
      return out;
    }
    if (n.kind == Kind::kRoot && control_ != nullptr) {
      out.push_back({kControlDirName, true});
      out.push_back({kOllamaDirName, true});
    }
    if (n.model) {
      for (const auto& f : n.model->files) out.push_back({f.name, false});
      out.push_back({kManifestFile, false});
      return out;
    }
    const std::string& home = resolver_->default_host();
    std::set<std::string> names;
    for (const std::string& key : cache_->ListManifests()) {
      // key: host/ns/model/tag
      std::vector<std::string> k;
      size_t start = 0;
      for (size_t i = 0; i <= key.size(); ++i) {
        if (i == key.size() || key[i] == '/') {
          k.push_back(key.substr(start, i - start));
          start = i + 1;
        }
      }
      if (k.size() != 4) continue;
      const std::string model_tag = k[2] + ":" + k[3];
      if (n.path.empty()) {
        if (k[0] == home && k[1] == "library") names.insert(model_tag);
        else if (k[0] == home) names.insert(k[1]);
        else names.insert(k[0]);
      } else if (n.path.size() == 1) {
        if (k[0] == home && k[1] == n.path[0]) names.insert(model_tag);
        if (k[0] == n.path[0]) names.insert(k[1]);
      } else if (n.path.size() == 2) {
        if (k[0] == n.path[0] && k[1] == n.path[1]) names.insert(model_tag);
      }
    }
    for (const auto& name : names) out.push_back({name, true});
    return out;
  }

  static int64_t NowNs() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

 public:
  // The inodes of every file showing this blob (the same blob may be in several models).
  std::vector<fuse_ino_t> InodesOf(const Digest& digest) {
    std::vector<fuse_ino_t> out;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [ino, n] : nodes_) {
      if (n->kind == Kind::kBlobFile && n->blob.digest == digest) out.push_back(ino);
    }
    return out;
  }
  // When the last read request arrived (steady clock, ns): the shutdown drains until quiet.
  int64_t last_read_ns() const { return last_read_ns_.load(std::memory_order_relaxed); }
  static int64_t Now() { return NowNs(); }

 private:
  std::atomic<int64_t> last_read_ns_{0};
  const MountOptions options_;
  const time_t start_time_;
  Resolver* resolver_ = nullptr;
  cache::Cache* cache_ = nullptr;
  Control* control_ = nullptr;

  std::mutex mu_;
  std::unordered_map<fuse_ino_t, std::unique_ptr<Node>> nodes_;      // GUARDED_BY(mu_)
  std::map<std::pair<fuse_ino_t, std::string>, fuse_ino_t> children_;  // GUARDED_BY(mu_)
  fuse_ino_t next_ino_ = FUSE_ROOT_ID + 1;                             // GUARDED_BY(mu_)
};

// noexcept trampolines: nothing may unwind into libfuse's C frames.
template <typename F>
void Guard(fuse_req_t req, F&& f) noexcept {
  try {
    f();
  } catch (const std::exception& e) {
    LOG(kError) << "internal error: " << e.what();
    fuse_reply_err(req, EIO);
  } catch (...) {
    LOG(kError) << "internal error";
    fuse_reply_err(req, EIO);
  }
}

const fuse_lowlevel_ops kOps = [] {
  fuse_lowlevel_ops ops{};
  ops.init = [](void* userdata, fuse_conn_info* conn) {
    static_cast<ModelFs*>(userdata)->Init(conn);
  };
  ops.lookup = [](fuse_req_t req, fuse_ino_t parent, const char* name) {
    Guard(req, [&] { ModelFs::From(req)->Lookup(req, parent, name); });
  };
  ops.getattr = [](fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
    Guard(req, [&] { ModelFs::From(req)->GetAttr(req, ino); });
  };
  ops.open = [](fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    Guard(req, [&] { ModelFs::From(req)->Open(req, ino, fi); });
  };
  ops.read = [](fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
    Guard(req, [&] { ModelFs::From(req)->Read(req, size, off, fi); });
  };
  ops.release = [](fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
    ModelFs::From(req)->Release(fi);
    fuse_reply_err(req, 0);
  };
  ops.opendir = [](fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    Guard(req, [&] { ModelFs::From(req)->OpenDir(req, ino, fi); });
  };
  ops.readdir = [](fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
    Guard(req, [&] { ModelFs::From(req)->ReadDir(req, ino, size, off, fi); });
  };
  ops.releasedir = [](fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
    ModelFs::From(req)->ReleaseDir(fi);
    fuse_reply_err(req, 0);
  };
  ops.getxattr = [](fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
    Guard(req, [&] { ModelFs::From(req)->GetXattr(req, ino, name, size); });
  };
  ops.listxattr = [](fuse_req_t req, fuse_ino_t ino, size_t size) {
    Guard(req, [&] { ModelFs::From(req)->ListXattr(req, ino, size); });
  };
  ops.statfs = [](fuse_req_t req, fuse_ino_t) {
    struct statvfs st {};
    st.f_bsize = st.f_frsize = 4096;
    st.f_namemax = 255;
    st.f_flag = ST_RDONLY;
    fuse_reply_statfs(req, &st);
  };
  return ops;
}();

// Ends a mount on SIGTERM, SIGINT or SIGHUP so that every reader gets an answer. Order matters:
// first `stop` fails parked and new reads (EIO); then the FUSE loop keeps serving until reads go
// quiet, because the kernel retries a failed readahead page with a fresh read that must also get
// EIO (a closed session would answer ENOTCONN); only then does the loop end.
// Thread "modelfs-signal" owns the wait; the caller blocks the signals before any thread starts.
// Thread "modelfs-inval": drops the kernel's cached pages of blob bytes the cache replaced
// (cache::Cache::OnBytesReplaced: a bad chunk, a repaired piece), so a reader that keeps its file
// open re-reads them instead of the bad copy. On its own thread: the kernel may wait there for
// pages locked by reads that a cache thread is about to answer.
class PageInvalidator {
 public:
  PageInvalidator(fuse_session* se, ModelFs* fs) : se_(se), fs_(fs) {
    thread_ = std::thread([this] { Run(); });
  }
  ~PageInvalidator() { Stop(); }

  // Any thread. Dropped after Stop().
  void Post(const Digest& digest, uint64_t begin, uint64_t end) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (stop_) return;
      queue_.push_back({digest, begin, end});
    }
    cv_.notify_one();
  }
  // Joins the thread; the session is not touched afterwards. Idempotent.
  void Stop() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Item {
    Digest digest;
    uint64_t begin, end;
  };
  void Run() {
    pthread_setname_np(pthread_self(), "modelfs-inval");
    std::unique_lock<std::mutex> l(mu_);
    while (true) {
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      Item item = std::move(queue_.front());
      queue_.pop_front();
      l.unlock();
      for (fuse_ino_t ino : fs_->InodesOf(item.digest)) {
        // -ENOENT: the kernel holds nothing of this inode. Nothing else is worth more than a log.
        int rc = fuse_lowlevel_notify_inval_inode(se_, ino, static_cast<off_t>(item.begin),
                                                  static_cast<off_t>(item.end - item.begin));
        if (rc != 0 && rc != -ENOENT) {
          LOG(kWarn) << "dropping cached pages of " << item.digest.Short() << ": "
                     << std::strerror(-rc);
        }
      }
      l.lock();
    }
  }

  fuse_session* const se_;
  ModelFs* const fs_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;  // GUARDED_BY(mu_)
  bool stop_ = false;       // GUARDED_BY(mu_)
  std::thread thread_;
};

class SignalStopper {
 public:
  SignalStopper(fuse_session* se, const ModelFs* fs, std::function<void()> stop)
      : se_(se), fs_(fs), stop_(std::move(stop)), loop_thread_(pthread_self()) {
    thread_ = std::thread([this] { Run(); });
  }
  ~SignalStopper() {
    done_ = true;
    pthread_kill(thread_.native_handle(), SIGUSR1);
    thread_.join();
  }
  bool stopped_by_signal() const { return signalled_; }

  static void BlockSignals() {
    sigset_t set = Set();
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    // SIGUSR2 interrupts the loop's wait; its handler does nothing, and without SA_RESTART.
    struct sigaction sa {};
    sa.sa_handler = [](int) {};
    sigaction(SIGUSR2, &sa, nullptr);
  }

 private:
  static sigset_t Set() {
    sigset_t set;
    sigemptyset(&set);
    for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGUSR1}) sigaddset(&set, sig);
    return set;
  }

  void Run() {
    pthread_setname_np(pthread_self(), "modelfs-signal");
    sigset_t set = Set();
    int sig = 0;
    while (sigwait(&set, &sig) == 0 && !done_) {
      if (sig == SIGUSR1) continue;
      LOG(kInfo) << "signal " << sig << ": failing pending reads and unmounting";
      signalled_ = true;
      stop_();
      constexpr int64_t kQuietNs = 100'000'000, kMaxNs = 2'000'000'000;
      const int64_t start = ModelFs::Now();
      while (ModelFs::Now() - std::max(start, fs_->last_read_ns()) < kQuietNs &&
             ModelFs::Now() - start < kMaxNs) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      fuse_session_exit(se_);
      pthread_kill(loop_thread_, SIGUSR2);
      return;
    }
  }

  fuse_session* const se_;
  const ModelFs* const fs_;
  const std::function<void()> stop_;
  const pthread_t loop_thread_;
  std::atomic<bool> done_{false};
  std::atomic<bool> signalled_{false};
  std::thread thread_;
};

}  // namespace

int Serve(const MountOptions& options, const std::function<StatusOr<Services>()>& setup,
          const std::function<void()>& teardown) {
  ModelFs fs(options);
  std::vector<std::string> argv_store = {"modelfs", "-o",
                                         "ro,fsname=modelfs,subtype=modelfs,max_read=1048576"};
  if (options.allow_other) argv_store[2] += ",allow_other";
  if (options.default_permissions) argv_store[2] += ",default_permissions";
  if (options.debug) argv_store.push_back("-d");
  std::vector<char*> argv;
  for (auto& s : argv_store) argv.push_back(s.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());

  fuse_session* se = fuse_session_new(&args, &kOps, sizeof kOps, &fs);
  if (se == nullptr) {
    LOG(kError) << "cannot create the FUSE session";
    fuse_opt_free_args(&args);
    return 1;
  }
  int rc = 1;
  if (fuse_session_mount(se, options.mountpoint.c_str()) != 0) {
    LOG(kError) << "cannot mount on " << options.mountpoint
                << " (is it an existing empty directory, and is /dev/fuse usable?)";
  } else {
    fuse_daemonize(options.foreground ? 1 : 0);
    if (!options.foreground) LogToSyslog();
    // Before any thread starts, so that only the stopper's sigwait sees these signals.
    SignalStopper::BlockSignals();
    auto services = setup();
    if (!services.ok()) {
      LOG(kError) << services.status().ToString();
    } else {
      fs.SetServices(*services);
      LOG(kInfo) << "mounted on " << options.mountpoint;
      fuse_loop_config* cfg = fuse_loop_cfg_create();
      fuse_loop_cfg_set_max_threads(cfg, static_cast<unsigned>(options.max_threads));
      fuse_loop_cfg_set_idle_threads(cfg, 8);
      int loop_rc;
      {
        cache::Cache* cache = services->cache;
        // Shared with the cache's callback, which may still be running when it is cleared.
        auto inval = std::make_shared<PageInvalidator>(se, &fs);
        cache->OnBytesReplaced(
            [inval](const Digest& d, uint64_t begin, uint64_t end) { inval->Post(d, begin, end); });
        SignalStopper stopper(se, &fs, [cache] { cache->Shutdown(); });
        loop_rc = fuse_session_loop_mt(se, cfg);
        if (stopper.stopped_by_signal()) loop_rc = 0;
        cache->OnBytesReplaced(nullptr);
        inval->Stop();
      }
      rc = loop_rc < 0 ? 1 : 0;
      fuse_loop_cfg_destroy(cfg);
      LOG(kInfo) << "unmounting " << options.mountpoint;
    }
    teardown();
    fuse_session_unmount(se);
  }
  fuse_session_destroy(se);
  // fuse_session_new copied argv into heap storage (fuse_opt_add_arg); free it as libfuse's
  // examples do, or LeakSanitizer reports it at exit (issue 7).
  fuse_opt_free_args(&args);
  return rc;
}

}  // namespace modelfs::fs
