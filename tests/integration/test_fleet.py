"""Scale-out (issue 8): four "nodes" (mounts with separate caches) read one model at the same
time through a pull-through registry mirror, an nginx slice cache, or a forward proxy; the
origin should serve each blob about once. Origin bytes are counted by an nginx in front of the
origin registry (its access log's $body_bytes_sent per blob URI).

Measured figures are printed (pytest -s) and written to $MODELFS_FLEET_RESULTS (default
/tmp/modelfs-fleet-results.json) for docs/fleet.md. $MODELFS_FLEET_ARGS adds mount flags
(e.g. "--log-level debug").
"""
import contextlib
import json
import os
import re
import shutil
import tempfile
import threading

import pytest

import harness
from conftest import Mount

MODEL = "fleet:1b"
SIZE_MIB = 64
NODES = 4
MiB = 1 << 20
# Lean runs on small machines: 8 MiB parts give 8 parts per blob (and tail splits).
# Concurrency 4: with 8 parts and more slots, tail splitting starts at once, and every split
# costs the bytes in flight past its cut (a socket buffer's worth), which a 64 MiB blob shows
# but a 40 GB one (hundreds of parts) does not.
NODE_ARGS = ["--part-size", "8M", "--concurrency", "4", "--verify", "strict",
             *os.environ.get("MODELFS_FLEET_ARGS", "").split()]
RESULTS = {}
RESULTS_PATH = os.environ.get("MODELFS_FLEET_RESULTS", "/tmp/modelfs-fleet-results.json")


def proxy_location(upstream):
    return f"""location / {{
      proxy_pass {upstream};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
      proxy_max_temp_file_size 0;
    }}"""


