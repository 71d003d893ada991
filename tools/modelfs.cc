// modelfs: the binary. Parses the command line (and, as mount.modelfs, mount(8)'s helper
// protocol), then wires the modules together: fetch::RegistryClient → cache::Cache →
// fs::Resolver → fs::Serve. This is the only place that knows all of them.
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "base/log.h"
#include "base/units.h"
#include "cache/cache.h"
#include "fetch/registry.h"
#include "fs/control.h"
#include "fs/model_fs.h"
#include "fs/resolver.h"
#include "tools/metrics_server.h"
#include "tools/ops.h"

namespace modelfs {
namespace {

constexpr int kUsageError = 2;
constexpr char kDefaultRegistry[] = "https://registry.ollama.ai";

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

std::string DefaultCacheDir() {
  if (std::string v = Env("MODELFS_CACHE"); !v.empty()) return v;
  if (geteuid() == 0) return "/var/cache/modelfs";
  if (std::string xdg = Env("XDG_CACHE_HOME"); !xdg.empty()) return xdg + "/modelfs";
  std::string home = Env("HOME");
  if (home.empty()) {
    if (passwd* pw = getpwuid(getuid())) home = pw->pw_dir;
  }
  return home + "/.cache/modelfs";
}

// Every mount setting by its canonical -o name. Sources are applied in order: defaults,
// environment, -o options, then flags, so the most explicit wins.
struct Settings {
  std::map<std::string, std::string> values;
  std::set<std::string> flags;  // boolean options that are on
};

// Options mount(8) and fstab pass along that mean nothing to a FUSE filesystem.
const std::set<std::string> kIgnoredMountOptions = {
    "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
    "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime", "relatime",
    "nodiratime", "sync", "async", "ro"};
const std::set<std::string> kValueOptions = {
    "metrics",  "registry",      "cache",     "concurrency",     "part_size", "credentials",
    "ca_file",  "stall_timeout", "log_level", "verify",          "uid",       "gid",
    "umask",    "max_threads",   "proxy",     "request_timeout", "mirror",    "cache_max",
    "chunksums"};
const std::set<std::string> kBoolOptions = {"allow_other", "default_permissions", "insecure",
                                            "lazy", "foreground", "debug"};

Status ApplyMountOptions(const std::vector<std::string>& groups, Settings* s) {
  for (const std::string& group : groups) {
    size_t start = 0;
    while (start <= group.size()) {
      size_t comma = group.find(',', start);
      std::string opt = group.substr(start, comma == std::string::npos ? std::string::npos
                                                                         : comma - start);
      start = comma == std::string::npos ? group.size() + 1 : comma + 1;
      if (opt.empty() || kIgnoredMountOptions.count(opt) || opt.rfind("x-", 0) == 0 ||
          opt.rfind("comment=", 0) == 0) {
        continue;
      }
      size_t eq = opt.find('=');
      std::string key = opt.substr(0, eq);
      for (char& c : key) c = c == '-' ? '_' : c;
      if (eq == std::string::npos) {
        if (!kBoolOptions.count(key)) return InvalidArgument("unknown mount option: " + opt);
        s->flags.insert(key);
      } else {
        if (!kValueOptions.count(key)) return InvalidArgument("unknown mount option: " + opt);
        auto prev = s->values.find(key);
        if (key == "mirror" && prev != s->values.end()) {  // repeatable: mirror=A,mirror=B
          prev->second += "|" + opt.substr(eq + 1);
        } else {
          s->values[key] = opt.substr(eq + 1);
        }
      }
    }
  }
  return Status::Ok();
}

StatusOr<unsigned long> ParseUnsigned(const std::string& key, const std::string& text, int base,
                                      unsigned long max) {
  char* end = nullptr;
  errno = 0;
  unsigned long v = std::strtoul(text.c_str(), &end, base);
  if (text.empty() || *end != '\0' || errno != 0 || v > max || text[0] == '-') {
    return InvalidArgument(key + ": not a valid number: " + text);
  }
  return v;
}

struct MountConfig {
  std::string registry;
  std::string cache_dir;
  fetch::ClientOptions client;
  cache::CacheOptions cache;
  fs::MountOptions mount;
  LogLevel log_level = LogLevel::kInfo;
  std::string metrics_addr;  // --metrics HOST:PORT, "" = off
};

StatusOr<MountConfig> BuildConfig(const Settings& s, const std::string& mountpoint) {
  MountConfig c;
  auto get = [&](const std::string& k, std::string dflt) {
    auto it = s.values.find(k);
    return it == s.values.end() ? dflt : it->second;
  };
  auto on = [&](const std::string& k) { return s.flags.count(k) > 0; };

  c.registry = get("registry", kDefaultRegistry);
  if (c.registry.rfind("http://", 0) != 0 && c.registry.rfind("https://", 0) != 0) {
    return InvalidArgument("--registry must be an http:// or https:// URL: " + c.registry);
  }
  c.cache_dir = get("cache", DefaultCacheDir());
  if (c.cache_dir.empty()) return InvalidArgument("--cache must not be empty");

  ASSIGN_OR_RETURN(uint64_t part_size, ParseSize(get("part_size", "64M")));
  if (part_size < (64u << 10) || part_size > (4ull << 30)) {
    return InvalidArgument("--part-size must be between 64K and 4G");
  }
  ASSIGN_OR_RETURN(unsigned long concurrency,
                   ParseUnsigned("--concurrency", get("concurrency", "32"), 10, 256));
  if (concurrency == 0) return InvalidArgument("--concurrency must be at least 1");
  ASSIGN_OR_RETURN(double stall, ParseSeconds(get("stall_timeout", "10")));
  if (stall < 0.1) return InvalidArgument("--stall-timeout must be at least 0.1s");
  c.client.fetch.part_size = part_size;
  // Parts shrink to this near a blob's end, so the hash frontier trails the last byte by about
  // concurrency × 2 MiB (fetch/fetcher.h, FetchOptions::min_part_size).
  c.client.fetch.min_part_size = std::min<uint64_t>(part_size, 2ull << 20);
  c.cache.piece_size = part_size;  // repair re-fetches one part at a time
  if (std::string max = get("cache_max", ""); !max.empty()) {
    ASSIGN_OR_RETURN(c.cache.max_bytes, ParseSize(max));
  }
  c.client.fetch.concurrency = static_cast<int>(concurrency);
  c.client.fetch.stall_timeout_s = stall;
  c.client.ca_file = get("ca_file", "");
  c.client.insecure = on("insecure");
  // --mirror (issue 8): registries tried in order before --registry; "A|B" or repeated.
  c.client.mirror.origin = c.registry;
  for (std::string rest = get("mirror", ""); !rest.empty();) {
    size_t bar = rest.find('|');
    std::string m = rest.substr(0, bar);
    rest = bar == std::string::npos ? "" : rest.substr(bar + 1);
    if (m.empty()) continue;
    if (m.rfind("http://", 0) != 0 && m.rfind("https://", 0) != 0) {
      return InvalidArgument("--mirror must be an http:// or https:// URL: " + m);
    }
    c.client.mirror.mirrors.push_back(m);
  }
  // Through a mirror or proxy, keep ranges on a 1 MiB grid so range caches hit across nodes.
  bool env_proxy = false;
  for (const char* v : {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                        "ALL_PROXY"}) {
    env_proxy |= !Env(v).empty();
  }
  if (!c.client.mirror.mirrors.empty() || !get("proxy", "").empty() || env_proxy) {
    c.client.fetch.align_bytes = 1u << 20;
  }
  // --proxy (issue 7): an explicit proxy; HTTP(S)_PROXY/NO_PROXY otherwise apply as in curl.
  c.client.proxy = get("proxy", "");
  if (!c.client.proxy.empty() && c.client.proxy.find("://") == std::string::npos) {
    return InvalidArgument("--proxy must be a URL like http://host:3128");
  }
  // request_timeout: the total budget of a manifest/token request (slow or stuck registries).
  ASSIGN_OR_RETURN(double request_timeout, ParseSeconds(get("request_timeout", "30")));
  if (request_timeout < 0.5) return InvalidArgument("request_timeout must be at least 0.5s");
  c.client.request_timeout_s = request_timeout;

  std::string creds = get("credentials", "");
  bool optional = creds.empty();
  if (creds.empty() && !Env("HOME").empty()) creds = Env("HOME") + "/.docker/config.json";
  if (!creds.empty()) {
    ASSIGN_OR_RETURN(c.client.credentials, fetch::LoadCredentials(creds, optional));
  }

  std::string verify = get("verify", "default");
  if (verify != "default" && verify != "strict") {
    return InvalidArgument("--verify must be default or strict");
  }
  c.cache.strict = verify == "strict";
  c.cache.lazy = on("lazy");
  std::string chunksums = get("chunksums", "on");
  if (chunksums != "on" && chunksums != "off") {
    return InvalidArgument("--chunksums must be on or off");
  }
  c.cache.chunksums = chunksums == "on";

  c.mount.mountpoint = mountpoint;
  c.mount.foreground = on("foreground");
  c.mount.debug = on("debug");
  c.mount.allow_other = on("allow_other");
  c.mount.default_permissions = on("default_permissions");
  ASSIGN_OR_RETURN(unsigned long uid, ParseUnsigned("uid", get("uid", std::to_string(getuid())),
                                                    10, 0xfffffffe));
  ASSIGN_OR_RETURN(unsigned long gid, ParseUnsigned("gid", get("gid", std::to_string(getgid())),
                                                    10, 0xfffffffe));
  ASSIGN_OR_RETURN(unsigned long umask, ParseUnsigned("umask", get("umask", "022"), 8, 0777));
  ASSIGN_OR_RETURN(unsigned long threads,
                   ParseUnsigned("max_threads", get("max_threads", "64"), 10, 1024));
  c.mount.uid = static_cast<uid_t>(uid);
  c.mount.gid = static_cast<gid_t>(gid);
  c.mount.umask = static_cast<mode_t>(umask);
  c.mount.max_threads = std::max(2, static_cast<int>(threads));
  if (!ParseLogLevel(get("log_level", "info"), &c.log_level)) {
    return InvalidArgument("--log-level must be debug, info, warn or error");
  }
  c.metrics_addr = get("metrics", "");
  return c;
}

// libcurl reads only the lowercase http_proxy for http:// URLs (uppercase HTTP_PROXY is ignored
// because CGI programs get it from a request header). A daemon is no CGI program, and users set
// HTTP_PROXY like HTTPS_PROXY, so honour it the same way (issue 7). NO_PROXY still applies.
void NormalizeProxyEnvironment() {
  const char* lower = std::getenv("http_proxy");
  const char* upper = std::getenv("HTTP_PROXY");
  if ((lower == nullptr || *lower == '\0') && upper != nullptr && *upper != '\0') {
    setenv("http_proxy", upper, 1);
  }
}

int RunMount(const MountConfig& config) {
  SetLogLevel(config.log_level);
  NormalizeProxyEnvironment();
  struct stat st;
  if (stat(config.mount.mountpoint.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    std::cerr << "modelfs: mountpoint " << config.mount.mountpoint
              << " is not an existing directory\n";
    return 1;
  }
  if (config.client.insecure) {
    LOG(kWarn) << "--insecure: TLS certificates are NOT verified; anyone on the path can serve "
                  "you any manifest (blob digests are still checked)";
  }
  // Created in the serving process, after the detach: they start threads.
  std::unique_ptr<fetch::RegistryClient> client;
  std::unique_ptr<cache::Cache> cache;
  std::unique_ptr<fs::Resolver> resolver;
  std::unique_ptr<fs::Control> control;  // .modelfs/, .ollama/, xattrs (issue 6)
  // Resolved now: the daemon chdirs to / when it detaches.
  char* abs = realpath(config.mount.mountpoint.c_str(), nullptr);
  const std::string mountpoint_abs = abs ? abs : config.mount.mountpoint;
  free(abs);
  std::unique_ptr<tools::MetricsServer> metrics;
  auto setup = [&]() -> StatusOr<fs::Services> {
    ASSIGN_OR_RETURN(client, fetch::RegistryClient::Create(config.client));
    ASSIGN_OR_RETURN(cache, cache::Cache::Open(config.cache_dir, client.get(), config.cache));
    resolver = std::make_unique<fs::Resolver>(config.registry, client.get(), cache.get());
    LOG(kInfo) << "registry " << config.registry << ", cache " << config.cache_dir;
    for (const auto& m : config.client.mirror.mirrors) LOG(kInfo) << "mirror " << m;
    control = std::make_unique<fs::Control>(
        resolver.get(), cache.get(),
        fs::ControlOptions{mountpoint_abs, config.registry, config.cache.max_bytes});
    if (!config.metrics_addr.empty()) {
      fs::Control* c = control.get();
      ASSIGN_OR_RETURN(metrics, tools::MetricsServer::Start(config.metrics_addr,
                                                            [c] { return c->MetricsText(); }));
    }
    return fs::Services{resolver.get(), cache.get(), control.get()};
  };
  auto teardown = [&] {
    metrics.reset();  // both poll the cache: gone before it shuts down
    control.reset();
    if (cache) cache->Shutdown();
    resolver.reset();
    cache.reset();
    client.reset();
  };
  return fs::Serve(config.mount, setup, teardown);
}

// mount(8) runs: mount.modelfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE].
int MountHelperMain(int argc, char** argv) {
  std::vector<std::string> positional, groups;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-o" && i + 1 < argc) groups.push_back(argv[++i]);
    else if (a.rfind("-o", 0) == 0 && a.size() > 2) groups.push_back(a.substr(2));
    else if (a == "-t" && i + 1 < argc) ++i;
    else if (a == "-s" || a == "-f" || a == "-n" || a == "-v") continue;  // sloppy/fake/no-mtab
    else if (!a.empty() && a[0] == '-') {
      std::cerr << "mount.modelfs: unknown option " << a << "\n";
      return kUsageError;
    } else positional.push_back(a);
  }
  if (positional.size() != 2) {
    std::cerr << "usage: mount.modelfs REGISTRY_URL MOUNTPOINT [-o OPTION[,OPTION...]]\n";
    return kUsageError;
  }
  Settings s;
  s.values["registry"] = positional[0];
  if (Status st = ApplyMountOptions(groups, &s); !st.ok()) {
    std::cerr << "mount.modelfs: " << st.message() << "\n";
    return kUsageError;
  }
  auto config = BuildConfig(s, positional[1]);
  if (!config.ok()) {
    std::cerr << "mount.modelfs: " << config.status().message() << "\n";
    return kUsageError;
  }
  return RunMount(*config);
}

int Main(int argc, char** argv) {
  std::string self = argv[0];
  if (self.size() >= 13 && self.substr(self.size() - 13) == "mount.modelfs") {
    return MountHelperMain(argc, argv);
  }

  CLI::App app{
      "modelfs: ML models from an OCI/Ollama registry as ordinary files, fetched on first read "
      "(part-parallel, SHA-256 verified, cached).",
      "modelfs"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "modelfs 0.1.0");

  CLI::App* mount = app.add_subcommand(
      "mount", "Mount a registry: MOUNTPOINT/<model>[:tag]/model.gguf and friends.");
  std::string mountpoint;
  std::optional<std::string> registry, cache_dir, concurrency, part_size, credentials, ca_file,
      stall_timeout, log_level, verify, cache_max, metrics, proxy, chunksums;
  bool foreground = false, insecure = false, lazy = false, allow_other = false, debug = false;
  std::vector<std::string> groups;
  std::vector<std::string> mirrors;
  mount->add_option("MOUNTPOINT", mountpoint, "An existing empty directory")->required();
  mount->add_option("--registry", registry,
                    "Registry base URL (default $MODELFS_REGISTRY, else https://registry.ollama.ai)");
  mount->add_option("--cache", cache_dir,
                    "Cache directory (default $MODELFS_CACHE, else /var/cache/modelfs for root, "
                    "~/.cache/modelfs otherwise)");
  mount->add_option("--concurrency", concurrency,
                    "Range parts in flight per blob (default $MODELFS_CONCURRENCY, else 32)");
  mount->add_option("--part-size", part_size,
                    "Largest range part, e.g. 64M; parts shrink to 2M near a blob's end (default "
                    "$MODELFS_PART_SIZE, else 64M)");
  mount->add_option("--cache-max", cache_max,
                    "Evict least-recently-used closed blobs to keep the cache under SIZE");
  mount->add_option("--stall-timeout", stall_timeout,
                    "Re-request a part that receives nothing for this long (default 10s)");
  mount->add_option("--credentials", credentials,
                    "Docker-style config.json with registry credentials (default "
                    "~/.docker/config.json when present)");
  mount->add_option("--ca-file", ca_file, "Extra CA certificates (PEM) to trust for https");
  mount->add_option("--proxy", proxy,
                    "HTTP(S) proxy URL for every request (default: $HTTPS_PROXY/$HTTP_PROXY, "
                    "honouring $NO_PROXY)");
  mount->add_flag("--insecure", insecure, "Do not verify TLS certificates (digests still are)");
  mount->add_flag("--lazy", lazy, "Fetch only what is read, no whole-blob background fetch");
  mount->add_option("--verify", verify,
                    "default: serve bytes as they arrive; strict: only after the digest matched "
                    "(the blob's, or the chunk's where the registry publishes chunk digests)");
  mount->add_option("--chunksums", chunksums,
                    "on: verify each chunk as it lands where the registry publishes Ollama "
                    "chunk digests, and re-fetch only a bad chunk (default); off: never ask");
  mount->add_option("--mirror", mirrors,
                    "Registry mirror (pull-through cache) tried before --registry, in order; "
                    "repeatable. A mirror that fails or lacks a blob falls through to the next, "
                    "then to --registry");
  mount->add_flag("--allow-other", allow_other, "Let other users access the mount");
  mount->add_option("--log-level", log_level, "debug, info, warn or error (default info)");
  mount->add_option("--metrics", metrics,
                    "Serve Prometheus metrics on HOST:PORT (GET /metrics), e.g. 127.0.0.1:9090");
  mount->add_flag("-f,--foreground", foreground, "Stay in the foreground, log to stderr");
  mount->add_flag("-d,--debug", debug, "Log every FUSE request (implies nothing else)");
  mount
      ->add_option("-o", groups,
                   "Mount options, comma-separated: every flag above as name=value or name "
                   "(cache=DIR, part_size=64M, concurrency=N, stall_timeout=10s, registry=URL, "
                   "credentials=FILE, ca_file=FILE, proxy=URL, request_timeout=30s, insecure, "
                   "lazy, verify=strict, chunksums=off, "
                   "log_level=LEVEL, allow_other, default_permissions, uid=N, gid=N, "
                   "umask=022, max_threads=N, foreground, mirror=URL (repeatable, or URL1|URL2))")
      ->take_all();

  tools::OpsCommands ops(&app);  // status, pull, ls, rm, verify, gc (tools/ops.h)

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kUsageError;
  }

