"""pytest fixtures for modelfs integration tests: a real registry, real mounts.

Every test mounts a real modelfs (in the foreground, as a child process) over a real
docker-registry on a loopback port, and always unmounts in teardown.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("MODELFS_BUILD", os.path.join(ROOT, "build"))
MODELFS = os.environ.get("MODELFS_BIN", os.path.join(BUILD, "tools", "modelfs"))


class Mount:
    """A running `modelfs mount -f` and its mountpoint."""

    def __init__(self, registry_url, cache_dir, extra_args=(), env=None):
        self.dir = tempfile.mkdtemp(prefix="modelfs-mnt-")
        self.cache = cache_dir
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="modelfs-log-"), "modelfs.log")
        self.log = open(self.log_path, "wb")
        cmd = [MODELFS, "mount", "-f", "--registry", registry_url, "--cache", cache_dir,
               *extra_args, self.dir]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        parent_dev = os.stat(os.path.dirname(self.dir)).st_dev
        deadline = time.monotonic() + 20
        while os.stat(self.dir).st_dev == parent_dev:
            if self.proc.poll() is not None:
                raise RuntimeError(f"modelfs exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"modelfs did not mount in 20 s:\n{self.log_text()}")
            time.sleep(0.02)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def log_text(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def unmount(self, timeout=20):
        """Unmounts (fusermount3 -u -z) and returns the daemon's exit code."""
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", self.dir], stderr=subprocess.DEVNULL)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", self.dir], stderr=subprocess.DEVNULL)
        self.log.close()
        return self.proc.returncode

    def terminate(self, timeout=20):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return self.proc.returncode


@pytest.fixture(scope="session")
def workdir():
    d = tempfile.mkdtemp(prefix="modelfs-it-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def registry(workdir):
    with harness.Registry(os.path.join(workdir, "registry")) as r:
        yield r


@pytest.fixture(scope="session")
def small_model(registry, workdir):
    """library/tiny:1b — an 8 MiB GGUF plus text layers; returns the local source files."""
    files = {
        "model": harness.make_gguf(os.path.join(workdir, "tiny.gguf"), 8, seed=1),
        "template": _write(workdir, "template", "{{ .Prompt }}"),
        "system": _write(workdir, "system", "You are a test."),
        "params": _write(workdir, "params", '{"temperature": 0}'),
        "license": _write(workdir, "license", "MIT, for tests"),
    }
    pushed = harness.push_model(registry.url, "tiny:1b", files)
    return {"files": files, "pushed": pushed}


def _write(d, name, text):
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write(text)
    return p


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    return str(d)


@pytest.fixture
def mount(registry, cache_dir):
    mounts = []

    def make(registry_url=None, cache=None, args=(), env=None):
        m = Mount(registry_url or registry.url, cache or cache_dir, args, env)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        m.unmount()
    for m in mounts:
        assert_no_sanitizer_report(m)


# What ASan/UBSan/TSan print when a daemon built with -DMODELFS_SANITIZE=... (MODELFS_BUILD)
# finds a bug; halt_on_error makes the daemon exit, but a report at exit must fail the test too.
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: ThreadSanitizer")


def assert_no_sanitizer_report(m):
    text = m.log_text() if not m.log.closed else open(m.log_path, "rb").read().decode(
        errors="replace")
    for marker in SANITIZER_MARKERS:
        if marker in text:
            i = text.index(marker)
            pytest.fail("sanitizer report from the daemon (%s):\n%s" % (m.log_path,
                                                                      text[max(0, i - 200):i + 4000]))