@contextlib.contextmanager
def slice_cache(upstream):
    """nginx caching blob range requests piecewise: 1 MiB slices, one upstream fetch per slice
    (proxy_cache_lock), keyed by URI and slice. Manifests (tags move) pass through."""
    server = f"""location / {{
      proxy_pass {upstream};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    location ~ /blobs/sha256: {{
      slice 1m;
      proxy_cache slices;
      proxy_cache_key $uri$slice_range;
      proxy_set_header Range $slice_range;
      proxy_cache_valid 200 206 1h;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 60s;
      proxy_cache_lock_age 60s;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass {upstream};
    }}"""
    # nginx workers drop root: the cache dir must be theirs to write (harness dirs are 0700).
    d = tempfile.mkdtemp(prefix="modelfs-slices-")
    os.chmod(d, 0o777)
    try:
        with harness.Nginx(server, f"proxy_cache_path {d} levels=1:2 keys_zone=slices:10m "
                                   "max_size=2g inactive=1h use_temp_path=off;") as n:
            yield n
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The origin registry with the model, behind a counting nginx."""
    d = tmp_path_factory.mktemp("fleet")
    with harness.Registry(str(d / "origin")) as origin:
        gguf = harness.make_gguf(str(d / "fleet.gguf"), SIZE_MIB, seed=8)
        pushed = harness.push_model(origin.url, MODEL, {"model": gguf})
        with harness.Nginx(proxy_location(origin.url)) as front:
            yield {"origin": origin, "front": front, "sha": harness.sha256_file(gguf),
                   "size": os.path.getsize(gguf), "dir": d,
                   "digest": pushed["layers"][0]["digest"]}
    with open(RESULTS_PATH, "w") as f:
        json.dump(RESULTS, f, indent=2, sort_keys=True)


def blob_bytes(nginx, digest, since=0):
    return sum(b for uri, _, b, _ in nginx.access_log()[since:] if digest in uri)


def run_nodes(fleet, name, registry_url, args=(), env=None, nodes=NODES):
    """Mounts `nodes` modelfs with separate caches, reads the model on all of them at once,
    checks every node's bytes; returns (origin bytes for the model blob, mounts' logs)."""
    front = fleet["front"]
    since = len(front.access_log())
    mounts = []
    try:
        for i in range(nodes):
            cache = fleet["dir"] / f"{name}-cache{i}"
            cache.mkdir()
            mounts.append(Mount(registry_url, str(cache), [*NODE_ARGS, *args], env))
        results = [None] * nodes

        def read(i):
            try:
                results[i] = harness.sha256_file(mounts[i].path(MODEL, "model.gguf"))
            except OSError as e:
                results[i] = e

        threads = [threading.Thread(target=read, args=(i,)) for i in range(nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        logs = [m.log_text() for m in mounts]
        for i, r in enumerate(results):
            assert r == fleet["sha"], f"node {i}: {r}\n{logs[i][-3000:]}"
    finally:
        for m in mounts:
            m.unmount()
    served = blob_bytes(front, fleet["digest"], since)
    requests = [(s, b, r) for u, s, b, r in front.access_log()[since:] if fleet["digest"] in u]
    RESULTS[name] = {"nodes": nodes, "blob_bytes": fleet["size"], "origin_bytes": served,
                     "ratio": round(served / fleet["size"], 3), "origin_requests": requests}
    print(f"\n{name}: origin served {served} bytes for a {fleet['size']}-byte blob to "
          f"{nodes} nodes ({served / fleet['size']:.2f}x)")
    return served, logs


def assert_aligned(nginx, digest, size, logs=()):
    """Every blob range modelfs asked for starts and ends on the 1 MiB grid (the one-byte
    resolve probe aside)."""
    for uri, _, _, rng in nginx.access_log():
        if digest not in uri or rng in ("", "-", "bytes=0-0"):
            continue
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
        assert m, rng
        begin, end = int(m.group(1)), int(m.group(2)) + 1
        assert begin % MiB == 0 and (end % MiB == 0 or end == size), rng + "\n" + "\n".join(
            line for log in logs for line in log.splitlines() if str(begin) in line)


def test_four_nodes_without_mirror_each_pull_from_origin(fleet):
    served, _ = run_nodes(fleet, "no_mirror", fleet["front"].url)
    assert served >= (NODES - 0.1) * fleet["size"]


def test_four_nodes_through_distribution_mirror_pull_once(fleet):
    with harness.Registry(proxy_remote_url=fleet["front"].url) as mirror:
        served, logs = run_nodes(fleet, "distribution_mirror", fleet["front"].url,
                                 ["--mirror", mirror.url])
        mirror_log = mirror.log_tail(40)
    assert served <= 1.5 * fleet["size"], mirror_log + "\n" + "\n".join(
        line for log in logs for line in log.splitlines() if "mirror" in line)
    assert any("is still pulling it" in log for log in logs)


def test_four_nodes_through_nginx_slice_cache_pull_once(fleet):
    with slice_cache(fleet["front"].url) as cache:
        # modelfs cannot tell a caching reverse proxy from a registry, so its ranges are not
        # aligned here; slice caching makes that harmless (nginx fetches whole slices).
        served, _ = run_nodes(fleet, "nginx_slice_reverse", cache.url)
    assert served <= 1.5 * fleet["size"]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_four_nodes_through_slice_cache_as_forward_proxy(fleet, how):
    # The http:// origin is requested in absolute form through nginx, which caches slices keyed
    # by path. HTTP_PROXY (uppercase: libcurl alone reads only http_proxy) or --proxy.
    with slice_cache(fleet["front"].url) as cache:
        env = {"NO_PROXY": "", "no_proxy": "", "http_proxy": "", "HTTP_PROXY": ""}
        args = []
        if how == "env":
            env["HTTP_PROXY"] = cache.url
        else:
            args = ["--proxy", cache.url]
        served, _ = run_nodes(fleet, "nginx_slice_forward_proxy_" + how, fleet["front"].url,
                              args, env=env)
        proxied = blob_bytes(cache, fleet["digest"])
        assert_aligned(cache, fleet["digest"], fleet["size"])
    assert proxied >= NODES * fleet["size"] * 0.9  # every node's bytes went through the proxy
    assert served <= 1.5 * fleet["size"]


def test_dead_and_failing_mirrors_fall_through_to_origin(fleet):
    dead = "http://127.0.0.1:%d" % harness.free_port()
    with harness.Nginx("location / { return 503; }") as failing:
        served, logs = run_nodes(fleet, "mirrors_down", fleet["front"].url,
                                 ["--mirror", dead, "--mirror", failing.url], nodes=2)
        # Remembered as down: one request, not one per blob or part.
        assert len(failing.access_log()) <= 2, failing.access_log()
    assert served >= 1.9 * fleet["size"]
    assert all("skipping it for" in log for log in logs)


def test_corrupt_blob_from_mirror_is_refetched_from_origin(fleet):
    digest, size = fleet["digest"], fleet["size"]
    with harness.Registry(proxy_remote_url=fleet["front"].url) as mirror:
        # Warm the mirror, then flip one byte in its stored copy.
        url = f"{mirror.url}/v2/library/fleet/blobs/{digest}"
        status, _, body = harness.http_get(url, timeout=120)
        assert status == 200 and len(body) == size
        path = mirror.blob_data_path(digest)
        harness.wait_until(lambda: os.path.exists(path) and os.path.getsize(path) == size, 60,
                           "the mirror to store the blob")
        with open(path, "r+b") as f:
            f.seek(size // 2 + 12345)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))
        status, _, piece = harness.http_get(url, {"Range": "bytes=%d-%d" % (size // 2 + 12345,
                                                                           size // 2 + 12345)})
        assert status == 206 and piece != b, "the mirror should serve the flipped byte"
        served, logs = run_nodes(fleet, "corrupt_mirror", fleet["front"].url,
                                 ["--mirror", mirror.url], nodes=1)
    assert "digest mismatch" in logs[0]
    # Repair re-fetches pieces (at most the whole blob) from the origin, never the mirror.
    assert 0 < served <= 1.5 * size
