"""harness.py: helpers for modelfs integration tests and scripts/demo (Python 3 stdlib only).

Import it from tests (sys.path must include tests/integration):

    from harness import Registry, push_model, make_gguf, wait_until, free_port

    with Registry() as reg:                       # docker-registry on 127.0.0.1:<free port>
        gguf = make_gguf(size_mib=64, seed=1)     # cached by (size, seed)
        pushed = push_model(reg.url, "llama3.2:1b", {"model": gguf}, fmt="docker")
        pushed["manifest_digest"], pushed["layers"][0]["digest"]

Registry(proxy_remote_url=URL) runs a pull-through cache of URL instead of a plain registry.
Registry(htpasswd={"user": "pw"}) turns on basic auth (needs bcrypt from libxcrypt via crypt).
Registry(token_auth=TokenServer(users=...)) turns on Bearer token auth (needs the openssl CLI).
Registry(cdn=True) makes blob GET/HEAD answer 307 to a local CdnServer (Range, fault injection);
FaultyCdn(reg.cdn) takes it over to flip a byte, hold ranges, and count bytes served (and served
twice). ChunksumsFront(reg.url) sits in front of a registry, answers Ollama's
/v2/<repo>/chunksums/<digest> for the digests a test sets (chunksums_text(path, chunk_size)
makes the real list) and relays everything else unchanged.
Registry(tls=(cert, key, ca)) serves https with that certificate (see make_tls_cert); url is then
https://127.0.0.1:PORT. TokenServer(tls=...) likewise serves its realm over https.
Nothing here uses a fixed port or leaves a process behind: Registry.stop() (or leaving the
`with` block) terminates the child; Registry() uses and removes a temp dir, Registry(DIR) puts
config, registry.log and storage/ in DIR and keeps them. reg.blob_data_path(digest) is the
blob's file in storage (to corrupt it in tests).

Generated GGUFs are cached in $MODELFS_TEST_CACHE (default /tmp/modelfs-test-cache) keyed by
(size_mib, seed, sha256 of scripts/make-gguf), so tests do not regenerate them.
Not thread-safe: use from one thread (pytest fixtures, a demo script).
"""

import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO_ROOT, "scripts")
REGISTRY_BIN = os.environ.get("MODELFS_REGISTRY_BIN", "/usr/bin/docker-registry")
CACHE_DIR = os.environ.get("MODELFS_TEST_CACHE",
                           os.path.join(tempfile.gettempdir(), "modelfs-test-cache"))


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(process, timeout=5):
    """SIGTERM a child, SIGKILL it if it has not exited within timeout s; no-op when gone."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def parse_range(header, size):
    """A single `Range: bytes=a-b` (or `a-`, `-n`) against a file of size bytes.

    Returns (start, end_inclusive, status): status 206 for a satisfiable range, 200 (whole file)
    when there is no usable header, 416 when the range starts past the end."""
    start, end, status = 0, size - 1, 200
    if header:
        m = re.match(r"^bytes=(\d*)-(\d*)$", header.strip())
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            status = 416 if start >= size or start > end else 206
    return start, end, status


def sha256_file(path_or_fd):
    """Hex SHA-256 of a file, by path, or through an open fd (read from offset 0, left open)."""
    h = hashlib.sha256()
    fd = os.open(path_or_fd, os.O_RDONLY) if isinstance(path_or_fd, str) else path_or_fd
    try:
        offset = 0
        while True:
            b = os.pread(fd, 1 << 20, offset)
            if not b:
                return h.hexdigest()
            h.update(b)
            offset += len(b)
    finally:
        if fd is not path_or_fd:
            os.close(fd)


def wait_until(predicate, timeout, what, interval=0.05):
    """Polls predicate() until it returns a truthy value, which is returned.

    Raises TimeoutError naming `what` after `timeout` seconds. Exceptions from predicate
    propagate (so a predicate can fail fast, e.g. when a child process died).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def _tail(path, n=30):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
    except OSError as e:
        return "(no log: %s)" % e


