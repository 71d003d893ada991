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
Registry(cdn=True) makes blob GET/HEAD answer 307 to a local CdnServer (Range, fault injection).
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

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

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
