"""The read path (issue #5): reads wait only for their own bytes; parked reads never hang."""
import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading

import pytest

import harness


def digest_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512 if os.path.exists(path) else 0


def in_syscall(tid):
    """True while thread tid of this process is blocked in a system call (not running Python)."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split()[0] not in ("running", "-1")
    except OSError:
        return False


@pytest.fixture(scope="module")
def big_model(registry, workdir):
    """library/big:1g — a 1 GiB GGUF."""
    path = harness.make_gguf(os.path.join(workdir, "big.gguf"), 1024, seed=11)
    harness.push_model(registry.url, "big:1g", {"model": path})
    return path


@pytest.fixture(scope="module")
def mid_model(registry, workdir):
    """library/mid:256m — a 256 MiB GGUF."""
    path = harness.make_gguf(os.path.join(workdir, "mid.gguf"), 256, seed=12)
    harness.push_model(registry.url, "mid:256m", {"model": path})
    return path


def test_4k_read_near_the_end_of_a_cold_1gib_blob_needs_only_its_bytes(big_model, registry,
                                                                      mount, cache_dir):
    size = os.path.getsize(big_model)
    with harness.rate_limited_proxy(registry.url, rate="4m") as proxy:
        m = mount(registry_url=proxy.url, args=("--part-size", "16M", "--concurrency", "4"))
        with open(big_model, "rb") as f:
            f.seek(size - 8192)
            want = f.read(4096)
        fd = os.open(m.path("big:1g", "model.gguf"), os.O_RDONLY)
        try:
            got = os.pread(fd, 4096, size - 8192)
            present = sum(allocated_bytes(os.path.join(cache_dir, "partial", n))
                          for n in os.listdir(os.path.join(cache_dir, "partial")))
        finally:
            os.close(fd)
        assert got == want
        # Four 4 MB/s connections bring in well under a quarter of the blob in the time a
        # demand window takes; the read must not have waited for the parts before it.
        assert present < size // 4, f"{present} of {size} bytes present when the read returned"


def test_64_threads_and_8_mmap_processes_on_a_cold_blob(mid_model, registry, mount):
    with harness.rate_limited_proxy(registry.url, rate="8m") as proxy:
        m = mount(registry_url=proxy.url, args=("--part-size", "8M", "--concurrency", "8"))
        path = m.path("mid:256m", "model.gguf")
        with open(mid_model, "rb") as f:
            src = f.read()
        errors = []

        def reader(seed):
            rng = random.Random(seed)
            fd = os.open(path, os.O_RDONLY)
            try:
                for _ in range(8):
                    off = rng.randrange(0, len(src))
                    n = rng.choice([4096, 65536, 1 << 20])
                    if os.pread(fd, n, off) != src[off:off + n]:
                        errors.append((seed, off, n))
            except OSError as e:
                errors.append((seed, repr(e)))
            finally:
                os.close(fd)

        # Each process maps the file and checks pages spread over it against the source.
        check = (
            "import mmap,sys,random,hashlib\n"
            "p,src,seed=sys.argv[1],sys.argv[2],int(sys.argv[3])\n"
            "a=open(p,'rb'); b=open(src,'rb')\n"
            "m=mmap.mmap(a.fileno(),0,prot=mmap.PROT_READ)\n"
            "n=mmap.mmap(b.fileno(),0,prot=mmap.PROT_READ)\n"
            "r=random.Random(seed)\n"
            "for _ in range(64):\n"
            "  o=r.randrange(0,len(n)-4096)\n"
            "  assert m[o:o+4096]==n[o:o+4096], o\n")
        procs = [subprocess.Popen([sys.executable, "-c", check, path, mid_model, str(i)])
                 for i in range(8)]
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert not any(t.is_alive() for t in threads), "a reader hung"
        assert [p.wait(timeout=240) for p in procs] == [0] * 8
        assert errors == []
        assert digest_of(path) == hashlib.sha256(src).hexdigest()


def test_unmount_during_pending_reads_returns_eio(mid_model, registry, mount):
    # Blob bodies at one byte per second: nothing a reader asks for arrives before the unmount.
    server = f"""
    location ~ /blobs/ {{ proxy_pass {registry.url}; limit_rate 1; proxy_max_temp_file_size 0; }}
    location / {{ proxy_pass {registry.url}; }}"""
    with harness.Nginx(server) as proxy:
        m = mount(registry_url=proxy.url, args=("--concurrency", "2", "--lazy"))
        path = m.path("mid:256m", "model.gguf")
        os.stat(path)
        results = {}
        tids = []

        def reader(off):
            tids.append(threading.get_native_id())
            try:
                with open(path, "rb") as f:
                    f.seek(off)
                    results[off] = f.read(4096)
            except OSError as e:
                results[off] = e.errno

        offsets = [i * (64 << 20) + 12345 for i in range(4)]
        threads = [threading.Thread(target=reader, args=(o,)) for o in offsets]
        for t in threads:
            t.start()
        harness.wait_until(lambda: len(tids) == 4 and all(in_syscall(t) for t in tids), 20,
                           "all readers blocked in read()")
        m.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a parked read hung after unmount"
        assert results == {o: errno.EIO for o in offsets}
        assert m.proc.wait(timeout=30) == 0


def test_lazy_mount_fetches_only_what_is_read(mid_model, registry, mount, cache_dir):
    m = mount(args=("--lazy",))
    path = m.path("mid:256m", "model.gguf")
    with open(path, "rb") as f:
        f.seek(100 << 20)
        chunk = f.read(4096)
    with open(mid_model, "rb") as f:
        f.seek(100 << 20)
        assert chunk == f.read(4096)
    partial = [os.path.join(cache_dir, "partial", n)
               for n in os.listdir(os.path.join(cache_dir, "partial")) if ".state" not in n]
    assert len(partial) == 1
    # Only the read's neighbourhood (an aligned window, plus kernel readahead) is fetched.
    assert allocated_bytes(partial[0]) <= 16 << 20
