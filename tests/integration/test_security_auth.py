"""Issue 7: authenticated and TLS registries, proxies, and secrets kept out of logs.

Real servers: Debian's docker-registry with htpasswd basic auth over TLS (a CA generated here
with openssl), the same storage behind token auth (harness.TokenServer over https), and
tinyproxy as a forward proxy. The model is pushed once to a plain registry; the authenticated
registries serve that storage (a symlink), so pushing never needs the auth under test.
"""
import base64
import errno
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time

import pytest

import harness

PASSWORD = "pw-" + os.urandom(8).hex()  # distinctive, so a leak is found by grep
USER = "alice"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class CountingTokenServer(harness.TokenServer):
    """A TokenServer that counts every request (granted or not) and remembers issued tokens."""

    def __init__(self, *a, **k):
        self.hits = 0
        self.issued = []
        self._lock = threading.Lock()
        super().__init__(*a, **k)

    def _handle(self, req):
        with self._lock:
            self.hits += 1
        return super()._handle(req)

    def sign(self, claims):
        token = super().sign(claims)
        self.issued.append(token)
        return token


@pytest.fixture(scope="module")
def secdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sec"))


@pytest.fixture(scope="module")
def tls(secdir):
    return harness.make_tls_cert(os.path.join(secdir, "tls"))


@pytest.fixture(scope="module")
def seeded(secdir):
    """Storage holding library/secret:1 (8 MiB GGUF + template), pushed over plain http."""
    d = os.path.join(secdir, "seed")
    files = {"model": harness.make_gguf(os.path.join(secdir, "secret.gguf"), 8, seed=7),
             "template": _write(secdir, "template", "{{ .Prompt }}")}
    with harness.Registry(d, keep_dir=True) as reg:
        harness.push_model(reg.url, "secret:1", files)
    return {"storage": os.path.join(d, "storage"), "files": files}


def _write(d, name, text):
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write(text)
    return p


def _registry_over(storage, secdir, name, **kw):
    d = os.path.join(secdir, name)
    os.makedirs(d, exist_ok=True)
    if not os.path.lexists(os.path.join(d, "storage")):
        os.symlink(storage, os.path.join(d, "storage"))
    return harness.Registry(d, keep_dir=True, **kw)


@pytest.fixture(scope="module")
def basic_tls(seeded, secdir, tls):
    with _registry_over(seeded["storage"], secdir, "basic", htpasswd={USER: PASSWORD},
                        tls=tls) as reg:
        yield reg


@pytest.fixture(scope="module")
def token_server(tls):
    with CountingTokenServer(users={USER: PASSWORD}, tls=tls) as ts:
        yield ts


@pytest.fixture(scope="module")
def token_reg(seeded, secdir, token_server, tls):
    with _registry_over(seeded["storage"], secdir, "token", token_auth=token_server,
                        tls=tls) as reg:
        yield reg


@pytest.fixture(scope="module")
def plain_reg(seeded, secdir):
    with _registry_over(seeded["storage"], secdir, "plain") as reg:
        yield reg


def creds_file(path, registry_url, user, password, form="auth"):
    host = registry_url.split("://", 1)[1]
    if form == "auth":
        entry = {"auth": base64.b64encode(("%s:%s" % (user, password)).encode()).decode()}
    else:
        entry = {"username": user, "password": password}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"auths": {host: entry}}, f)
    return path


def assert_no_secrets(m, *secrets):
    """Neither the password (plain or base64) nor any given token is in the daemon log, the
    control files (.modelfs/status, .modelfs/metrics), `modelfs status --json`, or the
    user.modelfs.* xattrs of the model's files."""
    from conftest import MODELFS
    places = {"log": m.log_text()}
    for name in ("status", "metrics"):
        try:
            with open(m.path(".modelfs", name), errors="replace") as f:
                places[".modelfs/" + name] = f.read()
        except OSError:
            pass
    r = subprocess.run([MODELFS, "status", "--json", m.dir], capture_output=True, text=True,
                       timeout=30)
    places["modelfs status"] = r.stdout + r.stderr
    model_dir = m.path("secret:1")
    try:
        for f in os.listdir(model_dir):
            p = os.path.join(model_dir, f)
            for attr in os.listxattr(p):
                places["xattr %s %s" % (f, attr)] = os.getxattr(p, attr).decode(errors="replace")
    except OSError:
        pass
    b64 = base64.b64encode(("%s:%s" % (USER, PASSWORD)).encode()).decode()
    for where, text in places.items():
        for s in (PASSWORD, b64) + tuple(secrets):
            assert s not in text, "a secret leaked into %s" % where


def assert_refused_quickly(path, allowed=(errno.ENOENT, errno.EACCES, errno.EIO, errno.EPERM),
                           within=15):
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        os.listdir(path)
    assert e.value.errno in allowed, e.value
    assert time.monotonic() - t0 < within, "refusal took %.1fs" % (time.monotonic() - t0)


