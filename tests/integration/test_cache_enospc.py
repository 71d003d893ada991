"""ENOSPC: a cache dir on a small tmpfs fills up; fetching pauses (log line, reader blocked),
then resumes when space frees (the tmpfs grows) and the blob commits with the right digest.

Needs root (mount -t tmpfs); skipped otherwise.
"""
import hashlib
import os
import subprocess
import threading

import pytest

import harness


@pytest.fixture
def small_tmpfs(tmp_path):
    d = tmp_path / "tmpfs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs: " + r.stderr.strip())
    yield str(d)
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_disk_full_pauses_then_completes(registry, workdir, small_tmpfs, mount):
    gguf = harness.make_gguf(os.path.join(workdir, "enospc.gguf"), 64, seed=5)
    harness.push_model(registry.url, "enospc:64m", {"model": gguf})
    want = harness.sha256_file(gguf)
    cache = os.path.join(small_tmpfs, "cache")
    m = mount(cache=cache, args=["--part-size", "4M", "--concurrency", "4"])
    path = m.path("enospc:64m", "model.gguf")

    result = {}

    def read_all():
        try:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
            result["sha"] = h.hexdigest()
        except OSError as e:
            result["error"] = e

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    harness.wait_until(lambda: "cache disk full" in m.log_text(), 60, "the disk-full log line")
    # Paused: the reader is blocked on bytes that cannot be written yet, nothing is committed.
    reader.join(1.0)
    assert reader.is_alive(), result
    assert not os.listdir(os.path.join(cache, "blobs"))
    subprocess.run(["mount", "-o", "remount,size=200m", small_tmpfs], check=True)
    reader.join(90)
    assert not reader.is_alive(), "the read did not finish after space was freed"
    assert result.get("sha") == want, result
    blob = os.path.join(cache, "blobs", "sha256-" + want)
    harness.wait_until(lambda: os.path.exists(blob), 30, "the committed blob")
    assert harness.sha256_file(blob) == want
    log = m.log_text()
    assert "fetching resumed" in log, log[-3000:]
    print("\n".join(l for l in log.splitlines() if "disk" in l or "verified" in l or "retrying" in l)[:3000])
