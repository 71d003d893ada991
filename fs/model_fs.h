// ModelFs: the read-only FUSE filesystem (libfuse 3 low-level API).
//
// Layout under the mountpoint (README "How a path is read"):
//   MOUNT/<model>[:tag]/                     library/<model> on the --registry host
//   MOUNT/<ns>/<model>[:tag]/                another namespace on the --registry host
//   MOUNT/<host>/<ns>/<model>[:tag]/         another registry (hf.co/user/repo:Q4_K_M)
//   .../model.gguf, template, params, …      one file per layer, named by media type
//   .../manifest.json, config.json
// A directory at depth 1 or 2 is read as a model first (the registry is asked), and as a
// namespace or host prefix when no such model exists; inside a model directory, a layer file
// name is a file and any other name continues the path. The root and prefixes list the models
// stored in the cache.
//
// Threads: FUSE worker threads run every op. Lookups may block on the registry (a manifest GET).
// Reads never wait on a worker: a read of missing bytes is parked in the cache and answered
// from the thread that completes its range (fetch loop or hasher), with an fd-backed reply so
// the bytes are spliced from the cache file, not copied through user space.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>

#include "base/status.h"
#include "cache/cache.h"
#include "fs/resolver.h"

namespace modelfs::fs {

struct MountOptions {
  std::string mountpoint;
  bool foreground = false;
  bool allow_other = false;
  bool default_permissions = false;
  uid_t uid = 0;
  gid_t gid = 0;
  mode_t umask = 0022;
  bool debug = false;
  int max_threads = 64;  // FUSE worker threads
};

// Runs a mount to completion. `setup` is called after the mount succeeded and the process has
// detached (threads started before a fork would be lost); it must return the resolver and cache
// the filesystem serves from, and they must stay valid until Serve returns. `teardown` runs after
// the last request, before the unmount completes.
class Control;  // fs/control.h
struct Services {
  Resolver* resolver = nullptr;
  cache::Cache* cache = nullptr;
  Control* control = nullptr;  // optional: MOUNT/.modelfs/, MOUNT/.ollama/, user.modelfs.* xattrs
};
int Serve(const MountOptions& options, const std::function<StatusOr<Services>()>& setup,
          const std::function<void()>& teardown);

}  // namespace modelfs::fs
