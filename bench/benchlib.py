"""benchlib.py: shared pieces of bench/fetch_bench.py, read_bench.py and verify_bench.py (Python
3 stdlib).

- ensure_blob(): a random blob of N MiB, generated once into $MODELFS_BENCH_CACHE (default
  /var/tmp/modelfs-bench) with its SHA-256 beside it.
- BlobServer: one server on a free loopback port (bench/paced_server.py, or nginx through
  tests/integration/harness.py's Nginx) that serves the same files two ways, so every tool
  reads the same bytes through the same code path (sendfile from the page cache) under the
  same rate cap:
    /files/<name>                           plain static files (curl, aria2c, rclone :http:)
    /v2/library/<model>/blobs/sha256:<hex>  the same files as registry blobs (modelfs)
    /v2/library/<model>/manifests/<tag>     a Docker v2 manifest naming them
  paced: the cap is per connection (TCP pacing); nginx: `limit_rate` per request, which lets
  each response start with one second's worth of bytes at full speed (see paced_server.py).
  Optionally also Ollama's chunk digests of each blob (chunk_mib), and one flipped byte in the
  first response to reach an offset (flip; paced only).
- ensure_chunksums(): the chunksums text of a file for N MiB chunks, computed once and cached
  beside the blob.
- run(): a child process measured with os.wait4 (wall, user+sys CPU, peak RSS).
- Daemon: a FUSE daemon started in the foreground (modelfs or rclone), measured through
  /proc/<pid>/stat (utime+stime) and /proc/<pid>/status (VmHWM) while it is still mounted.
- drop_caches() / warm(): page cache control between runs.
Not thread-safe. Nothing uses a fixed port; every child is ended by the object that started it.
"""
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "integration"))
import harness  # noqa: E402

BENCH_CACHE = os.environ.get("MODELFS_BENCH_CACHE", "/var/tmp/modelfs-bench")
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def default_modelfs():
    if os.environ.get("MODELFS_BIN"):
        return os.environ["MODELFS_BIN"]
    for d in ("build-bench", "build"):
        p = os.path.join(REPO_ROOT, d, "tools", "modelfs")
        if os.access(p, os.X_OK):
            return p
    return os.path.join(REPO_ROOT, "build", "tools", "modelfs")


# ---- data ----------------------------------------------------------------------------------

def sha256_file(path):
    h = hashlib.sha256()
    buf = bytearray(8 * MIB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def cached_sha256(path):
    """SHA-256 of a file, remembered in a sidecar keyed by (size, mtime)."""
    st = os.stat(path)
    os.makedirs(BENCH_CACHE, exist_ok=True)
    side = os.path.join(BENCH_CACHE, "sha256-%s.json"
                        % hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16])
    key = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        with open(side) as f:
            j = json.load(f)
        if j.get("key") == key:
            return j["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    try:
        with open(side, "w") as f:
            json.dump({"key": key, "sha256": digest}, f)
    except OSError:
        pass
    return digest


def ensure_blob(size_mib):
    """(path, sha256 hex) of a random blob of size_mib MiB, made once (os.urandom, 16 MiB
    chunks: incompressible, so no layer can shortcut it)."""
    os.makedirs(BENCH_CACHE, exist_ok=True)
    path = os.path.join(BENCH_CACHE, "blob-%dMiB.bin" % size_mib)
    if not os.path.exists(path):
        log("generating %s (%d MiB of random bytes, once)" % (path, size_mib))
        tmp = path + ".tmp"
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            left = size_mib * MIB
            while left:
                chunk = os.urandom(min(16 * MIB, left))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        os.rename(tmp, path)
        st = os.stat(path)
        side = os.path.join(BENCH_CACHE, "sha256-%s.json"
                            % hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16])
        with open(side, "w") as f:
            json.dump({"key": {"path": os.path.abspath(path), "size": st.st_size,
                               "mtime_ns": st.st_mtime_ns}, "sha256": h.hexdigest()}, f)
    return path, cached_sha256(path)


