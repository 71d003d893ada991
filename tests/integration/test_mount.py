"""The foundation path: mount a real registry and read its models as files (issue #2)."""
import errno
import hashlib
import json
import mmap
import os
import random
import subprocess
import threading
import urllib.request

import pytest

import harness
from conftest import MODELFS


def read_all(path):
    with open(path, "rb") as f:
        return f.read()


def test_model_directory_lists_layer_files_with_manifest_sizes(small_model, mount):
    m = mount()
    names = sorted(os.listdir(m.path("tiny:1b")))
    assert names == sorted(["config.json", "license", "manifest.json", "model.gguf", "params",
                            "system", "template"])
    for kind, src in small_model["files"].items():
        name = "model.gguf" if kind == "model" else kind
        assert os.stat(m.path("tiny:1b", name)).st_size == os.path.getsize(src)


def test_stat_does_not_fetch_the_blob(small_model, mount, cache_dir):
    m = mount()
    os.stat(m.path("tiny:1b", "model.gguf"))
    blobs = os.listdir(os.path.join(cache_dir, "blobs"))
    partial = os.listdir(os.path.join(cache_dir, "partial"))
    assert blobs == [] and partial == []


def test_full_read_matches_source_digest_and_commits_blob(small_model, mount, cache_dir):
    m = mount()
    src = small_model["files"]["model"]
    assert harness.sha256_file(m.path("tiny:1b", "model.gguf")) == harness.sha256_file(src)
    digest = harness.sha256_file(src)
    blob = os.path.join(cache_dir, "blobs", "sha256-" + digest)
    harness.wait_until(lambda: os.path.exists(blob), 20, "blob committed to the cache")
    assert harness.sha256_file(blob) == digest


def test_text_layers_and_manifest_are_the_registry_bytes(small_model, registry, mount):
    m = mount()
    for kind in ("template", "system", "params", "license"):
        assert read_all(m.path("tiny:1b", kind)) == read_all(small_model["files"][kind])
    req = urllib.request.Request(
        registry.url + "/v2/library/tiny/manifests/1b",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req) as r:
        assert read_all(m.path("tiny:1b", "manifest.json")) == r.read()
    config = json.loads(read_all(m.path("tiny:1b", "config.json")))
    assert config["model_format"] == "gguf"


def test_random_preads_match_source(small_model, mount):
    m = mount()
    src = read_all(small_model["files"]["model"])
    rng = random.Random(3)
    fd = os.open(m.path("tiny:1b", "model.gguf"), os.O_RDONLY)
    try:
        for _ in range(200):
            off = rng.randrange(0, len(src))
            n = rng.choice([1, 17, 4096, 65536, 1 << 20])
            assert os.pread(fd, n, off) == src[off:off + n]
        assert os.pread(fd, 100, len(src)) == b""
        assert os.pread(fd, 100, len(src) - 10) == src[-10:]
    finally:
        os.close(fd)


def test_mmap_read_matches_source(small_model, mount):
    m = mount()
    src = read_all(small_model["files"]["model"])
    with open(m.path("tiny:1b", "model.gguf"), "rb") as f:
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:4] == b"GGUF"
            assert hashlib.sha256(mm).digest() == hashlib.sha256(src).digest()


def test_concurrent_readers_share_one_download(small_model, mount, cache_dir):
    m = mount()
    src_digest = harness.sha256_file(small_model["files"]["model"])
    results = []

    def reader():
        results.append(harness.sha256_file(m.path("tiny:1b", "model.gguf")))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [src_digest] * 4
    harness.wait_until(
        lambda: os.listdir(os.path.join(cache_dir, "partial")) == [], 20, "partials cleaned up")
    assert "sha256-" + src_digest in os.listdir(os.path.join(cache_dir, "blobs"))


def test_unknown_model_is_enoent(small_model, mount):
    m = mount()
    for path in (m.path("nosuchmodel:latest"), m.path("nosuchmodel:1b", "model.gguf"),
                 m.path("tiny:1b", "projector.gguf"), m.path("nosuchns", "nosuch", "model.gguf"),
                 m.path("..bad"), m.path("bad name")):
        with pytest.raises(OSError) as e:
            os.stat(path)
        assert e.value.errno == errno.ENOENT, path


def test_name_forms_reach_the_same_model(small_model, registry, mount):
    harness.push_model(registry.url, "myteam/mymodel", small_model["files"])
    m = mount()
    want = os.stat(m.path("tiny:1b", "model.gguf")).st_size
    host = registry.url.split("://", 1)[1]
    for path in (m.path("library", "tiny:1b", "model.gguf"),
                 m.path("myteam", "mymodel", "model.gguf"),
                 m.path("myteam", "mymodel:latest", "model.gguf"),
                 m.path(host, "library", "tiny:1b", "model.gguf"),
                 m.path("TINY:1b", "model.gguf")):
        assert os.stat(path).st_size == want, path


def test_oci_manifest_and_index_formats(small_model, registry, mount):
    harness.push_model(registry.url, "ocimodel:v1", {"model": small_model["files"]["model"]},
                       fmt="oci")
    harness.push_model(registry.url, "indexed:v1", {"model": small_model["files"]["model"]},
                       fmt="oci-index")
    m = mount()
    digest = harness.sha256_file(small_model["files"]["model"])
    assert harness.sha256_file(m.path("ocimodel:v1", "model.gguf")) == digest
    assert harness.sha256_file(m.path("indexed:v1", "model.gguf")) == digest


