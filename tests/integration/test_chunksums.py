"""Chunksums: a registry that publishes per-chunk SHA-256 digests of a blob
(`GET /v2/<repo>/chunksums/<digest>`, Ollama's endpoint) lets modelfs verify each chunk as soon as
its bytes are there, re-fetch a bad chunk alone, and answer strict reads before the whole blob's
digest is known. The whole blob's digest still decides the commit.

docker-registry has no such endpoint, so a harness.ChunksumsFront in front of it serves the
chunk lists the tests set and relays everything else; blob bytes come from the registry's CDN
(a 307), where harness.FaultyCdn flips a byte, holds a range, and counts every byte it serves and
every byte it serves twice. The model is a 64 MiB GGUF fetched in 4 MiB parts, its chunks 3 MiB
(so chunk and part boundaries only meet every 12 MiB; the last chunk is short).
"""
import hashlib
import json
import os
import re
import threading
import types

import pytest

import harness

MiB = 1 << 20
PART = 4 * MiB
CHUNK = 3 * MiB
CONCURRENCY = 4
MODEL = "chunky:64m"
ARGS = ["--part-size", "4M", "--concurrency", str(CONCURRENCY)]
# Chunk 13 is [39 MiB, 42 MiB): it straddles parts 9 [36, 40) and 10 [40, 44) MiB. The flipped
# byte is in part 10.
BAD = 13
FLIP_AT = 40 * MiB + 12345
assert BAD * CHUNK <= FLIP_AT < (BAD + 1) * CHUNK and BAD * CHUNK < 10 * PART < (BAD + 1) * CHUNK

MISMATCH = "does not match its chunk digest; re-fetching it"
DISAGREE = "disagree"
REPAIR = "repairing: re-fetching its"
DIGEST_MISMATCH = "digest mismatch for"


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    d = tmp_path_factory.mktemp("chunksums")
    with harness.Registry(cdn=True) as reg, harness.ChunksumsFront(reg.url) as front:
        gguf = harness.make_gguf(str(d / "m.gguf"), 64, seed=1)
        harness.push_model(reg.url, MODEL, {"model": gguf})
        with open(gguf, "rb") as f:
            data = f.read()
        hexd = hashlib.sha256(data).hexdigest()
        yield types.SimpleNamespace(reg=reg, front=front, cdn=harness.FaultyCdn(reg.cdn),
                                    path=gguf, data=data, size=len(data), hex=hexd,
                                    digest="sha256:" + hexd)


@pytest.fixture
def o(origin):
    """The origin, with no chunk lists set, no faults armed and nothing recorded."""
    origin.front.reset()
    origin.cdn.release()
    origin.cdn.arm(None)
    yield origin
    origin.cdn.release()  # never leave a CDN thread waiting on a hold


def start(mount, o, *extra):
    return mount(registry_url=o.front.url, args=[*ARGS, *extra])