class Registry:
    """A docker-registry (CNCF distribution 2.8) child process with storage in a temp dir.

    Attributes: url ("http://127.0.0.1:PORT"), port, dir (temp dir), storage_dir, log_path,
    process. Plain mode enables deletes; proxy mode (proxy_remote_url) is a pull-through
    cache of that registry (distribution forbids pushes and deletes in that mode).
    """

    def __init__(self, dir=None, proxy_remote_url=None, proxy_username=None,
                 proxy_password=None, htpasswd=None, token_auth=None, cdn=False,
                 start_timeout=20.0, keep_dir=None, extra_config="", tls=None):
        """dir: where config, log and storage go (created if missing; kept after stop()).
        Without dir a temp dir is used and removed by stop() unless keep_dir=True."""
        self.proxy_remote_url = proxy_remote_url
        self.proxy_username, self.proxy_password = proxy_username, proxy_password
        self.htpasswd = htpasswd
        self.token_auth = token_auth
        self.tls = tls
        self.cdn = None
        self.start_timeout = start_timeout
        self.keep_dir = (dir is not None) if keep_dir is None else keep_dir
        self.extra_config = extra_config
        if dir is None:
            self.dir = tempfile.mkdtemp(prefix="modelfs-registry-")
        else:
            self.dir = os.path.abspath(dir)
            os.makedirs(self.dir, exist_ok=True)
        self.storage_dir = os.path.join(self.dir, "storage")
        self.config_path = os.path.join(self.dir, "config.yml")
        self.log_path = os.path.join(self.dir, "registry.log")
        self.process = None
        self.port = None
        self.url = None
        self._log = None
        try:
            if cdn:
                self.cdn = CdnServer(self.storage_dir)
            self._start()
        except BaseException:
            self.stop()
            raise

    # -- config -----------------------------------------------------------------------------

    def _config(self, port):
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  formatter: text",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            "    rootdirectory: %s" % self.storage_dir,
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            "  addr: 127.0.0.1:%d" % port,
            "  secret: modelfs-test-secret",
            "  draintimeout: 1s",
        ]
        if self.tls:
            lines += ["  tls:", "    certificate: %s" % self.tls[0], "    key: %s" % self.tls[1]]
        lines += [
            "health:",
            "  storagedriver:",
            "    enabled: false",
        ]
        if self.proxy_remote_url:
            lines += ["proxy:", "  remoteurl: %s" % self.proxy_remote_url]
            if self.proxy_username is not None:
                lines += ["  username: %s" % self.proxy_username,
                          "  password: %s" % (self.proxy_password or "")]
        if self.htpasswd:
            path = os.path.join(self.dir, "htpasswd")
            _write_htpasswd(path, self.htpasswd)
            lines += ["auth:", "  htpasswd:", "    realm: modelfs-test", "    path: %s" % path]
        text = "\n".join(lines) + "\n"
        if self.token_auth is not None:
            text += self.token_auth.registry_config()
        if self.cdn is not None:
            text += ("middleware:\n  storage:\n    - name: redirect\n      options:\n"
                     "        baseurl: %s\n" % self.cdn.url)
        return text + self.extra_config

    # -- lifecycle --------------------------------------------------------------------------

    def _start(self):
        if not os.access(REGISTRY_BIN, os.X_OK):
            raise RuntimeError("%s not found (apt-get install docker-registry)" % REGISTRY_BIN)
        os.makedirs(self.storage_dir, exist_ok=True)
        last_error = None
        for _ in range(3):  # the free port can be taken between free_port() and bind()
            port = free_port()
            with open(self.config_path, "w") as f:
                f.write(self._config(port))
            self._log = open(self.log_path, "ab")
            self.process = subprocess.Popen(
                [REGISTRY_BIN, "serve", self.config_path],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                cwd=self.dir, start_new_session=True)
            scheme = "https" if self.tls else "http"
            self.port, self.url = port, "%s://127.0.0.1:%d" % (scheme, port)
            try:
                wait_until(self._ready, self.start_timeout, "docker-registry on %s" % self.url)
                return
            except RuntimeError as e:  # died: maybe the port was taken; retry with another
                last_error = e
                self._kill()
                if "address already in use" not in _tail(self.log_path).lower():
                    raise
            except TimeoutError as e:
                self._kill()
                raise RuntimeError("%s\nregistry log (%s):\n%s"
                                   % (e, self.log_path, _tail(self.log_path))) from None
        raise last_error

    def _ready(self):
        rc = self.process.poll()
        if rc is not None:
            raise RuntimeError("docker-registry exited with status %s during startup; log "
                               "(%s):\n%s" % (rc, self.log_path, _tail(self.log_path)))
        ctx = None
        if self.tls:
            import ssl
            ctx = ssl.create_default_context(cafile=self.tls[2])
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=2, context=ctx) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401  # up, but auth is on
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            return False

    def _kill(self):
        terminate(self.process)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self):
        """Terminates the registry and (unless keep_dir) deletes its storage. Idempotent."""
        self._kill()
        self.process = None
        if self.cdn is not None:
            self.cdn.stop()
            self.cdn = None
        if not self.keep_dir and self.dir and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    def blob_data_path(self, digest):
        """The file holding a blob in filesystem storage ("sha256:<hex>" or "<hex>"), e.g.
        to corrupt it in place. Valid while the registry's dir exists."""
        hexd = digest.split(":", 1)[-1]
        return os.path.join(self.storage_dir, "docker", "registry", "v2", "blobs", "sha256",
                            hexd[:2], hexd, "data")

    def log_tail(self, n=30):
        return _tail(self.log_path, n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "Registry(%s, dir=%s)" % (self.url, self.dir)


class Nginx:
    """nginx (Debian's nginx-light) as a child process on a free loopback port.

    `server_body` is the inside of the `server { }` block (listen is added); `http_extra` goes in
    the `http { }` block (split_clients, upstreams, proxy_cache_path). The access log records
    `$request_uri $status $body_bytes_sent $http_range` per line (read with access_log()), so
    tests can count the bytes an origin served. `{{DIR}}` in either string is replaced with this
    server's directory (for cache paths and roots).
    """

    def __init__(self, server_body, http_extra="", start_timeout=20.0):
        self.dir = tempfile.mkdtemp(prefix="modelfs-nginx-")
        self.access_log_path = os.path.join(self.dir, "access.log")
        self.error_log_path = os.path.join(self.dir, "error.log")
        self.process = None
        self.port = None
        self.url = None
        server_body = server_body.replace("{{DIR}}", self.dir)
        http_extra = http_extra.replace("{{DIR}}", self.dir)
        try:
            for _ in range(3):
                port = free_port()
                conf = os.path.join(self.dir, "nginx.conf")
                with open(conf, "w") as f:
                    f.write(self._config(port, server_body, http_extra))
                self.process = subprocess.Popen(
                    ["nginx", "-c", conf, "-p", self.dir, "-g", "daemon off;"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=open(self.error_log_path, "ab"), start_new_session=True)
                self.port, self.url = port, "http://127.0.0.1:%d" % port
                try:
                    wait_until(self._ready, start_timeout, "nginx on %s" % self.url)
                    return
                except RuntimeError:
                    if "in use" not in _tail(self.error_log_path):
                        raise
            raise RuntimeError("nginx could not bind a port")
        except BaseException:
            self.stop()
            raise

    def _config(self, port, server_body, http_extra):
        d = self.dir
        return f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  log_format bytes '$request_uri $status $body_bytes_sent "$http_range"';
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy_temp;
  fastcgi_temp_path {d}/fastcgi_temp;
  uwsgi_temp_path {d}/uwsgi_temp;
  scgi_temp_path {d}/scgi_temp;
  keepalive_requests 100000;
  sendfile on;
  {http_extra}
  server {{
    listen 127.0.0.1:{port};
    access_log {self.access_log_path} bytes;
    {server_body}
  }}
}}
"""

    def _ready(self):
        if self.process.poll() is not None:
            raise RuntimeError("nginx exited with %s: %s"
                               % (self.process.returncode, _tail(self.error_log_path)))
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def access_log(self):
        """[(uri, status, body_bytes_sent, range_header)] for every request so far."""
        out = []
        if os.path.exists(self.access_log_path):
            with open(self.access_log_path) as f:
                for line in f:
                    parts = line.rstrip("\n").split(" ", 3)
                    if len(parts) == 4:
                        out.append((parts[0], int(parts[1]), int(parts[2]), parts[3].strip('"')))
        return out

    def stop(self):
        terminate(self.process)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def rate_limited_proxy(upstream_url, rate="1m", slow_share=None, slow_rate="200k"):
    """An Nginx reverse proxy to upstream_url whose responses are sent at `rate` bytes/s per
    connection; with slow_share (e.g. "5%"), that share of requests crawls at slow_rate."""
    http_extra = ""
    rate_expr = rate
    if slow_share:
        http_extra = f"""split_clients "$request_id" $modelfs_rate {{
    {slow_share} {slow_rate};
    * {rate};
  }}"""
        rate_expr = "$modelfs_rate"
    server = f"""location / {{
      proxy_pass {upstream_url};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
      proxy_max_temp_file_size 0;
      limit_rate {rate_expr};
    }}"""
    return Nginx(server, http_extra)


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no request log, and a client that drops the connection is fine."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class CdnServer:
    """A static file server standing in for a blob CDN (the target of a registry's 307).

    Serves files under `root` on 127.0.0.1:<free port> from a daemon thread: GET and HEAD,
    a single "Range: bytes=a-b" / "a-" / "-n" (206 + Content-Range, 416 if unsatisfiable),
    otherwise 200. Registry(cdn=True) creates one over its storage dir and turns on
    distribution's "redirect" storage middleware, so blob GETs answer 307 to
    CDN_URL/docker/registry/v2/blobs/sha256/<xx>/<hex>/data.

    Fault injection for fetcher tests (thread-safe; each fault is used by one request):
      inject(status=503)               answer the next request with that status
      inject(truncate_after=N)         send headers for the full range, then N bytes, close
      inject(delay=S)                  sleep S seconds before answering
    .requests records (method, path, Range header or None) for every request.
    """

    def __init__(self, root):
        import http.server
        import threading
        self.root = os.path.abspath(root)
        self.requests = []
        self._faults = []
        self._lock = threading.Lock()
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                server._handle(self, body=True)

            def do_HEAD(self):
                server._handle(self, body=False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def inject(self, status=None, truncate_after=None, delay=None):
        with self._lock:
            self._faults.append({"status": status, "truncate_after": truncate_after,
                                 "delay": delay})

    def _handle(self, req, body):
        path = urllib.parse.unquote(urllib.parse.urlsplit(req.path).path)
        rng = req.headers.get("Range")
        with self._lock:
            self.requests.append((req.command, path, rng))
            fault = self._faults.pop(0) if self._faults else {}
        if fault.get("delay"):
            time.sleep(fault["delay"])
        if fault.get("status"):
            return self._reply(req, fault["status"], {}, b"injected failure\n", body)
        full = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
        if not full.startswith(self.root + os.sep) or not os.path.isfile(full):
            return self._reply(req, 404, {}, b"not found\n", body)
        size = os.path.getsize(full)
        start, end, status = parse_range(rng, size)
        if status == 416:
            return self._reply(req, 416, {"Content-Range": "bytes */%d" % size}, b"", body)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if status == 206:
            headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, size)
        length = end - start + 1
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(length))
        req.end_headers()
        if not body:
            return
        limit = fault.get("truncate_after")
        to_send = length if limit is None else min(limit, length)
        try:
            with open(full, "rb") as f:
                f.seek(start)
                while to_send > 0:
                    chunk = f.read(min(1 << 20, to_send))
                    if not chunk:
                        break
                    req.wfile.write(chunk)
                    to_send -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if limit is not None:
            req.close_connection = True

    @staticmethod
    def _reply(req, status, headers, data, body):
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class FaultyCdn:
    """Takes over a CdnServer's handler (`FaultyCdn(Registry(cdn=True).cdn)`): Range GETs of files
    under its root, counting the body bytes actually sent, with faults armed by the test.

    arm(flip_at, cut_after=None)  resets the counters; the first response whose range covers
                                  byte `flip_at` has that byte flipped (xor 1); with cut_after,
                                  that response is closed `cut_after` bytes past the flip.
                                  arm(None) arms nothing.
    hold(start, end, ...)         responses overlapping [start, end] (inclusive) wait before
                                  their headers until release() (or `timeout` s). With
                                  within=True only ranges entirely inside [start, end] are held;
                                  with refetch_only=True only requests for bytes every one of
                                  which was served before (re-fetches).
    Counters: .sent (body bytes written), .duplicate (bytes of a file written that had already
    been written once since arm(): what the client downloaded twice), .requests (Served records
    in arrival order), sent_since(t) / duplicate_since(t) for requests that arrived at or after
    `t`, in seconds of the local day (the daemon's log timestamps). A response the client closed
    early is marked .aborted: the bytes it had in flight (socket buffers) count as sent but may
    never have reached the client.
    Safe for concurrent use (the CDN serves each request on its own thread).
    """

    class Served:
        __slots__ = ("start", "end", "sent", "arrival", "duplicate", "aborted", "held")

        def __init__(self, start, end, arrival):
            self.start, self.end, self.arrival = start, end, arrival
            self.sent = self.duplicate = 0
            self.aborted = self.held = False

        def __repr__(self):
            return "Served(%d-%d sent=%d dup=%d at=%.6f%s%s)" % (
                self.start, self.end, self.sent, self.duplicate, self.arrival,
                " aborted" if self.aborted else "", " held" if self.held else "")

    def __init__(self, cdn):
        import threading
        self.cdn = cdn
        self.lock = threading.Lock()
        self._hold = None  # (start, end, within, refetch_only, event, deadline (monotonic))
        self.waiting = 0   # requests waiting on a hold right now
        self.arm(None)
        cdn._handle = self._handle

    def arm(self, flip_at, cut_after=None):
        with self.lock:
            self.sent, self.flip_at, self.cut_after, self.fired = 0, flip_at, cut_after, False
            self.duplicate = 0
            self.requests = []
            self._served = {}  # file -> sorted disjoint [start, end) lists of bytes written

    def hold(self, start, end, within=False, refetch_only=False, timeout=60):
        import threading
        with self.lock:
            if self._hold is not None:
                self._hold[4].set()
            self._hold = (start, end, within, refetch_only, threading.Event(),
                          time.monotonic() + timeout)

    def release(self):
        """Lets every held response go, and holds no more. Idempotent."""
        with self.lock:
            if self._hold is not None:
                self._hold[4].set()
            self._hold = None

    def holding(self):
        """True while a hold is set and has not timed out or been released."""
        with self.lock:
            return (self._hold is not None and not self._hold[4].is_set()
                    and time.monotonic() < self._hold[5])

    def held(self):
        """The Served records of requests that were (or are being) held."""
        with self.lock:
            return [r for r in self.requests if r.held]

    def sent_since(self, seconds_of_day):
        with self.lock:
            return sum(r.sent for r in self.requests if r.arrival >= seconds_of_day)

    def duplicate_since(self, seconds_of_day):
        with self.lock:
            return sum(r.duplicate for r in self.requests if r.arrival >= seconds_of_day)

    def aborted_bytes(self):
        """Body bytes written to responses the client closed before their end (an upper bound
        on what was in flight, unread, when it gave them up)."""
        with self.lock:
            return sum(r.sent for r in self.requests if r.aborted)

    def _count(self, full, record, a, b):
        """Records bytes [a, b) of file `full` as written by `record`'s response, counting those
        written before as duplicates."""
        with self.lock:
            spans = self._served.setdefault(full, [])
            seen = sum(max(0, min(b, e) - max(a, s)) for s, e in spans)
            merged, lo, hi = [], a, b
            for s, e in spans:
                if e < lo or s > hi:
                    merged.append([s, e])
                else:
                    lo, hi = min(lo, s), max(hi, e)
            merged.append([lo, hi])
            merged.sort()
            self._served[full] = merged
            self.sent += b - a
            self.duplicate += seen
            record.sent += b - a
            record.duplicate += seen

    def _handle(self, req, body):
        import datetime
        path = urllib.parse.unquote(urllib.parse.urlsplit(req.path).path)
        full = os.path.realpath(os.path.join(self.cdn.root, path.lstrip("/")))
        if not full.startswith(self.cdn.root + os.sep) or not os.path.isfile(full):
            req.send_response(404)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        size = os.path.getsize(full)
        start, end = 0, size - 1
        m = re.match(r"^bytes=(\d+)-(\d*)$", (req.headers.get("Range") or "").strip())
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start > end:
            req.send_response(416)
            req.send_header("Content-Range", "bytes */%d" % size)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        now = datetime.datetime.now()
        record = self.Served(start, end, now.hour * 3600 + now.minute * 60 + now.second +
                             now.microsecond / 1e6)
        gate = None
        with self.lock:
            self.requests.append(record)
            fault = (not self.fired and self.flip_at is not None and start <= self.flip_at <= end)
            if fault:
                self.fired = True
            h = self._hold
            if h is not None and not h[4].is_set() and (
                    not h[3] or sum(max(0, min(end + 1, e) - max(start, s))
                                    for s, e in self._served.get(full, ())) == end + 1 - start):
                lo, hi, within = h[0], h[1], h[2]
                if (lo <= start and end <= hi) if within else (start <= hi and lo <= end):
                    gate, record.held = h, True
                    self.waiting += 1
        if gate is not None:
            gate[4].wait(max(0.0, gate[5] - time.monotonic()))
            with self.lock:
                self.waiting -= 1
        req.send_response(206 if m else 200)
        if m:
            req.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        req.send_header("Content-Length", str(end - start + 1))
        req.end_headers()
        if not body:
            return
        limit = end + 1
        if fault and self.cut_after is not None:
            limit = min(limit, self.flip_at + self.cut_after)
        pos = start
        try:
            with open(full, "rb") as f:
                f.seek(start)
                while pos < limit:
                    chunk = bytearray(f.read(min(1 << 20, limit - pos)))
                    if not chunk:
                        break
                    if fault and pos <= self.flip_at < pos + len(chunk):
                        chunk[self.flip_at - pos] ^= 0x01
                    req.wfile.write(chunk)
                    self._count(full, record, pos, pos + len(chunk))
                    pos += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            with self.lock:
                record.aborted = True
        if pos <= end:
            req.close_connection = True


def chunksums_lines(path, chunk_size):
    """[(sha256 hex, start, end_inclusive)] for consecutive chunk_size chunks of a file (the last
    one short), as a registry's chunksums endpoint would publish them."""
    out = []
    with open(path, "rb") as f:
        start = 0
        while True:
            b = f.read(chunk_size)
            if not b:
                return out
            out.append((hashlib.sha256(b).hexdigest(), start, start + len(b) - 1))
            start += len(b)


def chunksums_text(path, chunk_size=None, lines=None):
    """The body of Ollama's `GET /v2/<repo>/chunksums/<digest>` for a file: one line per chunk,
    `sha256:<64 hex> <start>-<end>` (decimal, end inclusive), each ending in "\\n". `lines` (from
    chunksums_lines, perhaps edited) is used instead of hashing the file when given."""
    if lines is None:
        lines = chunksums_lines(path, chunk_size)
    return "".join("sha256:%s %d-%d\n" % line for line in lines)


class ChunksumsFront:
    """A registry front that adds Ollama's chunksums endpoint to a registry that has none.

    An HTTP/1.1 server on 127.0.0.1:<free port> (a thread per connection). A GET or HEAD of
    `/v2/<repo>/chunksums/<digest>` for a digest given to set_chunksums() is answered here;
    every other request (any method, including chunksums of other digests, which distribution
    answers 404) is relayed to `upstream_url` (http only) on a fresh connection: method,
    path and query, every end-to-end request header (Host, Authorization, Range, Accept, ...)
    and the request body; then the status, every end-to-end response header (Location,
    WWW-Authenticate, Content-Range, Docker-Content-Digest, Content-Length, ...) and the body,
    streamed as it arrives. A response without Content-Length is re-chunked. Hop-by-hop
    headers (Connection, Keep-Alive, Transfer-Encoding, TE, Trailer, Upgrade, Expect,
    Proxy-*) are not forwarded. An unreachable upstream gives 502; an upstream that stops
    mid-body gives a short body and a closed connection, as it would have.

        with Registry(cdn=True) as reg, ChunksumsFront(reg.url) as front:
            front.set_chunksums(digest, chunksums_text(path, 3 << 20))
            front.set_chunksums(other, "garbage", status=500)
            ... mount --registry front.url ...
            front.chunksums_requests()          # [FrontRequest] asked of the chunksums route

    .requests records every request (FrontRequest: method, path, headers as a list of pairs,
    the status answered) in arrival order. Safe for concurrent use.
    """

    HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding",
                            "te", "trailer", "trailers", "upgrade", "proxy-authenticate",
                            "proxy-authorization", "expect"))
    ROUTE = re.compile(r"^/v2/(?P<repo>.+)/chunksums/(?P<digest>[a-z0-9]+:[A-Za-z0-9=_-]+)$")

    class FrontRequest:
        __slots__ = ("method", "path", "headers", "status", "repo", "digest")

        def __init__(self, method, path, headers):
            self.method, self.path, self.headers, self.status = method, path, headers, None
            route = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
            m = ChunksumsFront.ROUTE.match(route)
            self.repo = m.group("repo") if m else None
            self.digest = m.group("digest") if m else None

        def header(self, name):
            for k, v in self.headers:
                if k.lower() == name.lower():
                    return v
            return None

        def __repr__(self):
            return "FrontRequest(%s %s -> %s)" % (self.method, self.path, self.status)

    def __init__(self, upstream_url, timeout=60):
        import http.server
        import threading
        u = urllib.parse.urlsplit(upstream_url)
        if u.scheme != "http":
            raise ValueError("ChunksumsFront relays to http:// only, not %s" % upstream_url)
        self.upstream = (u.hostname, u.port or 80)
        self.timeout = timeout
        self.requests = []
        self._replies = {}  # digest -> (status, body, content_type)
        self._lock = threading.Lock()
        front = self

        class Handler(QuietHandler):
            def _any(self):
                front._handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_OPTIONS = _any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    # -- what the test sets and reads -------------------------------------------------------

    def set_chunksums(self, digest, text, status=200, content_type="text/plain; charset=utf-8"):
        """Answer GET/HEAD /v2/*/chunksums/<digest> ("sha256:<hex>") with this status and
        body (str or bytes) from now on, for any repository."""
        body = text.encode() if isinstance(text, str) else bytes(text)
        with self._lock:
            self._replies[digest] = (status, body, content_type)

    def clear_chunksums(self):
        """Forget every set_chunksums(): all chunksums requests go upstream again (404)."""
        with self._lock:
            self._replies.clear()

    def reset(self):
        """Forgets the recorded requests and every set_chunksums()."""
        with self._lock:
            self._replies.clear()
            self.requests = []

    def chunksums_requests(self, digest=None):
        with self._lock:
            return [r for r in self.requests
                    if r.digest is not None and (digest is None or r.digest == digest)]

    # -- serving ----------------------------------------------------------------------------

    def _handle(self, req):
        record = self.FrontRequest(req.command, req.path, list(req.headers.items()))
        with self._lock:
            self.requests.append(record)
            reply = (self._replies.get(record.digest)
                     if record.digest is not None and req.command in ("GET", "HEAD") else None)
        if reply is not None:
            status, body, content_type = reply
            record.status = status
            self._read_body(req)
            req.send_response(status)
            req.send_header("Content-Type", content_type)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(body)
            return
        self._relay(req, record)

    @staticmethod
    def _read_body(req):
        """The request body (Content-Length or chunked), or None when there is none."""
        if "chunked" in (req.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                line = req.rfile.readline(65537)
                n = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if n == 0:
                    while req.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(req.rfile.read(n))
                req.rfile.readline(3)
        length = req.headers.get("Content-Length")
        if length is not None:
            return req.rfile.read(int(length))
        return None

    def _relay(self, req, record):
        import http.client
        body = self._read_body(req)
        conn = http.client.HTTPConnection(*self.upstream, timeout=self.timeout)
        try:
            try:
                conn.putrequest(req.command, req.path, skip_host=True,
                                skip_accept_encoding=True)
                if req.headers.get("Host") is None:
                    conn.putheader("Host", "%s:%d" % self.upstream)
                for k, v in req.headers.items():
                    if k.lower() not in self.HOP_BY_HOP and k.lower() != "content-length":
                        conn.putheader(k, v)
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                record.status = 502
                msg = ("front: upstream %s:%d: %s\n" % (self.upstream + (e,))).encode()
                req.send_response(502)
                req.send_header("Content-Type", "text/plain")
                req.send_header("Content-Length", str(len(msg)))
                req.end_headers()
                if req.command != "HEAD":
                    req.wfile.write(msg)
                return
            record.status = resp.status
            no_body = (req.command == "HEAD" or resp.status in (204, 304)
                       or 100 <= resp.status < 200)
            req.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in self.HOP_BY_HOP:
                    req.send_header(k, v)
            chunked = False
            if not no_body and resp.getheader("Content-Length") is None:
                if req.request_version == "HTTP/1.1":
                    chunked = True
                    req.send_header("Transfer-Encoding", "chunked")
                else:  # HTTP/1.0 client: the body ends when the connection does
                    req.send_header("Connection", "close")
            req.end_headers()
            if no_body:
                return
            try:
                while True:
                    data = resp.read1(1 << 16)
                    if not data:
                        break
                    req.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                if chunked:
                    req.wfile.write(b"0\r\n\r\n")
            except (http.client.HTTPException, OSError) as e:
                if isinstance(e, (BrokenPipeError, ConnectionResetError)):
                    raise
                req.close_connection = True  # upstream broke mid-body: so does this response
        finally:
            conn.close()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "ChunksumsFront(%s -> %s:%d)" % (self.url, self.upstream[0], self.upstream[1])


class TokenServer:
    """A Docker token-auth server (the "realm" of a Bearer challenge) for Registry(token_auth=).

    Serves GET /token?service=...&scope=... on 127.0.0.1:<free port> from a daemon thread and
    answers {"token": JWT, "access_token": JWT, "expires_in": 300}. The JWT is RS256-signed
    with a throwaway RSA key (openssl CLI) whose self-signed certificate goes in the x5c header
    and in the registry's rootcertbundle. With users={name: password} the request must carry
    matching Basic credentials (else 401); with users=None anyone gets a token. Every granted
    scope is recorded in .requests as (user or None, [scopes]) for tests to inspect.
    """

    SERVICE = "modelfs-test-registry"
    ISSUER = "modelfs-test-token-issuer"

    def __init__(self, users=None, tls=None):
        import http.server
        import threading
        self.users = users
        self.requests = []
        self.dir = tempfile.mkdtemp(prefix="modelfs-token-")
        self.key_path = os.path.join(self.dir, "key.pem")
        self.cert_path = os.path.join(self.dir, "cert.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=modelfs-test-token", "-keyout", self.key_path,
                        "-out", self.cert_path], check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", self.cert_path, "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self._x5c = base64.b64encode(der).decode()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls:  # (cert, key, ca): serve the realm over https
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls[0], tls[1])
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = "%s://127.0.0.1:%d" % (scheme, self.httpd.server_address[1])
        self.realm = self.url + "/token"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def _handle(self, req):
        u = urllib.parse.urlsplit(req.path)
        if u.path != "/token":
            req.send_error(404)
            return
        q = urllib.parse.parse_qs(u.query)
        user = None
        auth = req.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users is not None and self.users.get(user) != pw:
                user = False
        if self.users is not None and not user:
            req.send_response(401)
            req.send_header("WWW-Authenticate", 'Basic realm="modelfs-test-token"')
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        access = []
        for scope in q.get("scope", []):
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind and name:
                    access.append({"type": kind, "name": name,
                                   "actions": [a for a in actions.split(",") if a]})
        self.requests.append((user, q.get("scope", [])))
        token = self.sign({"iss": self.ISSUER, "sub": user or "anonymous",
                           "aud": q.get("service", [self.SERVICE])[0],
                           "exp": int(time.time()) + 300, "nbf": int(time.time()) - 10,
                           "iat": int(time.time()), "jti": os.urandom(8).hex(),
                           "access": access})
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def sign(self, claims):
        def b64(b):
            return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key_path],
                             input=signing_input.encode(), check=True,
                             capture_output=True).stdout
        return signing_input + "." + b64(sig)

    def registry_config(self):
        return "\n".join([
            "auth:", "  token:",
            "    realm: %s" % self.realm,
            "    service: %s" % self.SERVICE,
            "    issuer: %s" % self.ISSUER,
            "    rootcertbundle: %s" % self.cert_path]) + "\n"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def make_tls_cert(directory, cn="127.0.0.1"):
    """A throwaway CA and a server certificate it signs for 127.0.0.1/localhost (openssl CLI).

    Returns (cert_path, key_path, ca_path) in directory, the form Registry(tls=) and
    TokenServer(tls=) take.
    """
    os.makedirs(directory, exist_ok=True)
    ca_key, ca = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.pem")
    key, csr = os.path.join(directory, "server.key"), os.path.join(directory, "server.csr")
    cert, ext = os.path.join(directory, "server.pem"), os.path.join(directory, "san.ext")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=modelfs test CA", "-keyout", ca_key, "-out", ca)
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=%s" % cn, "-keyout", key,
        "-out", csr)
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
        "-extfile", ext, "-out", cert)
    return cert, key, ca