# ---- basic auth over TLS --------------------------------------------------------------------

def test_basic_auth_over_tls_with_credentials_file(basic_tls, seeded, tls, mount, tmp_path):
    creds = creds_file(str(tmp_path / "creds.json"), basic_tls.url, USER, PASSWORD)
    # Debug logging on: the widest surface a secret could leak through.
    m = mount(basic_tls.url, args=["--ca-file", tls[2], "--credentials", creds,
                                   "--part-size", "1M", "--log-level", "debug"])
    got = sha256_file(m.path("secret:1", "model.gguf"))
    assert got == sha256_file(seeded["files"]["model"])
    with open(m.path("secret:1", "template")) as f:
        assert f.read() == "{{ .Prompt }}"
    assert_no_secrets(m)


def test_basic_auth_from_home_docker_config(basic_tls, seeded, tls, mount, tmp_path):
    home = tmp_path / "home"
    creds_file(str(home / ".docker" / "config.json"), basic_tls.url, USER, PASSWORD,
               form="userpass")
    m = mount(basic_tls.url, args=["--ca-file", tls[2]], env={"HOME": str(home)})
    assert sha256_file(m.path("secret:1", "model.gguf")) == \
        sha256_file(seeded["files"]["model"])
    assert_no_secrets(m)


def test_basic_auth_wrong_password_is_a_clear_prompt_error(basic_tls, tls, mount, tmp_path):
    wrong = "wrong-" + os.urandom(6).hex()
    creds = creds_file(str(tmp_path / "creds.json"), basic_tls.url, USER, wrong)
    m = mount(basic_tls.url, args=["--ca-file", tls[2], "--credentials", creds])
    for _ in range(3):  # every attempt fails the same way, promptly (no hang, no retry loop)
        assert_refused_quickly(m.path("secret:1"))
    host = basic_tls.url.split("://", 1)[1]
    assert "authentication failed for %s" % host in m.log_text()
    assert wrong not in m.log_text()
    assert_no_secrets(m, wrong, base64.b64encode(("%s:%s" % (USER, wrong)).encode()).decode())
    assert m.proc.poll() is None


def test_basic_auth_without_credentials_says_login_needed(basic_tls, tls, mount, tmp_path):
    m = mount(basic_tls.url, args=["--ca-file", tls[2]], env={"HOME": str(tmp_path)})
    assert_refused_quickly(m.path("secret:1"))
    assert "requires a login" in m.log_text() or "authentication failed" in m.log_text()


# ---- token auth -----------------------------------------------------------------------------