def good_lines(o, chunk=CHUNK):
    lines = harness.chunksums_lines(o.path, chunk)
    assert len(lines) == -(-o.size // chunk) and lines[-1][2] - lines[-1][1] + 1 < chunk
    return lines


def publish(o, lines):
    o.front.set_chunksums(o.digest, harness.chunksums_text(None, lines=lines))


def blob_status(m, o):
    """The blob's entry in the mount's status JSON, or None. Read it while the blob is open: a
    blob opened and closed between two of the daemon's 1 s samples is never listed."""
    with open(m.path(".modelfs", "status")) as f:
        status = json.load(f)
    return next((b for b in status["blobs"] if b["digest"] == o.digest), None)


def alive(m):
    if m.proc.poll() is not None:
        raise RuntimeError("modelfs exited with %s:\n%s"
                           % (m.proc.returncode, m.log_text()[-3000:]))
    return True


def wait_committed(m, o, timeout=60):
    """Until the blob is in blobs/ and its `verified` line is logged (the rename comes first)."""
    blob = os.path.join(m.cache, "blobs", "sha256-" + o.hex)
    harness.wait_until(lambda: alive(m) and os.path.exists(blob)
                       and ("verified " + o.digest) in m.log_text(), timeout,
                       "the commit of %s" % o.digest)
    return blob


def verified_status(m, o):
    """The blob's status entry once it says verified (the commit is logged just before)."""
    seen = []

    def verified():
        alive(m)
        seen[:] = [blob_status(m, o)]
        return seen[0] if seen[0] and seen[0]["state"] == "verified" else None

    try:
        return harness.wait_until(verified, 10, "status to say verified")
    except TimeoutError as e:
        raise AssertionError("%s; last status: %s" % (e, seen)) from None


def lines_with(log, text):
    return [line for line in log.splitlines() if text in line]


def seconds_of_day(line):
    h, mi, s = re.match(r"^(\d\d):(\d\d):(\d\d\.\d+) ", line).groups()
    return int(h) * 3600 + int(mi) * 60 + float(s)


def served_at_least_twice(cdn, begin, end):
    """True when every byte of [begin, end) was served by two or more responses."""
    events = []
    for r in cdn.requests:
        lo, hi = max(begin, r.start), min(end, r.start + r.sent)
        if lo < hi:
            events += [(lo, 1), (hi, -1)]
    depth, pos = 0, begin
    for x, step in sorted(events):
        if x > pos and depth < 2:
            return False  # [pos, x) was served fewer than twice
        pos, depth = max(pos, x), depth + step
    return pos >= end


def blocked_in_pread(tid):
    """True while thread tid of this process is blocked in pread64 (x86_64: syscall 17)."""
    try:
        with open("/proc/self/task/%d/syscall" % tid) as f:
            return f.read().split()[0] == "17"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("chunk", [CHUNK, 5 * MiB + 12345], ids=["3MiB", "5MiB+12345"])
def test_chunks_are_verified_and_the_blob_commits(o, mount, chunk):
    lines = good_lines(o, chunk)
    publish(o, lines)
    m = start(mount, o)
    path = m.path(MODEL, "model.gguf")
    fd = os.open(path, os.O_RDONLY)  # listed in status while open
    try:
        assert harness.sha256_file(path) == o.hex
        wait_committed(m, o)
        st = verified_status(m, o)
    finally:
        os.close(fd)
    log = m.log_text()
    assert st.get("chunks") == {"total": len(lines), "verified": len(lines), "refetched": 0,
                                "distrusted": False}, (st, log[-3000:])
    asked = o.front.chunksums_requests()
    assert len(asked) == 1, asked
    assert asked[0].method == "GET" and asked[0].digest == o.digest and asked[0].status == 200
    assert asked[0].repo == "library/" + MODEL.split(":")[0], asked[0]
    for text in (MISMATCH, DISAGREE, REPAIR, DIGEST_MISMATCH):
        assert not lines_with(log, text), log[-3000:]


@pytest.mark.parametrize("cut", [False, True], ids=["flip", "flip-and-cut"])
def test_a_bad_chunk_is_refetched_alone(o, mount, cut):
    lines = good_lines(o)
    publish(o, lines)
    o.cdn.arm(FLIP_AT, cut_after=MiB if cut else None)
    m = start(mount, o)
    path = m.path(MODEL, "model.gguf")
    # Opening starts the background fetch of the whole blob. Nothing is read until the commit,
    # so no demand read races a part for the same bytes: each byte is requested once, unless
    # something re-fetches it.
    fd = os.open(path, os.O_RDONLY)
    try:
        blob = wait_committed(m, o)
        st = verified_status(m, o)
    finally:
        os.close(fd)
    log = m.log_text()
    assert o.cdn.fired
    bad = lines_with(log, MISMATCH)
    assert len(bad) == 1, log[-3000:]
    assert not lines_with(log, REPAIR) and not lines_with(log, DIGEST_MISMATCH), log[-3000:]
    assert not lines_with(log, DISAGREE), log[-3000:]
    assert st.get("chunks") == {"total": len(lines), "verified": len(lines), "refetched": 1,
                                "distrusted": False}, (st, log[-3000:])
    assert harness.sha256_file(blob) == o.hex
    assert harness.sha256_file(path) == o.hex, log[-3000:]

    # Re-downloaded = bytes the CDN served a second time. Without the fault every byte is
    # served once (see above), so they are the bad chunk's re-fetch (CHUNK bytes) plus, at
    # most, what responses modelfs gave up on had in flight (sent into the socket, never read,
    # then asked again: a slow part split, say); the CDN counts those (aborted_bytes). The cut
    # in "flip-and-cut" is the server's: the client read every byte sent before it, and the
    # retry resumes after them. A part or the whole blob re-fetched would exceed the bound.
    a, b = lines[BAD][1], lines[BAD][2] + 1
    detected = seconds_of_day(bad[0])
    again, in_flight = o.cdn.duplicate, o.cdn.aborted_bytes()
    print("\n%s: %d bytes re-downloaded for a bad %d-byte chunk (%.3f chunks); %d bytes served "
          "after it was detected; %d bytes in aborted responses; %d bytes served in all for a "
          "%d-byte blob" % ("flip+cut" if cut else "flip", again, CHUNK, again / CHUNK,
                            o.cdn.sent_since(detected), in_flight, o.cdn.sent, o.size))
    if os.environ.get("MODELFS_TEST_VERBOSE"):
        print("\n".join(map(repr, o.cdn.requests)))
    assert served_at_least_twice(o.cdn, a, b), o.cdn.requests  # the whole chunk, again
    assert again <= CHUNK + in_flight, (o.cdn.requests, log[-3000:])


def test_a_bad_chunk_is_not_served_until_refetched(o, mount):
    publish(o, good_lines(o))
    a, b = BAD * CHUNK, (BAD + 1) * CHUNK - 1
    o.cdn.arm(FLIP_AT)
    # Hold every request for bytes of the bad chunk that were all served before: its re-fetch,
    # and any demand a read makes for them. Until released, no good copy of them can arrive.
    o.cdn.hold(a, b, within=True, refetch_only=True, timeout=30)
    m = start(mount, o)
    fd = os.open(m.path(MODEL, "model.gguf"), os.O_RDONLY)
    try:
        harness.wait_until(lambda: alive(m) and lines_with(m.log_text(), MISMATCH), 30,
                           "the bad chunk to be detected")
        harness.wait_until(lambda: o.cdn.waiting, 10, "its re-fetch (held)")
        got = {}

        def read():
            got["tid"] = threading.get_native_id()
            try:
                got["data"] = os.pread(fd, MiB, 40 * MiB)  # holds the flipped byte
            except OSError as e:
                got["error"] = e

        reader = threading.Thread(target=read)
        reader.start()
        harness.wait_until(lambda: "tid" in got and (blocked_in_pread(got["tid"])
                                                     or not reader.is_alive()), 10,
                           "the read to block")
        # The read must still be waiting: the only bytes modelfs has for it are the bad ones.
        returned_early = not reader.is_alive()
        o.cdn.release()
        reader.join(30)
        assert not returned_early, ("the read of a chunk known bad returned before its "
                                    "re-fetch: %s" % got.get("error", "bytes"))
        assert "error" not in got, got["error"]
        assert got["data"] == o.data[40 * MiB:41 * MiB]
        wait_committed(m, o)
        st = verified_status(m, o)
    finally:
        os.close(fd)
    log = m.log_text()
    assert st["chunks"]["refetched"] == 1 and not st["chunks"]["distrusted"], st
    assert not lines_with(log, REPAIR), log[-3000:]


def test_a_reader_keeping_its_file_open_rereads_the_repaired_chunk(o, mount):
    """Default mode serves bytes as they arrive, so a reader can get the flipped byte before the
    chunk is checked; the kernel then caches that page. Once the chunk is known bad modelfs must
    drop it from the page cache, or the same open file keeps returning the bad byte forever."""
    publish(o, good_lines(o))
    o.cdn.arm(FLIP_AT)
    # Hold the first response with the flipped byte, so the read below is parked before it.
    o.cdn.hold(40 * MiB, 40 * MiB + MiB - 1, timeout=30)
    m = start(mount, o)
    fd = os.open(m.path(MODEL, "model.gguf"), os.O_RDONLY)
    try:
        got = {}

        def read():
            got["tid"] = threading.get_native_id()
            got["data"] = os.pread(fd, MiB, 40 * MiB)

        reader = threading.Thread(target=read)
        reader.start()
        harness.wait_until(lambda: o.cdn.waiting, 20, "the response with the flipped byte (held)")
        o.cdn.release()
        reader.join(30)
        good = o.data[40 * MiB:41 * MiB]
        assert got["data"] != good, "the first read should have been served the flipped byte"
        wait_committed(m, o)
        assert lines_with(m.log_text(), MISMATCH), m.log_text()[-3000:]
        again = os.pread(fd, MiB, 40 * MiB)  # the same open file, after the repair
    finally:
        os.close(fd)
    assert again == good, "a reader that kept its file open still sees the bad byte"


@pytest.mark.parametrize("hold_end", [False, True], ids=["racing-the-commit", "end-held"])
def test_a_wrong_chunk_digest_is_distrusted(o, mount, hold_end):
    lines = good_lines(o)
    wrong = hashlib.sha256(b"not chunk %d" % BAD).hexdigest()
    lines[BAD] = (wrong,) + lines[BAD][1:]
    publish(o, lines)  # the data are good; the list lies about one chunk
    last_part = (o.size - 1) // PART * PART
    if hold_end:
        # The blob cannot be whole until release(): the chunk's re-fetch and second check
        # cannot lose a race with the whole blob's digest.
        o.cdn.hold(last_part, o.size - 1, timeout=30)
    m = start(mount, o)
    path = m.path(MODEL, "model.gguf")
    fd = os.open(path, os.O_RDONLY)
    try:
        if hold_end:
            harness.wait_until(lambda: alive(m) and lines_with(m.log_text(), DISAGREE), 20,
                               "the chunk digests to be distrusted (last part held)")
            assert o.cdn.holding()
            o.cdn.release()
        blob = wait_committed(m, o)
        st = verified_status(m, o)
    finally:
        os.close(fd)
    log = m.log_text()
    chunks = st.get("chunks") or {}
    if not hold_end and chunks.get("refetched") == 0:
        # The frontier reached the end and the blob's digest committed it before the chunk
        # thread got to the lying chunk: nothing was re-fetched, nothing to distrust.
        assert not lines_with(log, DISAGREE) and not chunks.get("distrusted"), (st, log[-3000:])
    else:
        # Once the lying chunk was re-fetched (and came back the same), the chunk digests must
        # end up distrusted, whichever of its second check and the commit came first.
        assert lines_with(log, DISAGREE) and "chunk digests" in lines_with(log, DISAGREE)[0], \
            (chunks, log[-3000:])
        assert chunks.get("distrusted") is True and chunks.get("refetched", 99) <= 1, \
            (st, log[-3000:])
    assert chunks.get("total") == len(lines), st
    # The whole blob's digest matched: nothing to repair, and the blob was not downloaded again.
    assert not lines_with(log, REPAIR) and not lines_with(log, DIGEST_MISMATCH), log[-3000:]
    print("\nwrong chunk digest (%s): %d bytes re-downloaded (chunk: %d); %d in aborted responses"
          % ("end held" if hold_end else "racing the commit", o.cdn.duplicate, CHUNK,
             o.cdn.aborted_bytes()))
    assert o.cdn.duplicate <= CHUNK + o.cdn.aborted_bytes(), o.cdn.requests
    assert harness.sha256_file(blob) == o.hex
    assert harness.sha256_file(path) == o.hex


@pytest.mark.parametrize("status,body", [
    (200, "this is not a chunk list\n"),
    (200, None),  # well-formed lines that cover only half the blob
    (500, "internal error\n"),
], ids=["garbage", "half", "500"])
def test_unusable_chunksums_are_ignored(o, mount, status, body):
    if body is None:
        lines = good_lines(o)
        body = harness.chunksums_text(None, lines=lines[:len(lines) // 2])
    o.front.set_chunksums(o.digest, body, status=status)
    m = start(mount, o)
    path = m.path(MODEL, "model.gguf")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert harness.sha256_file(path) == o.hex
        blob = wait_committed(m, o)
        st = verified_status(m, o)
    finally:
        os.close(fd)
    log = m.log_text()
    assert o.front.chunksums_requests(o.digest), o.front.requests
    assert (st.get("chunks") or {}).get("total") == 0, (st, log[-3000:])
    for text in (MISMATCH, DISAGREE, REPAIR, DIGEST_MISMATCH):
        assert not lines_with(log, text), log[-3000:]
    assert harness.sha256_file(blob) == o.hex
    assert harness.sha256_file(path) == o.hex


def test_strict_read_is_answered_once_its_chunks_verify(o, mount):
    lines = good_lines(o)
    publish(o, lines)
    last_part = (o.size - 1) // PART * PART
    # Every response for bytes of the last part waits: the blob cannot be whole, let alone
    # verified, until release() (or 30 s, which the assertions below would then catch).
    o.cdn.hold(last_part, o.size - 1, timeout=30)
    m = start(mount, o, "--verify", "strict")
    path = m.path(MODEL, "model.gguf")
    fd = os.open(path, os.O_RDONLY)
    try:
        first = os.pread(fd, MiB, 0)  # chunk 0 is [0, 3 MiB)
        still_held = o.cdn.holding()
        st = blob_status(m, o)
        last_served = sum(r.sent for r in o.cdn.requests if r.start + r.sent > last_part)
        o.cdn.release()
        # Still held when the read returned (and when status was read just after): not one byte
        # of the last part had been served, so the blob could not have been verified yet.
        assert still_held, "the strict read only returned when the hold on the last part ended"
        assert last_served == 0, o.cdn.requests
        assert st is not None and st["state"] != "verified", st
        assert (st.get("chunks") or {}).get("verified", 0) >= 1, st
        assert first == o.data[:MiB]
        blob = wait_committed(m, o)
        st = verified_status(m, o)
    finally:
        os.close(fd)
    assert st["chunks"] == {"total": len(lines), "verified": len(lines), "refetched": 0,
                            "distrusted": False}, st
    assert harness.sha256_file(blob) == o.hex
    assert harness.sha256_file(path) == o.hex


@pytest.mark.parametrize("flag", [["--chunksums", "off"], ["-o", "chunksums=off"]],
                         ids=["flag", "option"])
def test_chunksums_off_never_asks(o, mount, flag):
    publish(o, good_lines(o))
    m = start(mount, o, *flag)
    path = m.path(MODEL, "model.gguf")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert harness.sha256_file(path) == o.hex
        wait_committed(m, o)
        st = verified_status(m, o)
    finally:
        os.close(fd)
    assert any("/manifests/" in r.path for r in o.front.requests), o.front.requests
    assert o.front.chunksums_requests() == []
    assert (st.get("chunks") or {}).get("total") == 0, st
