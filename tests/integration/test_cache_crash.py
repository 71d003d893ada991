"""Crash safety: kill -9 the daemon at random points while it materializes a 256 MiB blob served
through a rate-limited nginx, 20 times, remounting each time; the blob must then complete with
the right digest, having re-downloaded at most one part per connection in flight per kill
(nginx's access log counts the bytes served).
"""
import os
import random
import time

import harness

MiB = 1 << 20
PART = 4 * MiB
CONCURRENCY = 4
ROUNDS = 20


def test_kill_9_at_random_points_then_resume(registry, workdir, mount, tmp_path):
    gguf = harness.make_gguf(os.path.join(workdir, "crash.gguf"), 256, seed=12)
    harness.push_model(registry.url, "crash:256m", {"model": gguf})
    size = os.path.getsize(gguf)
    want = harness.sha256_file(gguf)
    cache = str(tmp_path / "cache")
    blob = os.path.join(cache, "blobs", "sha256-" + want)
    args = ["--part-size", "4M", "--concurrency", str(CONCURRENCY)]
    rng = random.Random(4)
    with harness.rate_limited_proxy(registry.url, rate="6m") as proxy:
        for i in range(ROUNDS):
            m = mount(registry_url=proxy.url, cache=cache, args=args)
            fd = os.open(m.path("crash:256m", "model.gguf"), os.O_RDONLY)  # materializes
            # A random kill point (not a wait for a condition): anywhere in the first ~0.5 s.
            time.sleep(rng.uniform(0.05, 0.5))
            m.proc.kill()
            m.proc.wait()
            m.unmount()  # fusermount3 -u -z
            try:
                os.close(fd)
            except OSError:
                pass
            assert not os.path.exists(blob), "committed after %d kills: make it slower" % i
        served_during_kills = sum(b for uri, _, b, _ in proxy.access_log() if "/blobs/" in uri)
        m = mount(registry_url=proxy.url, cache=cache, args=args)
        assert harness.sha256_file(m.path("crash:256m", "model.gguf")) == want
        harness.wait_until(lambda: os.path.exists(blob), 60, "the commit")
        assert harness.sha256_file(blob) == want
        served = sum(b for uri, _, b, _ in proxy.access_log() if "/blobs/" in uri)
    again = served - size
    print("\n%d kills: %d bytes served for a %d-byte blob (%d before the last mount), "
          "%d re-downloaded = %.1f MiB per kill (bound: %d parts of %d MiB in flight)"
          % (ROUNDS, served, size, served_during_kills, again, again / ROUNDS / MiB,
             CONCURRENCY, PART // MiB))
    assert served <= size + ROUNDS * CONCURRENCY * PART, m.log_text()[-3000:]