def _write_htpasswd(path, users):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # deprecated in 3.11+, but the only stdlib bcrypt (via libxcrypt)
    with open(path, "w") as f:
        for user, password in users.items():
            h = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 5))
            if not h or not h.startswith("$2"):
                raise RuntimeError("crypt() has no bcrypt here; cannot write htpasswd")
            f.write("%s:%s\n" % (user, h))


def push_model(registry_url, name, files, fmt="docker", user=None, password=None,
               extra_args=(), timeout=1800):
    """Runs scripts/push-model; returns its JSON result.

    files: {kind: path} (or a list of (kind, path) pairs to repeat a kind, e.g. license).
    Raises RuntimeError with push-model's stderr on failure.
    """
    items = files.items() if isinstance(files, dict) else files
    cmd = [sys.executable, os.path.join(SCRIPTS, "push-model"), "--registry", registry_url,
           "--format", fmt, "--quiet"]
    if user is not None:
        cmd += ["--user", user, "--password", password or ""]
    cmd += list(extra_args) + [name] + ["%s=%s" % (k, p) for k, p in items]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("push-model failed (%d): %s\n%s"
                           % (r.returncode, " ".join(cmd), r.stderr.strip()))
    return json.loads(r.stdout)


def make_gguf(path=None, size_mib=8, seed=0):
    """Returns the path of a GGUF made by scripts/make-gguf with these args.

    Files are generated once into CACHE_DIR; with `path`, the cached file is hard-linked (or
    copied) there. The cache key includes the generator's own hash, so edits to make-gguf
    invalidate old files.
    """
    script = os.path.join(SCRIPTS, "make-gguf")
    with open(script, "rb") as f:
        gen = hashlib.sha256(f.read()).hexdigest()[:12]
    os.makedirs(CACHE_DIR, exist_ok=True)
    cached = os.path.join(CACHE_DIR, "gguf-%sMiB-seed%d-%s.gguf" % (size_mib, seed, gen))
    if not os.path.exists(cached):
        subprocess.run([sys.executable, script, "--size-mib", str(size_mib), "--seed",
                        str(seed), cached], check=True, capture_output=True, timeout=600)
    if path is None:
        return cached
    if os.path.lexists(path):
        os.unlink(path)
    try:
        os.link(cached, path)
    except OSError:
        shutil.copyfile(cached, path)
    return path


def run_llama(model_path, tokens=16, prompt=None, timeout=600):
    """Runs scripts/llama/run.mjs on model_path; returns its JSON (text, tokens, timings)."""
    cmd = ["node", os.path.join(SCRIPTS, "llama", "run.mjs"), model_path, "--tokens", str(tokens)]
    if prompt is not None:
        cmd += ["--prompt", prompt]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("run.mjs failed (%d): %s" % (r.returncode, r.stderr.strip()[-2000:]))
    return json.loads(r.stdout)


def http_get(url, headers=None, timeout=30):
    """GET url; returns (status, headers, body) without raising on HTTP errors or redirects."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
