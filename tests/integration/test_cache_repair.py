"""Repair: a server flips one byte in one part's first response (and, in the second case, also
cuts that response short so it is retried). The blob must still end with the right digest, and
the repair must re-download parts, not the blob. Bytes served are counted by the server
(harness.FaultyCdn).
"""
import hashlib
import os
import re

import pytest

import harness

MiB = 1 << 20
PART = 4 * MiB
CONCURRENCY = 4


@pytest.fixture(scope="module")
def cdn_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("repair")
    with harness.Registry(cdn=True) as reg:
        gguf = harness.make_gguf(str(d / "m.gguf"), 64, seed=1)
        harness.push_model(reg.url, "flip:64m", {"model": gguf})
        with open(gguf, "rb") as f:
            want = hashlib.sha256(f.read()).hexdigest()
        yield reg, harness.FaultyCdn(reg.cdn), os.path.getsize(gguf), want


@pytest.mark.parametrize("cut", [False, True], ids=["flip", "flip-and-cut"])
def test_one_flipped_byte_is_repaired(cdn_model, mount, cut):
    reg, cdn, size, want = cdn_model
    flip_at = 9 * PART + 12345  # in part 9 of 16
    cdn.arm(flip_at, cut_after=MiB if cut else None)
    m = mount(registry_url=reg.url,
              args=["--part-size", "4M", "--concurrency", str(CONCURRENCY)])
    path = m.path("flip:64m", "model.gguf")
    # The default mode serves bytes as they arrive, so this first read may include the flipped
    # byte (and leave it in the page cache); a read after the commit must not, neither through a
    # new open nor through this one, kept open across the repair.
    kept = os.open(path, os.O_RDONLY)
    harness.sha256_file(kept)
    blob = os.path.join(m.cache, "blobs", "sha256-" + want)
    harness.wait_until(lambda: os.path.exists(blob), 60, "the repaired blob's commit")
    # The commit (rename) comes just before its log line.
    harness.wait_until(lambda: "repaired after re-fetching" in m.log_text(), 10, "the repair's log")
    log = m.log_text()
    assert harness.sha256_file(blob) == want, log[-3000:]
    # First through the file kept open (a new open drops the inode's cached pages itself)...
    try:
        assert harness.sha256_file(kept) == want, "the open file still serves the bad page: " + log[-3000:]
    finally:
        os.close(kept)
    # ... then reopening after the commit must not serve pages cached before the repair either.
    assert harness.sha256_file(path) == want, log[-3000:]
    assert cdn.fired
    assert "repairing" in log, log[-3000:]
    # Bytes served from the moment the mismatch was logged (the daemon logs wall-clock time of
    # day, as this process sees it): the repair's re-fetches, including what its split transfers
    # had in flight when they stopped.
    h, mi, sec = re.search(r"^(\d\d):(\d\d):(\d\d\.\d+) .*digest mismatch", log, re.M).groups()
    redownloaded = cdn.sent_since(int(h) * 3600 + int(mi) * 60 + float(sec))
    refetched = re.findall(r"repaired after re-fetching (\d+) of", log)
    print("\n%s: the repair re-fetched %s piece(s) of %d: %d bytes served for it (%.2f parts); "
          "%d bytes served beyond the blob in all" % (
              "flip+cut" if cut else "flip", refetched[0] if refetched else "?", PART,
              redownloaded, redownloaded / PART, cdn.sent - size))
    if os.environ.get("MODELFS_TEST_VERBOSE"):
        print("\n".join(str(r) for r in cdn.requests))
        print("\n".join(l for l in log.splitlines() if "repair" in l or "verified" in l))
    if cut:
        # The cut response's part is among the suspects (pieces in flight when the fetch
        # retried): at most one part per connection in flight is re-fetched.
        assert refetched and int(refetched[0]) <= CONCURRENCY, log[-3000:]
        assert redownloaded <= 2 * CONCURRENCY * PART, log[-3000:]
    else:
        # No fetch trouble to rank by: pieces are re-fetched in order, each
        # once at most; the bytes are still not thrown away and re-downloaded as a whole blob.
        assert refetched and int(refetched[0]) <= size // PART + 1, log[-3000:]