def test_root_lists_models_read_before(small_model, registry, mount):
    harness.push_model(registry.url, "myteam/mymodel", small_model["files"])
    m = mount()
    os.stat(m.path("tiny:1b", "model.gguf"))
    os.stat(m.path("myteam", "mymodel", "model.gguf"))
    root = os.listdir(m.dir)
    assert "tiny:1b" in root and "myteam" in root
    assert "mymodel:latest" in os.listdir(m.path("myteam"))


def test_mount_is_read_only(small_model, mount):
    m = mount()
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError):
            os.open(m.path("tiny:1b", "model.gguf"), flags)
    with pytest.raises(OSError):
        os.mkdir(m.path("newdir"))
    st = os.stat(m.path("tiny:1b", "model.gguf"))
    assert st.st_mode & 0o777 == 0o444
    assert os.stat(m.path("tiny:1b")).st_mode & 0o777 == 0o555


def test_unmount_and_offline_remount_over_same_cache(small_model, workdir, mount, cache_dir):
    # A registry of its own, so stopping it does not disturb other tests.
    with harness.Registry(os.path.join(workdir, "registry-offline")) as reg:
        harness.push_model(reg.url, "tiny:1b", small_model["files"])
        m1 = mount(registry_url=reg.url)
        digest = harness.sha256_file(m1.path("tiny:1b", "model.gguf"))
        for name in os.listdir(m1.path("tiny:1b")):
            read_all(m1.path("tiny:1b", name))
        assert m1.unmount() == 0
    # The registry is gone: the second mount serves from the cache alone.
    m2 = mount(registry_url=reg.url)
    assert "tiny:1b" in os.listdir(m2.dir)
    assert harness.sha256_file(m2.path("tiny:1b", "model.gguf")) == digest
    assert read_all(m2.path("tiny:1b", "template")) == read_all(small_model["files"]["template"])


def test_sigterm_unmounts_cleanly(small_model, mount):
    m = mount()
    os.listdir(m.path("tiny:1b"))
    assert m.terminate() == 0
    assert os.stat(m.dir).st_dev == os.stat(os.path.dirname(m.dir)).st_dev


def corrupt_registry_blob(reg, digest, offset=1000):
    with open(reg.blob_data_path(digest), "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_registry_blob_gives_eio_and_logs_both_digests(small_model, workdir, mount):
    with harness.Registry(os.path.join(workdir, "registry-corrupt")) as reg:
        harness.push_model(reg.url, "bad:1", {"model": small_model["files"]["model"]})
        digest = harness.sha256_file(small_model["files"]["model"])
        corrupt_registry_blob(reg, digest)
        m = mount(registry_url=reg.url)
        # Default mode serves bytes as they arrive: the first pass may or may not see EIO,
        # depending on whether the digest is known before its last read.
        try:
            read_all(m.path("bad:1", "model.gguf"))
        except OSError as e:
            assert e.errno == errno.EIO
        # A mismatch is repaired first (every piece re-fetched once); the blob fails after.
        harness.wait_until(lambda: digest in m.log_text() and "discarding" in m.log_text(), 30,
                           "a log line naming the digests")
        # From the moment the blob is known bad, reads fail.
        with pytest.raises(OSError) as e:
            read_all(m.path("bad:1", "model.gguf"))
        assert e.value.errno == errno.EIO
        assert not os.path.exists(os.path.join(m.cache, "blobs", "sha256-" + digest))


def test_strict_mode_never_serves_an_unverified_byte(small_model, workdir, mount):
    with harness.Registry(os.path.join(workdir, "registry-strict")) as reg:
        harness.push_model(reg.url, "bad:1", {"model": small_model["files"]["model"]})
        harness.push_model(reg.url, "good:1", small_model["files"])
        corrupt_registry_blob(reg, harness.sha256_file(small_model["files"]["model"]),
                              offset=os.path.getsize(small_model["files"]["model"]) - 10)
        m = mount(registry_url=reg.url, args=("--verify", "strict"))
        fd = os.open(m.path("bad:1", "model.gguf"), os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, 0)  # the first bytes are fine, but unverified
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert read_all(m.path("good:1", "template")) == read_all(small_model["files"]["template"])


def test_bad_command_lines_exit_2():
    for args in (["mount"], ["mount", "/tmp", "--concurrency", "abc"],
                 ["mount", "/tmp", "-o", "nosuchoption=1"], ["frobnicate"],
                 ["mount", "/tmp", "--registry", "ftp://x"]):
        r = subprocess.run([MODELFS, *args], capture_output=True)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr, args
    r = subprocess.run([MODELFS, "mount", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--part-size" in r.stdout


def test_mount_helper_via_mount_t(small_model, registry, cache_dir, tmp_path):
    if not os.path.exists("/sbin/mount.modelfs"):
        pytest.skip("mount.modelfs is not installed (cmake --install)")
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = subprocess.run(["mount", "-t", "modelfs", registry.url, str(mp), "-o",
                        f"cache={cache_dir},log_level=warn"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        harness.wait_until(lambda: os.path.ismount(str(mp)), 10, "mounted")
        want = harness.sha256_file(small_model["files"]["model"])
        assert harness.sha256_file(str(mp / "tiny:1b" / "model.gguf")) == want
    finally:
        subprocess.run(["umount", str(mp)])