def test_token_auth_reads_with_few_token_requests(token_reg, token_server, seeded, tls, mount,
                                                  tmp_path):
    creds = creds_file(str(tmp_path / "creds.json"), token_reg.url, USER, PASSWORD)
    before = token_server.hits
    m = mount(token_reg.url, args=["--ca-file", tls[2], "--credentials", creds,
                                   "--part-size", "1M", "--concurrency", "8",
                                   "--log-level", "debug"])
    # Several readers at once: parts of the blob, the small layers, the manifest.
    results = {}

    def read(name):
        results[name] = sha256_file(m.path("secret:1", name))

    threads = [threading.Thread(target=read, args=(n,))
               for n in ("model.gguf", "template", "config.json", "manifest.json")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["model.gguf"] == sha256_file(seeded["files"]["model"])
    # One token per (registry, scope), cached until expiry and shared by concurrent requests:
    # 8 parts + 3 small reads must not each ask the token service.
    used = token_server.hits - before
    assert 1 <= used <= 3, "token requests: %d" % used
    assert_no_secrets(m, *token_server.issued)


def test_token_auth_wrong_password_is_prompt_and_bounded(token_reg, token_server, tls, mount,
                                                         tmp_path):
    creds = creds_file(str(tmp_path / "creds.json"), token_reg.url, USER, "nope-" + "x" * 8)
    before = token_server.hits
    m = mount(token_reg.url, args=["--ca-file", tls[2], "--credentials", creds])
    assert_refused_quickly(m.path("secret:1"))
    host = token_reg.url.split("://", 1)[1]
    assert "authentication failed for %s" % host in m.log_text()
    assert token_server.hits - before <= 3, "token requests: %d" % (token_server.hits - before)
    assert "nope-xxxxxxxx" not in m.log_text()


def test_token_auth_anonymous_is_refused_clearly(token_reg, token_server, tls, mount, tmp_path):
    m = mount(token_reg.url, args=["--ca-file", tls[2]], env={"HOME": str(tmp_path)})
    assert_refused_quickly(m.path("secret:1"))
    assert "authentication failed for" in m.log_text()


# ---- TLS ------------------------------------------------------------------------------------

def test_self_signed_registry_is_refused_by_default_with_a_hint(basic_tls, mount, tmp_path):
    creds = creds_file(str(tmp_path / "creds.json"), basic_tls.url, USER, PASSWORD)
    m = mount(basic_tls.url, args=["--credentials", creds])
    assert_refused_quickly(m.path("secret:1"))
    log = m.log_text()
    assert "TLS verification" in log and "certificate" in log.lower(), log[-2000:]
    assert "--ca-file" in log
    assert_no_secrets(m)


def test_insecure_skips_verification_loudly(basic_tls, seeded, mount, tmp_path):
    creds = creds_file(str(tmp_path / "creds.json"), basic_tls.url, USER, PASSWORD)
    m = mount(basic_tls.url, args=["--credentials", creds, "--insecure"])
    with open(m.path("secret:1", "template")) as f:
        assert f.read() == "{{ .Prompt }}"
    log = m.log_text()
    assert "DISABLED" in log or "NOT verified" in log
    assert_no_secrets(m)


def test_ca_file_without_a_certificate_is_a_usage_error(basic_tls, tmp_path):
    from conftest import MODELFS
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("hello\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([MODELFS, "mount", "-f", "--registry", basic_tls.url, "--ca-file",
                        str(bad), "--cache", str(tmp_path / "c"), str(mnt)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "PEM" in (r.stdout + r.stderr)


# ---- proxies --------------------------------------------------------------------------------

class TinyProxy:
    """tinyproxy in the foreground on a free loopback port; log() is its connection log."""

    def __init__(self, directory):
        if not shutil.which("tinyproxy"):
            pytest.skip("tinyproxy not installed (scripts/deps)")
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.log_path = os.path.join(directory, "tinyproxy.log")
        self.port = harness.free_port()
        conf = os.path.join(directory, "tinyproxy.conf")
        with open(conf, "w") as f:
            f.write("Port %d\nListen 127.0.0.1\nTimeout 60\nLogFile \"%s\"\nLogLevel Info\n"
                    "MaxClients 100\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
                    % (self.port, self.log_path))
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.url = "http://127.0.0.1:%d" % self.port

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("tinyproxy exited: %s" % self.log())
            import socket
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        harness.wait_until(up, 10, "tinyproxy")

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def requests(self, needle):
        return [l for l in self.log().splitlines() if needle in l]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def tinyproxy(tmp_path):
    p = TinyProxy(str(tmp_path / "tinyproxy"))
    yield p
    p.stop()


def _proxy_env(**kw):
    # Start from an environment without any proxy variables of the test runner.
    env = {k: "" for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                           "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY")}
    env.update(kw)
    return env


def test_http_proxy_env_is_honoured(plain_reg, seeded, tinyproxy, mount):
    m = mount(plain_reg.url, env=_proxy_env(HTTP_PROXY=tinyproxy.url))
    with open(m.path("secret:1", "template")) as f:
        assert f.read() == "{{ .Prompt }}"
    assert tinyproxy.requests("/v2/library/secret/manifests/1"), tinyproxy.log()[-2000:]


def test_https_proxy_env_tunnels_tls(basic_tls, tinyproxy, tls, mount, tmp_path):
    creds = creds_file(str(tmp_path / "creds.json"), basic_tls.url, USER, PASSWORD)
    m = mount(basic_tls.url, args=["--ca-file", tls[2], "--credentials", creds],
              env=_proxy_env(HTTPS_PROXY=tinyproxy.url))
    with open(m.path("secret:1", "template")) as f:
        assert f.read() == "{{ .Prompt }}"
    assert tinyproxy.requests("CONNECT"), tinyproxy.log()[-2000:]
    assert PASSWORD not in tinyproxy.log()  # inside the tunnel, not visible to the proxy


def test_no_proxy_bypasses_the_proxy(plain_reg, tinyproxy, mount):
    m = mount(plain_reg.url, env=_proxy_env(HTTP_PROXY=tinyproxy.url, NO_PROXY="127.0.0.1"))
    with open(m.path("secret:1", "template")) as f:
        assert f.read() == "{{ .Prompt }}"
    assert not tinyproxy.requests("/v2/"), tinyproxy.log()[-2000:]


def test_proxy_flag_and_option(plain_reg, tinyproxy, mount):
    m = mount(plain_reg.url, args=["--proxy", tinyproxy.url], env=_proxy_env())
    with open(m.path("secret:1", "template")) as f:
        assert f.read() == "{{ .Prompt }}"
    assert tinyproxy.requests("/v2/library/secret/manifests/1"), tinyproxy.log()[-2000:]
    n = len(tinyproxy.requests("/v2/"))
    m2 = mount(plain_reg.url, args=["-o", "proxy=" + tinyproxy.url], env=_proxy_env())
    os.listdir(m2.path("secret:1"))
    assert len(tinyproxy.requests("/v2/")) > n
