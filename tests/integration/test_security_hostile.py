"""Issue 7: a hostile registry. One in-test HTTP server (Python http.server) serves a good model
plus one model per attack, keyed by repository name. Every attack must end in a clear error
(ENOENT/EIO to the caller, a log line), bounded work, nothing written outside the cache, and a
daemon that still serves the good model afterwards.
"""
import errno
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import harness

CANARY = "modelfs-escape-" + os.urandom(4).hex()
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_TEMPLATE = "application/vnd.ollama.image.template"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
ALLOWED_ERRNOS = (errno.ENOENT, errno.EIO)


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type, data):
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


class HostileRegistry:
    """http://127.0.0.1:PORT; manifests[name] is bytes or a callable(handler) for
    /v2/library/<name>/manifests/*; blob_handlers[name] likewise for that repository's blobs
    (default: serve self.blobs with Range support). Counts requests per path and bytes sent."""

    def __init__(self):
        self.manifests = {}
        self.blob_handlers = {}
        self.blobs = {}
        self.hits = {}
        self.sent = {}
        self.lock = threading.Lock()
        reg = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                reg._handle(self)

            def do_HEAD(self):
                reg._handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, name):
        with self.lock:
            return self.hits.get(name, 0)

    def _handle(self, req):
        path = req.path.split("?", 1)[0]
        parts = path.split("/")
        if path in ("/v2", "/v2/"):
            return self.reply(req, 200, b"{}", "application/json")
        # /v2/library/<name>/(manifests|blobs)/<ref>
        if len(parts) == 6 and parts[1] == "v2" and parts[2] == "library":
            name, kind, ref = parts[3], parts[4], parts[5]
            with self.lock:
                self.hits[name] = self.hits.get(name, 0) + 1
            if kind == "manifests" and name in self.manifests:
                m = self.manifests[name]
                return m(req) if callable(m) else self.reply(req, 200, m, DOCKER_V2)
            if kind == "blobs":
                h = self.blob_handlers.get(name)
                if h is not None:
                    return h(req, ref)
                if ref in self.blobs:
                    return self.serve_blob(req, self.blobs[ref])
        body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]})
        return self.reply(req, 404, body.encode(), "application/json")

    def reply(self, req, status, body, ctype="application/octet-stream", headers=()):
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            req.send_header(k, v)
        req.end_headers()
        if req.command != "HEAD":
            try:
                req.wfile.write(body)
            except OSError:
                pass

    @staticmethod
    def requested_range(req, size):
        r = req.headers.get("Range", "")
        if r.startswith("bytes="):
            a, _, b = r[6:].partition("-")
            start = int(a)
            end = min(int(b), size - 1) if b else size - 1
            return start, end
        return None

    def serve_blob(self, req, data):
        rng = self.requested_range(req, len(data))
        if rng is None:
            return self.reply(req, 200, data)
        start, end = rng
        return self.reply(req, 206, data[start:end + 1],
                          headers=[("Content-Range", "bytes %d-%d/%d" % (start, end, len(data)))])

    def stream(self, req, name, status, headers, chunks, delay=0.0):
        """Sends headers then the chunks (an iterator) until the client goes away."""
        req.send_response(status)
        for k, v in headers:
            req.send_header(k, v)
        req.end_headers()
        req.close_connection = True
        try:
            for c in chunks:
                req.wfile.write(c)
                req.wfile.flush()
                with self.lock:
                    self.sent[name] = self.sent.get(name, 0) + len(c)
                if delay:
                    time.sleep(delay)
        except OSError:
            pass

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Listener:
    """A TCP listener that records whether anyone connected (for redirects that must not be
    followed)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
                self.connections += 1
                c.close()
            except OSError:
                continue

    def stop(self):
        self._stop = True
        self.sock.close()


def good_manifest(reg, seed, model_size=256 << 10):
    """Registers blobs for a valid model; returns (manifest dict, model bytes)."""
    model = hashlib.sha256(seed.encode()).digest() * (model_size // 32)
    config = json.dumps({"model_format": "gguf", "seed": seed}).encode()
    template = ("{{ .Prompt }} %s" % seed).encode()
    for b in (model, config, template):
        reg.blobs[digest_of(b)] = b
    m = {"schemaVersion": 2, "mediaType": DOCKER_V2,
         "config": descriptor(CONFIG_TYPE, config),
         "layers": [descriptor(OLLAMA_MODEL, model), descriptor(OLLAMA_TEMPLATE, template)]}
    return m, model


def layer_variant(reg, name, **fields):
    m, _ = good_manifest(reg, name)
    m["layers"][0].update(fields)
    reg.manifests[name] = json.dumps(m).encode()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    reg = HostileRegistry()
    ftp, other = Listener(), Listener()
    reg.listeners = {"ftp": ftp, "other": other}
    m, reg.good_model = good_manifest(reg, "good")
    reg.manifests["good"] = json.dumps(m).encode()

    # -- manifest fields ------------------------------------------------------------------
    esc = "../../../../../../tmp/" + CANARY
    layer_variant(reg, "dotdot-digest", digest="sha256:" + esc)
    layer_variant(reg, "slash-mediatype", mediaType="application/vnd.ollama.image.model/" + esc)
    layer_variant(reg, "nul-mediatype", mediaType=OLLAMA_MODEL + "\u0000/" + esc)
    layer_variant(reg, "long-mediatype", mediaType="a/" + "x" * (1 << 20))
    layer_variant(reg, "long-digest", digest="sha256:" + "a" * (1 << 20))
    layer_variant(reg, "sha512-digest", digest="sha512:" + "ab" * 64)
    layer_variant(reg, "short-digest", digest="sha256:abcd")
    layer_variant(reg, "nul-digest", digest="sha256:" + "a" * 31 + "\u0000" + "a" * 32)
    layer_variant(reg, "negative-size", size=-1)
    layer_variant(reg, "size-2p63", size=2 ** 63)
    layer_variant(reg, "size-2p64", size=2 ** 64)
    layer_variant(reg, "float-size", size=1.5)
    layer_variant(reg, "string-size", size="262144")
    m0, _ = good_manifest(reg, "zero-size")
    m0["layers"][0]["size"] = 0
    reg.manifests["zero-size"] = json.dumps(m0).encode()
    mc, _ = good_manifest(reg, "dotdot-config")
    mc["config"]["mediaType"] = "../" * 10 + CANARY
    mc["config"]["digest"] = "sha256:" + "../" * 20 + CANARY
    reg.manifests["dotdot-config"] = json.dumps(mc).encode()
    ml, _ = good_manifest(reg, "many-layers")
    one = ml["layers"][1]
    ml["layers"] = [one] * 100000
    reg.manifests["many-layers"] = json.dumps(ml, separators=(",", ":")).encode()
    m5, _ = good_manifest(reg, "layers-5000")
    m5["layers"] = [{"mediaType": "x", "digest": one["digest"], "size": 1}] * 5000
    reg.manifests["layers-5000"] = json.dumps(m5, separators=(",", ":")).encode()
    assert len(reg.manifests["layers-5000"]) < (4 << 20)

    # -- bodies and timing ----------------------------------------------------------------
    def huge(req):  # 100 MiB, announced
        chunk = b" " * (1 << 20)
        reg.stream(req, "huge-manifest", 200,
                   [("Content-Type", DOCKER_V2), ("Content-Length", str(100 << 20))],
                   (chunk for _ in range(100)))
    reg.manifests["huge-manifest"] = huge

    def endless(req):  # no length, never ends
        chunk = b"[" * (64 << 10)
        reg.stream(req, "endless-manifest", 200, [("Content-Type", DOCKER_V2)],
                   iter(lambda: chunk, None))
    reg.manifests["endless-manifest"] = endless

    def slowloris(req):
        body = reg.manifests["good"]
        reg.stream(req, "slowloris", 200,
                   [("Content-Type", DOCKER_V2), ("Content-Length", str(len(body)))],
                   (body[i:i + 1] for i in range(len(body))), delay=1.0)
    reg.manifests["slowloris"] = slowloris

    # -- redirects ------------------------------------------------------------------------
    def redirect_to(target):
        def h(req, *_):
            loc = target(req) if callable(target) else target
            req.send_response(302)
            req.send_header("Location", loc)
            req.send_header("Content-Length", "0")
            req.end_headers()
        return h

    reg.manifests["redirect-loop"] = redirect_to(lambda req: req.path)
    reg.manifests["redirect-file"] = redirect_to("file:///etc/passwd")
    reg.manifests["redirect-ftp"] = redirect_to("ftp://127.0.0.1:%d/x" % ftp.port)
    reg.manifests["redirect-gopher"] = redirect_to("gopher://127.0.0.1:%d/x" % other.port)
    reg.manifests["redirect-dict"] = redirect_to("dict://127.0.0.1:%d/x" % other.port)

    # -- blobs (valid manifest, hostile blob endpoint) -------------------------------------
    def blob_case(name, handler):
        m, model = good_manifest(reg, name, model_size=512 << 10)
        reg.manifests[name] = json.dumps(m).encode()
        model_digest = digest_of(model)

        def h(req, ref):
            if ref != model_digest:
                return reg.serve_blob(req, reg.blobs[ref])
            return handler(req, model)
        reg.blob_handlers[name] = h

    def cr_total_mismatch(req, data):
        s, e = reg.requested_range(req, len(data)) or (0, len(data) - 1)
        reg.reply(req, 206, data[s:e + 1],
                  headers=[("Content-Range", "bytes %d-%d/%d" % (s, e, len(data) + 4096))])
    blob_case("blob-range-total", cr_total_mismatch)

    def cr_wrong_start(req, data):
        s, e = reg.requested_range(req, len(data)) or (0, len(data) - 1)
        s2 = (s + 4096) % len(data)
        body = data[s2:s2 + (e - s + 1)]
        reg.reply(req, 206, body, headers=[
            ("Content-Range", "bytes %d-%d/%d" % (s2, s2 + len(body) - 1, len(data)))])
    blob_case("blob-range-start", cr_wrong_start)

    def longer(req, data):  # ignores Range: 200 with the blob plus 1 MiB of junk
        reg.reply(req, 200, data + b"\xee" * (1 << 20))
    blob_case("blob-longer", longer)

    def endless_blob(req, data):  # ignores Range: 200 with no length, never ends
        reg.stream(req, "blob-endless", 200, [("Content-Type", "application/octet-stream")],
                   iter(lambda: b"\xee" * (64 << 10), None))
    blob_case("blob-endless", endless_blob)

    blob_case("blob-redirect-file", lambda req, data: redirect_to("file:///etc/passwd")(req))
    blob_case("blob-redirect-loop", lambda req, data: redirect_to(req.path)(req))
    blob_case("blob-redirect-ftp",
              lambda req, data: redirect_to("ftp://127.0.0.1:%d/b" % ftp.port)(req))

    yield reg
    reg.stop()
    ftp.stop()
    other.stop()


@pytest.fixture(scope="module")
def hostile_mount(hostile, tmp_path_factory):
    """One daemon for every case (so each case also proves the daemon survived the previous)."""
    from conftest import Mount
    base = tmp_path_factory.mktemp("hostile")
    cache = base / "cache"
    cache.mkdir()
    mp_parent = base / "mnt-parent"
    mp_parent.mkdir()
    cwd_dir = base / "cwd"
    cwd_dir.mkdir()
    old = tempfile.tempdir
    tempfile.tempdir = str(mp_parent)  # Mount's mountpoint (and log dir) go in our own dir
    try:
        m = Mount(hostile.url, str(cache),
                  ["-o", "request_timeout=4s", "--stall-timeout", "2s", "--part-size", "128K",
                   "--concurrency", "4"])
    finally:
        tempfile.tempdir = old
    m.base, m.cache_path, m.mp_parent, m.cwd_dir = base, cache, mp_parent, cwd_dir
    with open("/etc/passwd", "rb") as f:
        m.passwd = f.read()
    yield m
    m.unmount()
    from conftest import assert_no_sanitizer_report
    assert_no_sanitizer_report(m)
    # Nothing escaped: no canary anywhere we can think of, /etc/passwd untouched, the mount's
    # parent holds only the mountpoint and the log dir.
    hits = subprocess.run(["find", "/tmp", "/work/main", str(base), "-maxdepth", "6", "-name",
                           "*%s*" % CANARY], capture_output=True, text=True).stdout
    assert hits.strip() == "", hits
    with open("/etc/passwd", "rb") as f:
        assert f.read() == m.passwd


def probe(path, read=True, timeout=60):
    """Lists (or reads) path in a child process, so a hang fails the test instead of
    blocking it. Returns ("ok", names or sha256) or ("err", errno)."""
    code = r"""