  if (mount->parsed()) {
    Settings s;
    if (auto v = Env("MODELFS_REGISTRY"); !v.empty()) s.values["registry"] = v;
    if (auto v = Env("MODELFS_PART_SIZE"); !v.empty()) s.values["part_size"] = v;
    if (auto v = Env("MODELFS_CONCURRENCY"); !v.empty()) s.values["concurrency"] = v;
    if (Status st = ApplyMountOptions(groups, &s); !st.ok()) {
      std::cerr << "modelfs mount: " << st.message() << "\nRun 'modelfs mount --help'.\n";
      return kUsageError;
    }
    auto set = [&](const char* k, const std::optional<std::string>& v) {
      if (v) s.values[k] = *v;
    };
    set("registry", registry);
    set("cache", cache_dir);
    set("concurrency", concurrency);
    set("part_size", part_size);
    set("credentials", credentials);
    set("ca_file", ca_file);
    set("proxy", proxy);
    set("stall_timeout", stall_timeout);
    set("cache_max", cache_max);
    set("log_level", log_level);
    set("metrics", metrics);
    set("verify", verify);
    set("chunksums", chunksums);
    if (!mirrors.empty()) {
      std::string joined;
      for (const auto& m : mirrors) joined += (joined.empty() ? "" : "|") + m;
      s.values["mirror"] = joined;
    }
    if (foreground) s.flags.insert("foreground");
    if (insecure) s.flags.insert("insecure");
    if (lazy) s.flags.insert("lazy");
    if (allow_other) s.flags.insert("allow_other");
    if (debug) s.flags.insert("debug");
    auto config = BuildConfig(s, mountpoint);
    if (!config.ok()) {
      std::cerr << "modelfs mount: " << config.status().message()
                << "\nRun 'modelfs mount --help'.\n";
      return kUsageError;
    }
    return RunMount(*config);
  }
  if (ops.parsed()) {
    return ops.Run([](const std::map<std::string, std::string>& values,
                      bool insecure) -> StatusOr<tools::OpsConfig> {
      Settings s;
      if (auto v = Env("MODELFS_REGISTRY"); !v.empty()) s.values["registry"] = v;
      for (const auto& [k, v] : values) s.values[k] = v;
      if (insecure) s.flags.insert("insecure");
      ASSIGN_OR_RETURN(MountConfig m, BuildConfig(s, ""));
      return tools::OpsConfig{m.registry, m.cache_dir, m.client, m.cache, m.log_level};
    });
  }
  return kUsageError;
}

}  // namespace
}  // namespace modelfs

int main(int argc, char** argv) { return modelfs::Main(argc, argv); }
