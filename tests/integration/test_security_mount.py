"""Issue 7: mount security (read-only, ownership and modes, allow_other) and hostile local state
in the cache directory (symlinks, files where directories belong, garbage state files).

Runs as root (the suite does); "another user" is nobody via setpriv.
"""
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys

import pytest


WRITE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
NOBODY = 65534


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def as_nobody(*python_code_args, code):
    """Runs `python3 -c code args...` as nobody:nogroup; returns (rc, stdout)."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) missing")
    r = subprocess.run(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY,
                        "--clear-groups", sys.executable, "-c", code, *python_code_args],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout.strip()


STAT_AND_READ = r"""
import os, sys
p = sys.argv[1]
try:
    os.stat(p)
except OSError as e:
    print("stat", e.errno); sys.exit(0)
try:
    with open(p, "rb") as f:
        f.read(16)
    print("read ok")
except OSError as e:
    print("read", e.errno)
"""


# ---- ownership, modes, read-only ------------------------------------------------------------

def test_default_owner_is_mounting_user_and_modes_are_read_only(small_model, mount):
    m = mount()
    for p, want in ((m.dir, 0o555), (m.path("tiny:1b"), 0o555),
                    (m.path("tiny:1b", "model.gguf"), 0o444),
                    (m.path("tiny:1b", "manifest.json"), 0o444)):
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == want, (p, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), p
    assert os.statvfs(m.dir).f_flag & os.ST_RDONLY


def test_uid_gid_umask_options(small_model, mount):
    m = mount(args=["-o", "uid=1234,gid=4321,umask=027"])
    d, f = os.stat(m.path("tiny:1b")), os.stat(m.path("tiny:1b", "model.gguf"))
    assert (d.st_uid, d.st_gid, f.st_uid, f.st_gid) == (1234, 4321, 1234, 4321)
    assert stat.S_IMODE(d.st_mode) == 0o550 and stat.S_IMODE(f.st_mode) == 0o440


def test_nothing_in_the_mount_is_writable(small_model, mount):
    m = mount()
    model = m.path("tiny:1b")
    f = m.path("tiny:1b", "model.gguf")
    os.stat(f)
    attempts = {
        "open O_WRONLY": lambda: os.open(f, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(f, os.O_RDWR),
        "open O_TRUNC": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
        "open O_CREAT": lambda: os.open(os.path.join(model, "new.bin"), os.O_CREAT | os.O_WRONLY),
        "create in root": lambda: os.open(m.path("bad!name"), os.O_CREAT | os.O_WRONLY),
        "mkdir": lambda: os.mkdir(m.path("tiny:1b", "d")),
        "mkdir root": lambda: os.mkdir(m.path("bad!dir")),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(model),
        "rename": lambda: os.rename(f, m.path("tiny:1b", "other.gguf")),
        "symlink": lambda: os.symlink("/etc/passwd", m.path("tiny:1b", "link")),
        "link": lambda: os.link(f, m.path("tiny:1b", "hard")),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "truncate": lambda: os.truncate(f, 0),
        "chmod": lambda: os.chmod(f, 0o777),
        "chown": lambda: os.chown(f, 1, 1),
        "utime": lambda: os.utime(f, (0, 0)),
        "mknod": lambda: os.mknod(m.path("tiny:1b", "fifo"), stat.S_IFIFO | 0o600),
        # The control and Ollama-layout trees are read-only too.
        "write .modelfs/status": lambda: os.open(m.path(".modelfs", "status"), os.O_WRONLY),
        "create in .modelfs": lambda: os.open(m.path(".modelfs", "cmd"),
                                              os.O_CREAT | os.O_WRONLY),
        "mkdir in .ollama": lambda: os.mkdir(m.path(".ollama", "blobs", "x")),
        "setxattr user.modelfs": lambda: os.setxattr(f, "user.modelfs.state", b"verified"),
    }
    for what, op in attempts.items():
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno in WRITE_ERRNOS, (what, e.value)
    # Nothing changed.
    assert sha256_file(f) == sha256_file(small_model["files"]["model"])


def test_other_users_are_kept_out_without_allow_other(small_model, mount):
    m = mount()
    os.stat(m.path("tiny:1b", "model.gguf"))
    rc, out = as_nobody(m.path("tiny:1b", "model.gguf"), code=STAT_AND_READ)
    assert out == "stat %d" % errno.EACCES, out
    rc, out = as_nobody(m.dir, code=STAT_AND_READ)
    assert out == "stat %d" % errno.EACCES, out


def test_allow_other_with_default_permissions_lets_others_read(small_model, mount):
    m = mount(args=["--allow-other", "-o", "default_permissions"])
    rc, out = as_nobody(m.path("tiny:1b", "model.gguf"), code=STAT_AND_READ)
    assert out == "read ok", out


def test_default_permissions_enforces_the_modes(small_model, mount):
    m = mount(args=["--allow-other", "-o", "default_permissions,umask=077"])
    rc, out = as_nobody(m.path("tiny:1b", "model.gguf"), code=STAT_AND_READ)
    assert out in ("stat %d" % errno.EACCES, "read %d" % errno.EACCES), out


# ---- hostile local state --------------------------------------------------------------------

def _model_digest(small_model):
    return sha256_file(small_model["files"]["model"])


def _read_outcome(path):
    try:
        return "ok", sha256_file(path)
    except OSError as e:
        return "err", e.errno


def test_blob_symlink_to_etc_passwd_is_not_followed(small_model, mount, cache_dir):
    os.makedirs(os.path.join(cache_dir, "blobs"), exist_ok=True)
    link = os.path.join(cache_dir, "blobs", "sha256-" + _model_digest(small_model))
    os.symlink("/etc/passwd", link)
    before = sha256_file("/etc/passwd")
    m = mount()
    kind, value = _read_outcome(m.path("tiny:1b", "model.gguf"))
    assert (kind == "ok" and value == _model_digest(small_model)) or \
        (kind == "err" and value == errno.EIO), (kind, value)
    assert value != before
    assert sha256_file("/etc/passwd") == before
    assert "symlink" in m.log_text() or kind == "ok"


def test_partial_symlink_to_elsewhere_is_not_written_through(small_model, mount, cache_dir,
                                                             tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.makedirs(os.path.join(cache_dir, "partial"), exist_ok=True)
    name = "sha256-" + _model_digest(small_model)
    os.symlink(str(victim), os.path.join(cache_dir, "partial", name))
    os.symlink(str(victim), os.path.join(cache_dir, "partial", name + ".state"))
    m = mount()
    kind, value = _read_outcome(m.path("tiny:1b", "model.gguf"))
    assert (kind == "ok" and value == _model_digest(small_model)) or \
        (kind == "err" and value == errno.EIO), (kind, value)
    assert victim.read_bytes() == b"precious"
    assert m.proc.poll() is None


def test_symlinked_manifest_dir_is_not_followed(small_model, registry, mount, cache_dir,
                                                tmp_path):
    # Learn where the manifest of tiny:1b is stored, then replace a directory on its path with
    # a symlink to somewhere else.
    m = mount()
    os.listdir(m.path("tiny:1b"))
    m.unmount()
    stored = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(cache_dir, "manifests"))
              for f in fs]
    assert len(stored) == 1, stored
    ns_dir = os.path.dirname(os.path.dirname(stored[0]))  # .../<host>/library
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(ns_dir)
    os.symlink(str(elsewhere), ns_dir)
    m2 = mount()
    assert "model.gguf" in os.listdir(m2.path("tiny:1b"))  # still served (from the registry)
    assert os.listdir(str(elsewhere)) == [], "a manifest was written through the symlink"
    assert os.path.islink(ns_dir)
    assert "tiny:1b" not in os.listdir(m2.dir) or True  # listing must not follow it either


def test_files_where_directories_belong_are_refused_clearly(small_model, registry, tmp_path):
    from conftest import MODELFS
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "blobs").write_text("not a directory")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.Popen([MODELFS, "mount", "-f", "--registry", registry.url, "--cache",
                          str(cache), str(mnt)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        p.kill()
        out, _ = p.communicate()
        pytest.fail("modelfs kept running over a cache with a file for blobs/: " + out)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], stderr=subprocess.DEVNULL)
    assert p.returncode != 0
    assert "blobs" in out, out
    assert (cache / "blobs").read_text() == "not a directory"


def test_symlinked_cache_subdir_is_refused(small_model, registry, tmp_path):
    from conftest import MODELFS
    cache = tmp_path / "cache"
    cache.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(str(target), str(cache / "partial"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.Popen([MODELFS, "mount", "-f", "--registry", registry.url, "--cache",
                          str(cache), str(mnt)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        p.kill()
        out, _ = p.communicate()
        pytest.fail("modelfs mounted over a cache whose partial/ is a symlink: " + out)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], stderr=subprocess.DEVNULL)
    assert p.returncode != 0 and "partial" in out, out
    assert os.listdir(str(target)) == []


@pytest.mark.parametrize("garbage", [
    b"\x00\xff" * 1000,
    b"modelfs-partial-state 1\ndigest sha256:../../etc/passwd\nsize -1\n",
    b"modelfs-partial-state 1\n" + b"range 0 18446744073709551615\n" * 100 + b"checksum x\n",
], ids=["binary", "traversal-digest", "huge-ranges"])
def test_garbage_state_file_is_not_trusted(small_model, mount, cache_dir, garbage):
    os.makedirs(os.path.join(cache_dir, "partial"), exist_ok=True)
    name = "sha256-" + _model_digest(small_model)
    # A partial full of junk that a trusted state would serve as "present".
    with open(os.path.join(cache_dir, "partial", name), "wb") as f:
        f.write(b"\xee" * os.path.getsize(small_model["files"]["model"]))
    with open(os.path.join(cache_dir, "partial", name + ".state"), "wb") as f:
        f.write(garbage)
    m = mount()
    assert sha256_file(m.path("tiny:1b", "model.gguf")) == _model_digest(small_model)
    assert m.proc.poll() is None