import hashlib, json, os, sys
p = sys.argv[1]
try:
    if sys.argv[2] == "read":
        with open(p, "rb") as f:
            data = f.read()
        print(json.dumps(["ok", hashlib.sha256(data).hexdigest(), len(data)]))
    else:
        print(json.dumps(["ok", sorted(os.listdir(p))]))
except OSError as e:
    print(json.dumps(["err", e.errno]))
"""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, path, "read" if read else "list"],
                       capture_output=True, text=True, timeout=timeout)
    out = json.loads(r.stdout)
    out.append(time.monotonic() - t0)
    return out


def assert_good_still_served(hostile, m):
    assert m.proc.poll() is None, "daemon died:\n" + m.log_text()[-3000:]
    r = probe(m.path("good:latest", "model.gguf"))
    assert r[0] == "ok" and r[1] == hashlib.sha256(hostile.good_model).hexdigest(), r


ALLOWED_NAMES = {"config.json", "manifest.json", "model.gguf", "template"}

MANIFEST_CASES = [
    "dotdot-digest", "slash-mediatype", "nul-mediatype", "long-mediatype", "long-digest",
    "sha512-digest", "short-digest", "nul-digest", "negative-size", "size-2p63", "size-2p64",
    "float-size", "string-size", "zero-size", "dotdot-config", "many-layers", "layers-5000",
    "huge-manifest", "endless-manifest", "slowloris", "redirect-loop", "redirect-file",
    "redirect-ftp", "redirect-gopher", "redirect-dict",
]


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_hostile_manifest(case, hostile, hostile_mount):
    m = hostile_mount
    r = probe(m.path(case + ":1"), read=False)
    assert r[-1] < 20, "%s took %.1fs" % (case, r[-1])
    if r[0] == "ok":
        # Only media types we know become files, under fixed names; nothing else shows.
        assert set(r[1]) <= ALLOWED_NAMES, r
        assert case in ("slash-mediatype", "nul-mediatype", "long-mediatype", "zero-size"), r
        if "model.gguf" in r[1]:
            rr = probe(m.path(case + ":1", "model.gguf"))
            # zero-size: an empty file (0 bytes served); never bytes beyond the manifest size.
            assert (rr[0] == "ok" and rr[2] == 0) or (rr[0] == "err" and rr[1] in ALLOWED_ERRNOS), rr
    else:
        assert r[1] in ALLOWED_ERRNOS, r
        assert case in m.log_text() or "library/" + case in m.log_text(), \
            "no log line names %s" % case
    if case == "huge-manifest":
        assert hostile.sent.get(case, 0) < (16 << 20), hostile.sent
    if case == "endless-manifest":
        assert hostile.sent.get(case, 0) < (16 << 20), hostile.sent
    if case == "redirect-loop":
        assert hostile.count(case) <= 40, hostile.count(case)
    if case.startswith("redirect-"):
        assert hostile.listeners["ftp"].connections == 0
        assert hostile.listeners["other"].connections == 0
    assert_good_still_served(hostile, m)


BLOB_CASES = ["blob-range-total", "blob-range-start", "blob-longer", "blob-endless",
              "blob-redirect-file", "blob-redirect-loop", "blob-redirect-ftp"]


@pytest.mark.parametrize("case", BLOB_CASES)
def test_hostile_blob(case, hostile, hostile_mount):
    m = hostile_mount
    names = probe(m.path(case + ":1"), read=False)
    assert names[0] == "ok" and "model.gguf" in names[1], names
    r = probe(m.path(case + ":1", "model.gguf"), timeout=120)
    good = hashlib.sha256(hashlib.sha256(case.encode()).digest() * ((512 << 10) // 32))
    digest = good.hexdigest()
    blob = os.path.join(m.cache_path, "blobs", "sha256-" + digest)
    if r[0] == "ok" and r[1] != digest:
        # Default verify mode serves bytes as they arrive (README: --verify); wrong bytes may
        # reach this first reader, but never more than the manifest size, the mismatch is
        # logged, nothing is committed, and from then on reads fail with EIO.
        assert r[2] == 512 << 10, r
        harness.wait_until(lambda: digest in m.log_text() and "mismatch" in m.log_text(), 30,
                           "the digest mismatch in the log")
        again = probe(m.path(case + ":1", "model.gguf"), timeout=120)
        assert again[0] == "err" and again[1] == errno.EIO, again
        assert not os.path.exists(blob)
    elif r[0] == "ok":
        # e.g. a 200 whose first `size` bytes are the blob: verified, so fine.
        assert r[2] == 512 << 10, r
    else:
        assert r[1] in ALLOWED_ERRNOS, r
        assert r[-1] < 90, "%s took %.1fs" % (case, r[-1])
    assert hostile.listeners["ftp"].connections == 0
    if case == "blob-redirect-loop":
        assert hostile.count(case) <= 200, hostile.count(case)
    if case == "blob-endless":
        assert hostile.sent.get(case, 0) < (256 << 20), hostile.sent
    # Nothing but cache files in the cache, and no stray blob named for the junk.
    for root, dirs, files in os.walk(m.cache_path):
        for f in files + dirs:
            assert CANARY not in f
            assert not os.path.islink(os.path.join(root, f)), os.path.join(root, f)
    assert_good_still_served(hostile, m)
