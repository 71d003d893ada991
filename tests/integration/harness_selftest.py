#!/usr/bin/env python3
"""harness_selftest.py: proves the integration harness and scripts/ tooling work on this machine.

Usage:
  python3 tests/integration/harness_selftest.py [--quick] [--skip-llama]

  --quick       skip the 300 MiB push and the 1 GiB generation timing
  --skip-llama  skip node-llama-cpp (scripts/llama/install not run)

Checks, in order: make-gguf is deterministic; a registry starts (and a broken one fails fast
with its log); push-model works for docker, oci and oci-index (manifests fetched back with
urllib: Content-Type, Docker-Content-Digest, body hash, layer and config blobs, Range 206);
re-push skips existing blobs; basic auth and Bearer token auth pushes; a registry with a CDN; a
ChunksumsFront (a push and pulls through it, chunksums answers, 401/502 relayed) and FaultyCdn
(flip, duplicate count, holds); a pull-through proxy; a 300 MiB push; and the
GGUF, also as fetched back from the registry, loads in node-llama-cpp with identical output
twice. Prints one line per check with timings; exits 1 on the first failure.
Not a pytest file on purpose (no pytest dependency); pytest tests import harness.py directly.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

MT = {
    "docker": "application/vnd.docker.distribution.manifest.v2+json",
    "docker_config": "application/vnd.docker.container.image.v1+json",
    "oci": "application/vnd.oci.image.manifest.v1+json",
    "oci_config": "application/vnd.oci.image.config.v1+json",
    "index": "application/vnd.oci.image.index.v1+json",
}
ACCEPT_ALL = ", ".join([MT["docker"], MT["oci"], MT["index"]])


def check(cond, what):
    if not cond:
        raise AssertionError(what)


class Step:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb):
        dt = time.monotonic() - self.t0
        status = "ok" if exc_type is None else "FAIL"
        print("%-4s %-62s %7.2fs" % (status, self.name, dt), flush=True)
        return False


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def get_manifest(reg, repo, ref, accept=ACCEPT_ALL):
    status, headers, body = harness.http_get(
        "%s/v2/%s/manifests/%s" % (reg.url, repo, ref), {"Accept": accept})
    check(status == 200, "GET manifest %s:%s -> %d %s" % (repo, ref, status, body[:200]))
    return headers, body


def verify_pushed(reg, res, fmt, files):
    repo, tag = res["repository"], res["tag"]
    headers, body = get_manifest(reg, repo, tag)
    want_tag_type = {"docker": MT["docker"], "oci": MT["oci"], "oci-index": MT["index"]}[fmt]
    check(headers["Content-Type"] == want_tag_type,
          "%s: Content-Type %s" % (fmt, headers["Content-Type"]))
    check(headers["Docker-Content-Digest"] == res["tag_digest"] == sha(body),
          "%s: tag digest mismatch" % fmt)
    if fmt == "oci-index":
        index = json.loads(body)
        check(index["mediaType"] == MT["index"], "index mediaType")
        plats = [(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]]
        check(plats == [("linux", "amd64"), ("linux", "arm64")], "index platforms %s" % plats)
        check(index["manifests"][0]["digest"] == res["manifest_digest"], "index -> manifest")
        for m in index["manifests"]:  # every child fetchable by digest
            h, b = get_manifest(reg, repo, m["digest"])
            check(h["Content-Type"] == MT["oci"] and sha(b) == m["digest"]
                  and len(b) == m["size"], "child manifest %s" % m["digest"])
        headers, body = get_manifest(reg, repo, res["manifest_digest"])
    manifest = json.loads(body)
    oci = fmt != "docker"
    check(manifest["mediaType"] == (MT["oci"] if oci else MT["docker"]), "manifest mediaType")
    check(manifest["config"]["mediaType"] == (MT["oci_config"] if oci else MT["docker_config"]),
          "config mediaType")
    check(sha(body) == res["manifest_digest"], "manifest digest")
    kinds = [l["mediaType"].rsplit(".", 1)[1] for l in manifest["layers"]]
    check(kinds == list(files), "layer kinds %s != %s" % (kinds, list(files)))
    for layer, (kind, path) in zip(manifest["layers"], files.items()):
        with open(path, "rb") as f:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        check(layer["digest"] == "sha256:" + h.hexdigest(), "%s digest" % kind)
        check(layer["size"] == os.path.getsize(path), "%s size" % kind)
    status, _, cfg = harness.http_get("%s/v2/%s/blobs/%s" % (reg.url, repo,
                                                            manifest["config"]["digest"]))
    cfg_json = json.loads(cfg)
    check(status == 200 and sha(cfg) == manifest["config"]["digest"], "config blob")
    check(cfg_json["model_format"] == "gguf" and cfg_json["model_family"] == "llama"
          and cfg_json["os"] == "linux" and cfg_json["architecture"] == "amd64"
          and cfg_json["rootfs"]["diff_ids"] == [l["digest"] for l in manifest["layers"]],
          "config fields %s" % cfg_json)
    model = manifest["layers"][0]
    status, h, part = harness.http_get("%s/v2/%s/blobs/%s" % (reg.url, repo, model["digest"]),
                                       {"Range": "bytes=0-99"})
    check(status == 206 and len(part) == 100 and part[:4] == b"GGUF"
          and h["Content-Range"] == "bytes 0-99/%d" % model["size"], "Range 206 (%d)" % status)
    return manifest


def main():
    quick = "--quick" in sys.argv
    skip_llama = "--skip-llama" in sys.argv
    work = tempfile.mkdtemp(prefix="modelfs-selftest-")
    script = os.path.join(harness.SCRIPTS, "make-gguf")

    with Step("make-gguf 8 MiB twice, byte-identical; other seed differs"):
        a, b, c = (os.path.join(work, n) for n in ("a.gguf", "b.gguf", "c.gguf"))
        for path, seed in ((a, 5), (b, 5), (c, 6)):
            subprocess.run([sys.executable, script, "--size-mib", "8", "--seed", str(seed), path],
                           check=True, capture_output=True)
        da, db, dc = (hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (a, b, c))
        check(da == db and da != dc, "determinism")
        size = os.path.getsize(a)
        check(abs(size - (8 << 20)) < (8 << 20) * 0.1, "8 MiB target gave %d bytes" % size)

    with Step("make_gguf() cache returns the same file"):
        g1 = harness.make_gguf(size_mib=8, seed=1)
        mtime = os.stat(g1).st_mtime_ns
        check(harness.make_gguf(size_mib=8, seed=1) == g1
              and os.stat(g1).st_mtime_ns == mtime, "cache")

    with Step("wait_until times out with the description"):
        try:
            harness.wait_until(lambda: False, 0.2, "nothing")
            check(False, "no timeout")
        except TimeoutError as e:
            check("nothing" in str(e), str(e))

    with Step("broken registry config fails fast with the log tail"):
        try:
            harness.Registry(extra_config="bogus_top_level_key: [\n", start_timeout=10)
            check(False, "registry started with a broken config")
        except RuntimeError as e:
            check("exited" in str(e), str(e))

    with Step("registry starts; /v2/ answers 200") as st:
        reg = harness.Registry()
        check(harness.http_get(reg.url + "/v2/")[0] == 200, "/v2/")
    try:
        template = os.path.join(work, "template")
        with open(template, "w") as f:
            f.write("{{ .Prompt }}")
        params = os.path.join(work, "params")
        with open(params, "w") as f:
            f.write('{"temperature": 0}')
        files = {"model": g1, "template": template, "params": params}
        for fmt in ("docker", "oci", "oci-index"):
            with Step("push + verify --format %s" % fmt):
                res = harness.push_model(reg.url, "selftest/m-%s:v1" % fmt, files, fmt=fmt)
                verify_pushed(reg, res, fmt, files)

        with Step("OCI manifest is 404 to a docker-only Accept (registry 2.8)"):
            status, _, body = harness.http_get(reg.url + "/v2/selftest/m-oci/manifests/v1",
                                               {"Accept": MT["docker"]})
            check(status == 404 and b"OCI manifest found" in body, "%d %s" % (status, body))

        with Step("re-push skips existing blobs (HEAD 200)"):
            res = harness.push_model(reg.url, "selftest/m-docker:v2", files)
            check(not any(l["uploaded"] for l in res["layers"]), "re-uploaded")

        if not quick:
            with Step("make-gguf 300 MiB (cached after the first run)"):
                big = harness.make_gguf(size_mib=300, seed=2)
            with Step("push 300 MiB model") as st:
                res = harness.push_model(reg.url, "selftest/big:300m", {"model": big})
                verify_pushed(reg, res, "docker", {"model": big})
            check(time.monotonic() - st.t0 < 60, "300 MiB push took too long")

        if not skip_llama:
            small = harness.make_gguf(size_mib=64, seed=1)
            res = harness.push_model(reg.url, "selftest/llama:64m", {"model": small})
            fetched = os.path.join(work, "fetched.gguf")
            with Step("blob fetched back from the registry is identical"):
                status, _, body = harness.http_get("%s/v2/selftest/llama/blobs/%s" % (
                    reg.url, res["layers"][0]["digest"]), timeout=120)
                check(status == 200, "blob GET %d" % status)
                with open(fetched, "wb") as f:
                    f.write(body)
                check(sha(body) == res["layers"][0]["digest"], "fetched digest")
            with Step("node-llama-cpp: load + 16 tokens, twice, identical"):
                r1 = harness.run_llama(fetched)
                r2 = harness.run_llama(fetched)
                check(r1["tokens"] == r2["tokens"] and r1["text"] == r2["text"],
                      "nondeterministic: %s vs %s" % (r1, r2))
                check(len(r1["tokens"]) == 16, "token count")
                print("     llama: %s" % json.dumps(r1)[:200])
    finally:
        reg.stop()
    check(reg.process is None and not os.path.exists(reg.dir), "registry cleanup")

    with Step("basic auth (htpasswd) push; wrong password fails"):
        with harness.Registry(htpasswd={"alice": "s3cret"}) as areg:
            check(harness.http_get(areg.url + "/v2/")[0] == 401, "no 401 without creds")
            res = harness.push_model(areg.url, "a/b:c", {"model": g1}, user="alice",
                                     password="s3cret")
            check(res["manifest_digest"].startswith("sha256:"), "push")
            try:
                harness.push_model(areg.url, "a/b:d", {"model": g1}, user="alice",
                                   password="wrong")
                check(False, "pushed with a wrong password")
            except RuntimeError as e:
                check("401" in str(e), str(e))

    with Step("Bearer token auth push (oci-index); anonymous refused"):
        with harness.TokenServer(users={"bob": "pw"}) as ts, \
                harness.Registry(token_auth=ts) as treg:
            res = harness.push_model(treg.url, "bob/model:x", {"model": g1}, fmt="oci-index",
                                     user="bob", password="pw")
            check(any("push" in s for _, scopes in ts.requests for s in scopes), ts.requests)
            try:
                harness.push_model(treg.url, "bob/model:y", {"model": g1})
                check(False, "anonymous push accepted")
            except RuntimeError as e:
                check("401" in str(e), str(e))

    with Step("cdn=True: blob GET is 307 to the CDN; Range 206 there; faults"):
        with harness.Registry(cdn=True) as creg:
            res = harness.push_model(creg.url, "cdn/m:1", {"model": g1})
            url = "%s/v2/cdn/m/blobs/%s" % (creg.url, res["layers"][0]["digest"])
            status, h, _ = harness.http_get(url, {"Range": "bytes=0-99"})
            check(status == 307 and h["Location"].startswith(creg.cdn.url), "no 307: %d" % status)
            location = h["Location"]
            status, h, part = harness.http_get(location, {"Range": "bytes=0-99"})
            check(status == 206 and part[:4] == b"GGUF" and len(part) == 100, "CDN range")
            creg.cdn.inject(status=503)
            check(harness.http_get(location)[0] == 503, "injected 503")
            check(harness.http_get(location)[0] == 200, "fault used once")
            again = harness.push_model(creg.url, "cdn/m:2", {"model": g1})
            check(not again["layers"][0]["uploaded"], "HEAD 307 must count as present")

    with Step("ChunksumsFront: registry API relayed as is; chunksums served"):
        with harness.Registry(cdn=True) as creg, harness.ChunksumsFront(creg.url) as front:
            # A push through the front: POST/PATCH/PUT with bodies, Location headers, HEADs.
            res = harness.push_model(front.url, "cs/m:1", {"model": g1})
            digest = res["layers"][0]["digest"]
            for ref in ("1", res["manifest_digest"]):
                direct = get_manifest(creg, "cs/m", ref)
                via = get_manifest(front, "cs/m", ref)
                check(via[1] == direct[1], "manifest body differs through the front")
                for k in ("Content-Type", "Docker-Content-Digest", "Content-Length", "Etag"):
                    check(via[0][k] == direct[0][k], "manifest %s: %s != %s"
                          % (k, via[0][k], direct[0][k]))
            blob_path = "/v2/cs/m/blobs/%s" % digest
            direct = harness.http_get(creg.url + blob_path, {"Range": "bytes=0-99"})
            via = harness.http_get(front.url + blob_path, {"Range": "bytes=0-99"})
            check(via[0] == direct[0] == 307 and via[0] == 307
                  and via[1]["Location"] == direct[1]["Location"]
                  and via[1]["Location"].startswith(creg.cdn.url), "307 through the front")
            seen = front.requests[-1]
            check(seen.method == "GET" and seen.path == blob_path
                  and seen.header("Range") == "bytes=0-99" and seen.status == 307, seen)
            status, h, part = harness.http_get(via[1]["Location"], {"Range": "bytes=10-19"})
            check(status == 206 and part == open(g1, "rb").read()[10:20]
                  and h["Content-Range"] == "bytes 10-19/%d" % os.path.getsize(g1), "CDN 206")
            # Not set: relayed, and distribution has no such route.
            cs_path = "/v2/cs/m/chunksums/%s" % digest
            check(harness.http_get(front.url + cs_path)[0] == 404, "unset chunksums not 404")
            text = harness.chunksums_text(g1, 3 << 20)
            front.set_chunksums(digest, text)
            status, h, body = harness.http_get(front.url + cs_path)
            lines = body.decode().splitlines()
            check(status == 200 and body.decode() == text and len(lines) == 3
                  and lines[0] == "sha256:%s 0-%d" % (
                      hashlib.sha256(open(g1, "rb").read()[:3 << 20]).hexdigest(), (3 << 20) - 1)
                  and lines[-1].endswith("-%d" % (os.path.getsize(g1) - 1)), body[:300])
            front.set_chunksums(digest, "garbage", status=500)
            status, _, body = harness.http_get(front.url + cs_path)
            check(status == 500 and body == b"garbage", "injected 500")
            check(len(front.chunksums_requests(digest)) == 3
                  and front.chunksums_requests()[0].repo == "cs/m", front.chunksums_requests())
            # HEAD keeps Content-Length and sends no body; a chunked upstream reply is re-chunked
            # (distribution's 404 bodies have a length; the manifest PUT above got 201).
            import http.client
            c = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
            c.request("HEAD", "/v2/cs/m/manifests/1", headers={"Accept": ACCEPT_ALL})
            r = c.getresponse()
            check(r.status == 200 and int(r.getheader("Content-Length")) > 0
                  and r.read() == b"", "HEAD through the front")
            c.request("GET", "/v2/cs/m/manifests/1", headers={"Accept": ACCEPT_ALL})
            r = c.getresponse()  # same keep-alive connection after the HEAD
            check(r.status == 200 and sha(r.read()) == res["tag_digest"], "keep-alive reuse")
            c.close()
        with harness.Registry(htpasswd={"alice": "s3cret"}) as areg, \
                harness.ChunksumsFront(areg.url) as front:
            status, h, _ = harness.http_get(front.url + "/v2/")
            check(status == 401 and "Basic" in h["WWW-Authenticate"], "401 challenge relayed")
            auth = "Basic " + base64.b64encode(b"alice:s3cret").decode()
            check(harness.http_get(front.url + "/v2/", {"Authorization": auth})[0] == 200,
                  "Authorization relayed")
        dead = harness.ChunksumsFront("http://127.0.0.1:%d" % harness.free_port())
        try:
            check(harness.http_get(dead.url + "/v2/")[0] == 502, "dead upstream -> 502")
        finally:
            dead.stop()

    with Step("FaultyCdn: one flip, duplicates counted, holds until release"):
        import threading
        with harness.Registry(cdn=True) as creg:
            res = harness.push_model(creg.url, "fc/m:1", {"model": g1})
            cdn = harness.FaultyCdn(creg.cdn)
            loc = harness.http_get("%s/v2/fc/m/blobs/%s" % (creg.url, res["layers"][0]["digest"])
                                   )[1]["Location"]
            data = open(g1, "rb").read()
            cdn.arm(1000)
            _, _, b = harness.http_get(loc, {"Range": "bytes=0-4095"})
            check(len(b) == 4096 and b[1000] == data[1000] ^ 1 and b[:1000] == data[:1000],
                  "flip")
            _, _, b = harness.http_get(loc, {"Range": "bytes=0-4095"})
            check(b == data[:4096] and cdn.sent == 8192 and cdn.duplicate == 4096, "once")
            cdn.hold(1 << 20, (2 << 20) - 1)
            got = {}
            t = threading.Thread(target=lambda: got.update(
                r=harness.http_get(loc, {"Range": "bytes=%d-%d" % (1 << 20, (1 << 20) + 9)})))
            t.start()
            harness.wait_until(lambda: cdn.waiting == 1, 10, "the request to be held")
            check(harness.http_get(loc, {"Range": "bytes=0-9"})[2] == data[:10], "not held")
            check(t.is_alive() and cdn.holding(), "released early")
            cdn.release()
            t.join(10)
            check(got["r"][2] == data[1 << 20:(1 << 20) + 10] and not cdn.holding(), "held")
            check([r.held for r in cdn.requests] == [False, False, True, False], cdn.requests)
            cdn.hold(0, 8191, within=True, refetch_only=True)  # 4096-4199 were never served
            check(harness.http_get(loc, {"Range": "bytes=4000-4199"})[2] == data[4000:4200]
                  and harness.http_get(loc, {"Range": "bytes=0-9999"})[2] == data[:10000],
                  "held a first fetch, or a range not within")
            t = threading.Thread(target=lambda: got.update(
                r=harness.http_get(loc, {"Range": "bytes=100-199"})))
            t.start()
            harness.wait_until(lambda: cdn.waiting == 1, 10, "the re-fetch to be held")
            cdn.release()
            t.join(10)
            check(got["r"][2] == data[100:200]
                  and [r.held for r in cdn.requests][-3:] == [False, False, True], cdn.requests)

    with Step("pull-through proxy: manifests and blobs via the proxy"):
        with harness.Registry() as up:
            res = harness.push_model(up.url, "px/m:1", {"model": g1}, fmt="oci-index")
            with harness.Registry(proxy_remote_url=up.url) as px:
                h, body = get_manifest(px, "px/m", "1")
                check(h["Content-Type"] == MT["index"] and sha(body) == res["tag_digest"],
                      "proxied index")
                url = "%s/v2/px/m/blobs/%s" % (px.url, res["layers"][0]["digest"])
                cold = harness.http_get(url, {"Range": "bytes=0-99"})[0]
                harness.wait_until(
                    lambda: harness.http_get(url, {"Range": "bytes=0-99"})[0] == 206, 10,
                    "proxy to answer Range with 206 once the blob is cached")
                print("     proxy: cold Range GET -> %d (200 = whole blob, Range ignored)" % cold)

    if not quick:
        with Step("make-gguf 1 GiB (timing only; uncached)"):
            path = os.path.join(work, "1g.gguf")
            subprocess.run([sys.executable, script, "--size-mib", "1024", "--seed", "9", path],
                           check=True, capture_output=True)
            os.unlink(path)

    subprocess.run(["rm", "-rf", work])
    print("all harness self-checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("FAILED: %s" % e, file=sys.stderr)
        sys.exit(1)