def ensure_chunksums(path, chunk_mib):
    """Ollama's chunksums text for path in chunk_mib MiB chunks: one line per chunk,
    "sha256:<hex> <start>-<end>" (decimal, end inclusive). Hashing 1 GiB takes seconds, so the
    text is cached beside the blob (<blob>.chunksums-<N>M; for a file outside $MODELFS_BENCH_CACHE
    a name keyed by its path there) and reused while it is newer than the file and covers it."""
    st = os.stat(path)
    ap = os.path.abspath(path)
    if os.path.dirname(ap) == os.path.abspath(BENCH_CACHE):
        side = "%s.chunksums-%dM" % (ap, chunk_mib)
    else:
        side = os.path.join(BENCH_CACHE, "chunksums-%s-%dM" % (
            hashlib.sha256(ap.encode()).hexdigest()[:16], chunk_mib))
    try:
        if os.stat(side).st_mtime_ns >= st.st_mtime_ns:
            with open(side) as f:
                text = f.read()
            last = text.rstrip("\n").rsplit("\n", 1)[-1]
            if st.st_size == 0 and text == "" or last.endswith("-%d" % (st.st_size - 1)):
                return text
    except OSError:
        pass
    log("computing %d MiB chunk digests of %s (once)" % (chunk_mib, path))
    step = chunk_mib * MIB
    lines = []
    buf = bytearray(8 * MIB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        for start in range(0, st.st_size, step):
            end = min(start + step, st.st_size)
            h = hashlib.sha256()
            pos = start
            while pos < end:
                n = f.readinto(view[:min(len(buf), end - pos)])
                if not n:
                    raise OSError("%s shrank while hashing" % path)
                h.update(view[:n])
                pos += n
            lines.append("sha256:%s %d-%d\n" % (h.hexdigest(), start, end - 1))
    text = "".join(lines)
    os.makedirs(BENCH_CACHE, exist_ok=True)
    with open(side + ".tmp", "w") as f:
        f.write(text)
    os.rename(side + ".tmp", side)
    return text


# ---- page cache ----------------------------------------------------------------------------

_drop_warned = False


def drop_caches():
    """sync, then drop the page cache, dentries and inodes (root only). Returns True if done."""
    global _drop_warned
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        if not _drop_warned:
            log("warning: cannot drop the page cache (%s); results include warm-cache effects" % e)
            _drop_warned = True
        return False


def warm(path):
    """Reads a file once so the server side serves it from memory (like a CDN edge)."""
    buf = bytearray(8 * MIB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def rm_rf(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


# ---- nginx serving blobs -------------------------------------------------------------------

CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
MODEL_MEDIA = "application/vnd.ollama.image.model"
MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"


def parse_rate(text):
    """nginx-style size per second: "25m" = 25 MiB/s, "200k" = 200 KiB/s; None/"0" = no cap."""
    if not text or text == "0":
        return 0
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


class BlobServer:
    """Serves files both as /files/<name> and as registry blobs of library/<model>:<tag>.

    backend "paced" (default): bench/paced_server.py, the cap enforced per connection by TCP
    pacing (SO_MAX_PACING_RATE). backend "nginx": harness.Nginx with `limit_rate` (per request,
    with nginx's one-second initial allowance; see paced_server.py and README.md).
    rate: None (no cap) or an nginx size ("25m" = 25 MiB/s). slow_share ("5%") with slow_rate
    ("200k"): that share of requests is sent at slow_rate (nginx: split_clients on $request_id;
    paced: a seeded PRNG per request).
    models: {model_tag: (file_path, sha256_hex)}; the file is published as the model layer.
    chunk_mib: also publish each blob's chunk digests in chunk_mib MiB chunks, as Ollama's
    registry does, at /v2/library/<model>/chunksums/sha256:<hex> (a static file).
    flip: a byte offset; the first response to reach it sends that byte XORed with 0x01
    (paced_server.py --flip; the paced backend only).
    """

    def __init__(self, models, rate=None, slow_share=None, slow_rate="200k", backend="paced",
                 seed=1, chunk_mib=None, flip=None):
        if flip is not None and backend != "paced":
            raise ValueError("flip needs the paced server")
        self.backend = backend
        self.flip = flip
        self.root = tempfile.mkdtemp(prefix="modelfs-bench-www-")
        os.chmod(self.root, 0o755)  # nginx workers run as nobody
        self.models = {}
        self.nginx = self.proc = None
        files = os.path.join(self.root, "files")
        os.makedirs(files)
        for model_tag, (path, hexd) in models.items():
            model, tag = model_tag.split(":")
            repo = os.path.join(self.root, "v2", "library", model)
            os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
            os.makedirs(os.path.join(repo, "manifests"), exist_ok=True)
            config = json.dumps({"model_format": "gguf", "model_family": "bench",
                                 "architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers",
                                            "diff_ids": ["sha256:" + hexd]}}).encode()
            config_hex = hashlib.sha256(config).hexdigest()
            with open(os.path.join(repo, "blobs", "sha256:" + config_hex), "wb") as f:
                f.write(config)
            os.symlink(os.path.abspath(path), os.path.join(repo, "blobs", "sha256:" + hexd))
            if chunk_mib:
                os.makedirs(os.path.join(repo, "chunksums"), exist_ok=True)
                with open(os.path.join(repo, "chunksums", "sha256:" + hexd), "w") as f:
                    f.write(ensure_chunksums(path, chunk_mib))
            name = "%s-%s%s" % (model, tag, os.path.splitext(path)[1] or ".bin")
            os.symlink(os.path.abspath(path), os.path.join(files, name))
            manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA,
                        "config": {"mediaType": CONFIG_MEDIA, "digest": "sha256:" + config_hex,
                                   "size": len(config)},
                        "layers": [{"mediaType": MODEL_MEDIA, "digest": "sha256:" + hexd,
                                    "size": os.path.getsize(path)}]}
            with open(os.path.join(repo, "manifests", tag), "w") as f:
                json.dump(manifest, f)
            self.models[model_tag] = {"file": name, "sha256": hexd,
                                      "size": os.path.getsize(path), "source": path}
        self._log_mark = 0
        try:
            if backend == "nginx":
                self._start_nginx(rate, slow_share, slow_rate)
            elif backend == "paced":
                self._start_paced(rate, slow_share, slow_rate, seed)
            else:
                raise ValueError("unknown server backend %r" % backend)
        except BaseException:
            self.stop()
            raise

    def _start_nginx(self, rate, slow_share, slow_rate):
        http_extra = ""
        rate_expr = rate or "0"
        if slow_share:
            http_extra = ('split_clients "$request_id" $bench_rate {\n    %s %s;\n    * %s;\n  }'
                          % (slow_share, slow_rate, rate or "0"))
            rate_expr = "$bench_rate"
        server = f"""
    root {self.root};
    limit_rate {rate_expr};
    location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
    location ~ ^/v2/.+/manifests/ {{ default_type {MANIFEST_MEDIA}; }}
    location /v2/ {{ default_type application/octet-stream; }}
    location /files/ {{ autoindex on; default_type application/octet-stream; }}
"""
        self.nginx = harness.Nginx(server, http_extra)
        self.url = self.nginx.url
        self.access_log_path = self.nginx.access_log_path

    def _start_paced(self, rate, slow_share, slow_rate, seed):
        self.access_log_path = os.path.join(self.root, "access.log")
        share = float(slow_share.rstrip("%")) / 100 if slow_share else 0.0
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(BENCH_DIR, "paced_server.py"), "--root", self.root,
             "--rate", str(parse_rate(rate)), "--slow-share", str(share),
             "--slow-rate", str(parse_rate(slow_rate)), "--seed", str(seed),
             "--access-log", self.access_log_path]
            + (["--flip", str(self.flip)] if self.flip is not None else []),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError("paced_server.py did not start: %r" % line)
        self.url = "http://127.0.0.1:%d" % int(line.split()[1])

    def file_url(self, model_tag):
        return "%s/files/%s" % (self.url, self.models[model_tag]["file"])

    def blob_url(self, model_tag):
        model = model_tag.split(":")[0]
        return "%s/v2/library/%s/blobs/sha256:%s" % (self.url, model,
                                                     self.models[model_tag]["sha256"])

    def access_log(self):
        """[(path, status, body bytes, range, rate or None)] for every request so far."""
        out = []
        try:
            with open(self.access_log_path) as f:
                for line in f:
                    if self.backend == "nginx":
                        p = line.rstrip("\n").split(" ", 3)
                        if len(p) == 4:
                            out.append((p[0], int(p[1]), int(p[2]), p[3].strip('"'), None))
                    else:
                        p = line.split()
                        if len(p) >= 5:
                            out.append((p[0], int(p[1]), int(p[2]), p[3], int(p[4]))
                                       + tuple(float(x) for x in p[5:7]))
        except OSError:
            pass
        return out

    def flipped(self):
        """(range start, body bytes) of the response paced_server flipped a byte in, or None."""
        try:
            with open(self.access_log_path) as f:
                for line in f:
                    p = line.split()
                    if len(p) >= 8 and p[7].startswith("flip="):
                        rng = p[3]
                        start = (int(rng.split("=", 1)[1].split("-", 1)[0])
                                 if rng.startswith("bytes=") and not rng.startswith("bytes=-")
                                 else 0)
                        return start, int(p[2])
        except (OSError, ValueError):
            pass
        return None

    def requests_since_mark(self):
        """Access-log entries since the last call."""
        entries = self.access_log()
        new = entries[self._log_mark:]
        self._log_mark = len(entries)
        return new

    def stop(self):
        if self.nginx is not None:
            self.nginx.stop()
            self.nginx = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc.stdout.close()
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---- measuring processes -------------------------------------------------------------------

