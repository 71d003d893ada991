"""Operating modelfs (issue 6): pull, status, xattrs, metrics, ls/rm/verify/gc, Ollama view.

Every wait is on a condition with a deadline (harness.wait_until); nothing sleeps and hopes.
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import urllib.request

import pytest

import harness
from conftest import MODELFS

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def disk_bytes(cache):
    """Bytes allocated to regular files under the cache (what rm/gc report as freed)."""
    total = 0
    for root, _, files in os.walk(cache):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def run(*args, timeout=60, **kw):
    return subprocess.run([MODELFS, *args], capture_output=True, text=True, timeout=timeout, **kw)


def model_digest(small_model):
    return sha256_file(small_model["files"]["model"])


def read_status(m):
    with open(m.path(".modelfs", "status")) as f:
        return json.load(f)


def blob_status(m, digest):
    for b in read_status(m)["blobs"]:
        if b["digest"] == "sha256:" + digest:
            return b
    return None


SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
                    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? '
                    r'(-?[0-9.]+(e[+-]?[0-9]+)?|[+-]Inf|NaN)$')


def parse_metrics(text):
    """Prometheus text format: every line a # HELP/# TYPE comment or a valid sample."""
    samples = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        assert SAMPLE.match(line), "not a valid sample: %r" % line
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
    return samples