class Result(dict):
    """wall_s, cpu_s, maxrss_kib, rc, timed_out (a dict for easy JSON)."""


def run(cmd, timeout=None, stdout=subprocess.DEVNULL, stderr=None, env=None):
    """Runs cmd to completion. Wall time from the monotonic clock; user+sys CPU from os.wait4
    (which includes the reaped descendants); peak RSS from GNU time's %M. (A child forked from
    this Python process inherits its RSS high-water mark in ru_maxrss, so ru_maxrss of a direct
    child would report at least Python's own size; GNU time's child is forked from the small
    `time` process and reports the command's own peak.)"""
    with tempfile.NamedTemporaryFile(prefix="modelfs-bench-time-") as tf:
        t0 = time.monotonic()
        p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", tf.name, "--"] + list(cmd),
                             stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env,
                             start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        if timer:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        maxrss = 0
        try:
            with open(tf.name) as f:
                words = f.read().split()
            maxrss = int(words[-1])
        except (OSError, ValueError, IndexError):
            pass
    return Result(wall_s=wall, cpu_s=ru.ru_utime + ru.ru_stime, maxrss_kib=maxrss,
                  rc=p.returncode, timed_out=timed_out.is_set())


def proc_cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Daemon:
    """A FUSE daemon in the foreground on a fresh mountpoint; ready when st_dev changes."""

    def __init__(self, cmd_before_mnt, cmd_after_mnt=(), name="daemon", timeout=30):
        self.name = name
        self.mnt = tempfile.mkdtemp(prefix="modelfs-bench-mnt-")
        self.log_path = self.mnt + ".log"
        self.log = open(self.log_path, "wb")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(list(cmd_before_mnt) + [self.mnt] + list(cmd_after_mnt),
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.rusage = None
        parent = os.stat(os.path.dirname(self.mnt)).st_dev
        deadline = time.monotonic() + timeout
        try:
            while os.stat(self.mnt).st_dev == parent:
                if self.proc.poll() is not None:
                    raise RuntimeError("exited with %s" % self.proc.returncode)
                if time.monotonic() > deadline:
                    raise RuntimeError("did not mount in %ds" % timeout)
                time.sleep(0.005)
        except (OSError, RuntimeError) as e:
            time.sleep(0.2)
            rc = self.stop(timeout=5)
            raise RuntimeError("%s failed to mount (%s; exit status %s):\n%s"
                               % (name, e, rc, self._read_log()[-3000:])) from None
        self.t_mounted = time.monotonic()

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)

    def alive(self):
        return self.proc.poll() is None

    def cpu_s(self):
        return proc_cpu_s(self.proc.pid)

    def hwm_kib(self):
        return proc_hwm_kib(self.proc.pid)

    def log_text(self):
        if not self.log.closed:
            self.log.flush()
        return self._read_log()

    def _read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", self.mnt], stderr=subprocess.DEVNULL)
        self.log.close()
        try:
            os.rmdir(self.mnt)
        except OSError:
            pass
        return self.proc.returncode