def getfattr(path):
    r = subprocess.run(["getfattr", "-d", "-m", "-", "--absolute-names", path],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return dict(re.findall(r'^(user\.modelfs\.[a-z_]+)="(.*)"$', r.stdout, re.M))


@pytest.fixture
def capped(registry):
    """The session registry behind a 1 MB/s-per-connection nginx."""
    with harness.rate_limited_proxy(registry.url, rate="1m") as p:
        yield p


def test_status_metrics_and_xattrs_during_a_capped_download(small_model, capped, mount):
    port = harness.free_port()
    m = mount(registry_url=capped.url,
              args=["--part-size", "1M", "--concurrency", "2", "--metrics", "127.0.0.1:%d" % port])
    digest = model_digest(small_model)
    path = m.path("tiny:1b", "model.gguf")
    # Before any read: xattrs answer without fetching.
    x = getfattr(path)
    assert x["user.modelfs.digest"] == "sha256:" + digest
    assert x["user.modelfs.state"] == "missing" and x["user.modelfs.bytes_present"] == "0"
    before = parse_metrics(open(m.path(".modelfs", "metrics")).read())

    fd = os.open(path, os.O_RDONLY)  # opening materializes the blob in the background
    try:
        first = harness.wait_until(lambda: (blob_status(m, digest) or {}).get("bytes_present"),
                                   20, "first bytes in status")
        b = harness.wait_until(
            lambda: (lambda s: s if s and s["bytes_present"] > first and s["parts"]
                     else None)(blob_status(m, digest)), 20, "bytes rising with parts in flight")
        assert b["state"] == "fetching" and b["size"] == os.path.getsize(small_model["files"]["model"])
        assert b["hash_frontier"] <= b["bytes_present"] <= b["size"]
        for part in b["parts"]:
            assert 0 <= part["next"] <= part["end"] <= b["size"]
        assert "tiny:1b" in b["models"]
        harness.wait_until(lambda: blob_status(m, digest)["rate_bytes_per_s"] > 0, 10, "a rate")
        x = getfattr(path)
        assert x["user.modelfs.state"] == "fetching"
        human = run("status", m.dir)
        assert human.returncode == 0 and "fetching" in human.stdout and digest[:12] in human.stdout
        js = json.loads(run("status", "--json", m.dir).stdout)
        assert js["cache"]["dir"] == m.cache and js["cache"]["bytes_used"] > 0
        tail = b["size"] - 4096
        assert len(os.pread(fd, 4096, tail)) == 4096  # a demand read of (likely) missing bytes
        harness.wait_until(lambda: blob_status(m, digest)["state"] == "verified", 30, "verified")
    finally:
        os.close(fd)
    x = getfattr(path)
    assert x["user.modelfs.state"] == "verified"
    assert x["user.modelfs.bytes_present"] == x["user.modelfs.hash_frontier"] == str(b["size"])
    # Still shown after it completed and closed.
    assert blob_status(m, digest)["state"] == "verified"

    after = parse_metrics(open(m.path(".modelfs", "metrics")).read())
    origin = 'modelfs_fetch_bytes_total{source="origin"}'
    assert after[origin] >= before[origin] + b["size"]
    assert after["modelfs_fetch_requested_bytes_total"] > before["modelfs_fetch_requested_bytes_total"]
    assert after["modelfs_read_wait_seconds_count"] > before["modelfs_read_wait_seconds_count"]
    assert after['modelfs_read_wait_seconds_bucket{le="+Inf"}'] == \
        after["modelfs_read_wait_seconds_count"]
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        served = parse_metrics(r.read().decode())
    assert served[origin] >= after[origin]


def test_pull_then_mount_serves_with_registry_stopped(small_model, tmp_path, mount):
    reg = harness.Registry()
    try:
        harness.push_model(reg.url, "tiny:1b", small_model["files"])
        cache = str(tmp_path / "cache")
        r = run("pull", "--registry", reg.url, "--cache", cache, "tiny:1b")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        reg.stop()
    # Not a terminal: plain lines, no escapes or bars.
    out = r.stdout
    assert "\x1b" not in out and "▕" not in out
    digest = model_digest(small_model)
    assert "verified sha256:" + digest in out
    assert re.search(r"^success: tiny:1b$", out, re.M) and re.search(r"^pulled \d+ blobs", out, re.M)
    for line in out.splitlines():
        assert re.match(r"^(pulling|verified|success|pulled)\b", line), line
    m = mount(registry_url=reg.url, cache=cache)
    assert sha256_file(m.path("tiny:1b", "model.gguf")) == digest


def test_pull_on_a_terminal_draws_bars(small_model, registry, tmp_path):
    cache = str(tmp_path / "cache")
    cmd = "%s pull --registry %s --cache %s tiny:1b" % (MODELFS, registry.url, cache)
    r = subprocess.run(["script", "-q", "-e", "-c", cmd, "/dev/null"], capture_output=True,
                       timeout=60)
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0, out
    digest = model_digest(small_model)
    assert re.search(r"pulling %s: 100%% ▕█+▏" % digest[:12], out), out
    assert "\x1b[" in out  # redrawn in place
    assert "verified sha256:" + digest in out and "success: tiny:1b" in out


def test_interrupted_pull_leaves_a_partial_that_ls_shows_and_gc_drops(small_model, capped,
                                                                      tmp_path):
    cache = str(tmp_path / "cache")
    digest = model_digest(small_model)
    p = subprocess.Popen([MODELFS, "pull", "--registry", capped.url, "--cache", cache,
                          "--concurrency", "1", "--part-size", "1M", "tiny:1b"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = os.path.join(cache, "partial", "sha256-%s.state" % digest)
    try:
        harness.wait_until(lambda: p.poll() is not None or os.path.exists(state), 30,
                           "resume state saved")
        assert p.poll() is None, p.stdout.read()
    finally:
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=20)
    assert p.returncode == 130, out
    assert "interrupted" in out
    ls = run("ls", "--registry", capped.url, "--cache", cache)
    assert ls.returncode == 0, ls.stderr
    row = [l for l in ls.stdout.splitlines() if l.startswith(digest[:12])]
    assert row and re.search(r"partial \d+%", row[0]), ls.stdout
    assert "tiny:1b" in ls.stdout

    before = disk_bytes(cache)
    gc = run("gc", "--cache", cache, "--partial-age", "0s")
    assert gc.returncode == 0, gc.stderr
    freed = int(re.search(r"^freed (\d+) bytes", gc.stdout, re.M).group(1))
    assert freed > 0 and before - disk_bytes(cache) == freed
    assert not os.path.exists(os.path.join(cache, "partial", "sha256-" + digest))


def test_rm_and_gc_free_what_they_report_and_spare_open_blobs(small_model, registry, tmp_path,
                                                             mount):
    cache = str(tmp_path / "cache")
    assert run("pull", "--registry", registry.url, "--cache", cache, "tiny:1b").returncode == 0
    digest = model_digest(small_model)
    blob = os.path.join(cache, "blobs", "sha256-" + digest)
    # A mount with the model open: rm must not remove the open blob.
    m = mount(cache=cache)
    f = open(m.path("tiny:1b", "model.gguf"), "rb")
    try:
        f.read(1)
        r = run("gc", "--cache", cache, "--cache-max", "0")
        assert os.path.exists(blob), r.stdout
        assert "in use" in r.stdout
    finally:
        f.close()
        m.unmount()
    before = disk_bytes(cache)
    r = run("rm", "--registry", registry.url, "--cache", cache, "tiny:1b")
    assert r.returncode == 0, r.stdout + r.stderr
    freed = int(re.search(r"^freed (\d+) bytes", r.stdout, re.M).group(1))
    assert freed >= os.path.getsize(small_model["files"]["model"])
    assert before - disk_bytes(cache) == freed
    assert not os.path.exists(blob) and os.listdir(os.path.join(cache, "blobs")) == []

    assert run("pull", "--registry", registry.url, "--cache", cache, "tiny:1b").returncode == 0
    before = disk_bytes(cache)
    r = run("gc", "--cache", cache, "--cache-max", "1K")
    freed = int(re.search(r"^freed (\d+) bytes", r.stdout, re.M).group(1))
    assert freed > 0 and before - disk_bytes(cache) == freed and not os.path.exists(blob)


def test_verify_finds_and_removes_a_blob_corrupted_on_disk(small_model, registry, tmp_path):
    cache = str(tmp_path / "cache")
    assert run("pull", "--registry", registry.url, "--cache", cache, "tiny:1b").returncode == 0
    ok = run("verify", "--registry", registry.url, "--cache", cache)
    assert ok.returncode == 0 and " 0 bad" in ok.stdout, ok.stdout
    digest = model_digest(small_model)
    blob = os.path.join(cache, "blobs", "sha256-" + digest)
    with open(blob, "r+b") as f:
        f.seek(12345)
        c = f.read(1)
        f.seek(12345)
        f.write(bytes([c[0] ^ 0xFF]))
    r = run("verify", "--registry", registry.url, "--cache", cache, "tiny:1b")
    assert r.returncode == 1
    assert re.search(r"^BAD  sha256:%s: .*removed" % digest, r.stdout, re.M), r.stdout
    assert not os.path.exists(blob)


def test_ollama_view_matches_ollamas_layout(small_model, registry, mount):
    m = mount()
    os.stat(m.path("tiny:1b", "model.gguf"))  # resolves: the manifest is now in the cache
    host = registry.url.split("://", 1)[1]
    assert sorted(os.listdir(m.path(".ollama"))) == ["blobs", "manifests"]
    assert os.listdir(m.path(".ollama", "manifests")) == [host]
    assert os.listdir(m.path(".ollama", "manifests", host, "library", "tiny")) == ["1b"]
    req = urllib.request.Request(registry.url + "/v2/library/tiny/manifests/1b",
                                 headers={"Accept": DOCKER_V2})
    with urllib.request.urlopen(req) as r:
        registry_bytes = r.read()
    with open(m.path(".ollama", "manifests", host, "library", "tiny", "1b"), "rb") as f:
        assert f.read() == registry_bytes
    manifest = json.loads(registry_bytes)
    want = {d["digest"].replace(":", "-") for d in manifest["layers"] + [manifest["config"]]}
    assert set(os.listdir(m.path(".ollama", "blobs"))) == want
    digest = model_digest(small_model)
    assert sha256_file(m.path(".ollama", "blobs", "sha256-" + digest)) == digest
    # Bytes are served as they arrive; the digest is checked just after the last of them.
    harness.wait_until(
        lambda: getfattr(m.path(".ollama", "blobs", "sha256-" + digest))["user.modelfs.state"]
        == "verified", 20, "the blob read through .ollama verified")


def test_pull_waits_for_a_mount_fetching_the_same_blob(small_model, capped, mount, cache_dir):
    m = mount(registry_url=capped.url, args=["--part-size", "1M", "--concurrency", "2"])
    digest = model_digest(small_model)
    fd = os.open(m.path("tiny:1b", "model.gguf"), os.O_RDONLY)
    try:
        harness.wait_until(lambda: (blob_status(m, digest) or {}).get("bytes_present"), 20,
                           "the mount fetching")
        r = run("pull", "--registry", capped.url, "--cache", cache_dir, "tiny:1b")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verified sha256:" + digest in r.stdout
    finally:
        os.close(fd)
    served = sum(n for uri, status, n, _ in capped.access_log() if digest in uri)
    assert served <= os.path.getsize(small_model["files"]["model"]) * 1.05, served