def modelfs_mount(binary, registry_url, cache_dir, extra_args=()):
    return Daemon([binary, "mount", "-f", "--registry", registry_url, "--cache", cache_dir,
                   *extra_args], name="modelfs")


def wait_file(path, timeout, alive=lambda: True, interval=0.005):
    """Polls until path exists; False on timeout or when alive() turns False."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline or not alive():
            return False
        time.sleep(interval)
    return True


# ---- reporting -----------------------------------------------------------------------------

def add_report_args(ap):
    """The options every bench shares for its results: --note, --date, --no-write."""
    import datetime
    ap.add_argument("--note", default="", help="a line for the results header")
    ap.add_argument("--date", default=datetime.datetime.utcnow().strftime("%Y-%m-%d"),
                    help="the results files' date (default: today, UTC)")
    ap.add_argument("--no-write", action="store_true", help="print only")


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return rev or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_line():
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // (1 << 20)
    load = os.getloadavg()
    return ("%s, %d cores, %d GiB RAM, kernel %s, load average at start %.2f"
            % (platform.node(), os.cpu_count(), mem, platform.release(), load[0]))


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def median(xs):
    s = sorted(xs)
    if not s:
        return float("nan")
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentile(xs, p):
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def write_results(stem, date, markdown, extra_files=()):
    """Writes results/<stem>-<date>.md and results/<stem>-latest.md (+ extra (ext, src))."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    dated = os.path.join(RESULTS_DIR, "%s-%s.md" % (stem, date))
    with open(dated, "w") as f:
        f.write(markdown)
    shutil.copyfile(dated, os.path.join(RESULTS_DIR, "%s-latest.md" % stem))
    out = [dated]
    for ext, src in extra_files:
        d = os.path.join(RESULTS_DIR, "%s-%s.%s" % (stem, date, ext))
        shutil.copyfile(src, d)
        shutil.copyfile(src, os.path.join(RESULTS_DIR, "%s-latest.%s" % (stem, ext)))
        out.append(d)
    return out


def update_readme(section, markdown):
    """Replaces the text between <!-- SECTION:begin --> and <!-- SECTION:end --> in
    bench/README.md with markdown (so the README always shows the latest tables)."""
    path = os.path.join(BENCH_DIR, "README.md")
    begin, end = "<!-- %s:begin -->" % section, "<!-- %s:end -->" % section
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        return False
    text = text[:i + len(begin)] + "\n" + markdown.strip() + "\n" + text[j:]
    with open(path, "w") as f:
        f.write(text)
    return True


def demote_headings(md):
    """'# x' -> '### x', '## x' -> '#### x': results embedded under README's own headings."""
    return "\n".join("##" + line if line.startswith("#") else line for line in md.splitlines())
