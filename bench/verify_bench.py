#!/usr/bin/env python3
"""verify_bench.py: how soon after the last byte a blob is verified, and what one bad byte
costs (issue 4).

One random blob (--size-mib, default 1024) is served on loopback without a cap by
paced_server.py (sendfile from the page cache), as a registry blob of library/bench:t, with
Ollama's chunk digests published beside it (GET /v2/library/bench/chunksums/sha256:<hex>).

(i) Last byte -> committed. `modelfs mount -f`, `cat MNT/bench:t/model.gguf > /dev/null`, done
    when cache/blobs/sha256-<hex> exists. modelfs hashes along the frontier while the bytes
    arrive and logs on commit "verified ... <X> ms after the last byte (hashed <A> ms, fsync <B>
    ms, rename <C> ms)": X is what it adds after the last byte. Two variants: `--chunksums off`
    (the blob's digest only) and with the chunk digests (--chunk-mib, default 64: each chunk is
    also hashed as it lands, on a second thread). Peers: the pass a download-then-verify client
    (Ollama's "verifying sha256 digest") runs after its last byte, on the file modelfs just
    committed: `openssl dgst -sha256 FILE` and `sha256sum FILE`, with the file in the page
    cache (warm) and after `drop_caches` (cold). Ratio: verify pass / modelfs's X. During
    every modelfs run MNT/.modelfs/status is read every 10 ms: how much of the blob the hash
    frontier had covered when the last byte arrived.
(ii) Repair one bad byte. The server XORs one byte at --flip-at (default 40%) of the blob with
    0x01, in the first response to reach it (paced_server.py --flip), not on a part or
    chunk boundary. modelfs `--chunksums off` (the blob's digest mismatches: 64 MiB pieces are
    re-fetched one at a time until it matches) against chunk digests of --repair-chunk-mib
    (default 16,64 MiB: the bad chunk is found as it lands and re-fetched alone). Per run: the
    bytes the server sent beyond the blob size (its access log: TCP-acknowledged body bytes),
    the pieces or chunks re-fetched (modelfs's log), detection (the "digest mismatch" or "does
    not match its chunk digest" line) to commit, and mount -> commit against a run without the
    fault on the same server setup. Ollama, on a digest mismatch, deletes the blob and
    downloads it again: 1x the blob size, shown as a ratio to modelfs's extra bytes. A fault
    run in which modelfs logged no detection (the flipped byte was in a response it cut, or an
    overlapping request brought that byte first) is redone, up to 3 times, and counted.
Before every modelfs run: fresh cache, `sync; echo 3 > /proc/sys/vm/drop_caches`, the source
blob read once so the server serves it from memory.

Writes bench/results/verify-<date>.{md,json} and verify-latest.{md,json}; every run's modelfs
log and the server's access-log lines for it are kept in a /tmp/modelfs-bench-logs-* directory.
Usage: bench/verify_bench.py [--size-mib 1024] [--repeat 3] [--chunk-mib 64] [--parts i,ii]
"""
import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

MODEL = "bench:t"
PEERS = [("openssl", "warm"), ("sha256sum", "warm"), ("openssl", "cold"), ("sha256sum", "cold")]
PEER_CMD = {"openssl": ["openssl", "dgst", "-sha256"], "sha256sum": ["sha256sum"]}
PEER_LABEL = {"openssl": "openssl dgst -sha256", "sha256sum": "sha256sum"}

VERIFIED_RE = re.compile(
    r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) modelfs \w+: verified sha256:([0-9a-f]{64}) \((\d+) bytes\)"
    r"(?: (\d+) ms after the last byte \(hashed (\d+) ms, fsync (\d+) ms, rename (\d+) ms\))?"
    r"(.*)$", re.M)
DETECT_RE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) modelfs \w+: "
                       r"(.*(?:does not match its chunk digest|digest mismatch for).*)$", re.M)
CHUNKS_RE = re.compile(r"verifying \S+ by (\d+) chunk digests")
BAD_CHUNKS_RE = re.compile(r"after re-fetching (\d+) bad chunks?")
PIECES_RE = re.compile(r"repaired after re-fetching (\d+) of (\d+) pieces")
PIECE_LINE_RE = re.compile(r"re-fetching piece (\d+) ")


def log_ms(h, m, s, ms):
    return ((int(h) * 60 + int(m)) * 60 + int(s)) * 1000 + int(ms)


def parse_log(text):
    """What modelfs's log says about the commit and any repair (numbers or None)."""
    out = {"x_ms": None, "hashed_ms": None, "fsync_ms": None, "rename_ms": None,
           "verified_line": None, "detect_line": None, "detect_to_commit_ms": None,
           "chunks": 0, "bad_chunks": 0, "pieces_refetched": 0, "pieces": 0,
           "piece_order": [int(k) for k in PIECE_LINE_RE.findall(text)],
           "chunk_mismatch_lines": text.count("does not match its chunk digest"),
           "distrusted": "disagree with the registry's bytes" in text,
           "warnings": [ln for ln in text.splitlines() if " modelfs warn: " in ln or
                        " modelfs error: " in ln]}
    m = CHUNKS_RE.search(text)
    if m:
        out["chunks"] = int(m.group(1))
    v = VERIFIED_RE.search(text)
    if v:
        out["verified_line"] = v.group(0)
        if v.group(7) is not None:
            out.update(x_ms=int(v.group(7)), hashed_ms=int(v.group(8)), fsync_ms=int(v.group(9)),
                       rename_ms=int(v.group(10)))
        tail = v.group(11)
        if BAD_CHUNKS_RE.search(tail):
            out["bad_chunks"] = int(BAD_CHUNKS_RE.search(tail).group(1))
        if PIECES_RE.search(tail):
            k, n = PIECES_RE.search(tail).groups()
            out["pieces_refetched"], out["pieces"] = int(k), int(n)
    d = DETECT_RE.search(text)
    if d:
        out["detect_line"] = d.group(0)
        if v:
            dt = log_ms(*v.groups()[:4]) - log_ms(*d.groups()[:4])
            out["detect_to_commit_ms"] = dt + 86400000 if dt < 0 else dt
    return out


class FrontierSampler:
    """Reads MNT/.modelfs/status (JSON made at open from the cache's live state) every interval
    s on a thread, until stop(), and keeps the blob's bytes_present and hash_frontier.
    (The file's user.modelfs.* xattrs are live only once the daemon's once-a-second sampler
    has seen the blob; before that they report the state file's numbers and a frontier of 0.)
    at_last_byte: the frontier in the first sample with every byte present (None if none)."""

    def __init__(self, mnt, digest, size, interval=0.01):
        self.path = os.path.join(mnt, ".modelfs", "status")
        self.digest, self.size, self.interval = "sha256:" + digest, size, interval
        self.samples = []  # (s since start, bytes present, hash frontier)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    status = json.loads(f.read())
                for b in status.get("blobs", []):
                    if b.get("digest") == self.digest:
                        self.samples.append((time.monotonic() - self._t0,
                                             int(b["bytes_present"]), int(b["hash_frontier"])))
            except (OSError, ValueError, KeyError, TypeError):
                pass
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def at_last_byte(self):
        for t, present, frontier in self.samples:
            if present >= self.size:
                return t, frontier
        return None, None


class Runner:
    def __init__(self, args, blob, hexd, work):
        self.args, self.blob, self.hexd, self.work = args, blob, hexd, work
        self.size = os.path.getsize(blob)
        self.dropped_all = True

    def prepare(self):
        for name in os.listdir(self.work):
            B.rm_rf(os.path.join(self.work, name))
        self.dropped_all &= True if self.args.no_drop_caches else B.drop_caches()
        B.warm(self.blob)

    def modelfs(self, server, variant, extra):
        """One cold modelfs run: mount, cat the file, wait for the commit. Keeps the cache."""
        self.prepare()
        server.requests_since_mark()
        raw0 = self.raw_log_lines(server)
        cache = os.path.join(self.work, "modelfs-cache")
        os.makedirs(cache)
        args = shlex.split(self.args.modelfs_args) + list(extra)
        t0 = time.monotonic()
        m = B.modelfs_mount(self.args.modelfs, server.url, cache, args)
        sampler = None
        try:
            sampler = FrontierSampler(m.mnt, self.hexd, self.size)
            cat = B.run(["cat", m.path(MODEL, "model.gguf")], timeout=self.args.timeout)
            data_s = time.monotonic() - t0
            committed = os.path.join(cache, "blobs", "sha256-" + self.hexd)
            ok = cat["rc"] == 0 and B.wait_file(committed, max(1.0, self.args.timeout - data_s),
                                                 m.alive)
            total_s = time.monotonic() - t0
            cpu = m.cpu_s() if m.alive() else float("nan")
            rss = m.hwm_kib() if m.alive() else 0
        finally:
            if sampler:
                sampler.stop()
            m.stop()
        time.sleep(0.2)  # the server logs a response once its socket has drained
        text = m.log_text()
        logf = os.path.join(self.args.logdir, "modelfs-%s-%d.log" % (variant, int(t0 * 1000)))
        with open(logf, "w") as f:
            f.write(text)
        entries = server.requests_since_mark()
        with open(server.access_log_path) as src, open(logf[:-len(".log")] + ".access", "w") as f:
            f.writelines(src.readlines()[raw0:])  # this run's requests, as the server wrote them
        reqs = [e for e in entries if "/blobs/sha256:" + self.hexd in e[0]]
        served = sum(e[2] for e in reqs)
        t_last, frontier_last = sampler.at_last_byte()
        r = {"variant": variant, "flags": args, "ok": ok, "timed_out": bool(cat["timed_out"]),
             "total_s": total_s, "data_s": data_s, "cpu_s": cpu, "rss_kib": rss,
             "requests": len(reqs), "served": served, "excess": served - self.size,
             "log": logf, "committed": committed if ok else None,
             "last_byte_s": t_last, "frontier_at_last_byte": frontier_last,
             "hashed_at_last_byte_pct": (100.0 * frontier_last / self.size
                                         if frontier_last is not None else None),
             "samples": sampler.samples[::5]}
        r.update(parse_log(text))
        if server.flip is not None:
            fl = server.flipped()
            r["flip_delivered"] = bool(fl and fl[1] > server.flip - fl[0])
        if not ok:
            r["note"] = "timeout" if cat["timed_out"] else (
                "cat rc=%d" % cat["rc"] if cat["rc"] else "not committed")
        B.log("  %s: mount->commit %.2fs (data %.2fs), last byte->commit %s ms (hashed %s, "
              "fsync %s, rename %s), hashed at the last byte %s%%, cpu %.2fs, %d requests, "
              "served %+.1f MiB beyond the blob%s%s"
              % (variant, total_s, data_s, r["x_ms"], r["hashed_ms"], r["fsync_ms"],
                 r["rename_ms"], fmt(r["hashed_at_last_byte_pct"], 0), cpu, len(reqs),
                 r["excess"] / B.MIB,
                 "" if ok else " FAILED " + r["note"],
                 (", flipped byte delivered: %s" % r["flip_delivered"])
                 if "flip_delivered" in r else ""))
        if r["detect_line"]:
            B.log("    " + r["detect_line"])
        if r["verified_line"]:
            B.log("    " + r["verified_line"])
        return r

    @staticmethod
    def raw_log_lines(server):
        try:
            with open(server.access_log_path) as f:
                return sum(1 for _ in f)
        except OSError:
            return 0

    def peer(self, tool, cache_state, path):
        """The verify pass of a download-then-verify client on path (warm or cold)."""
        if cache_state == "cold":
            dropped = True if self.args.no_drop_caches else B.drop_caches()
            self.dropped_all &= dropped
        else:
            B.warm(path)
        with tempfile.TemporaryFile() as out:
            r = B.run(PEER_CMD[tool] + [path], timeout=self.args.timeout, stdout=out)
            out.seek(0)
            words = out.read().split()
        got = ""
        for w in (words[-1:] if tool == "openssl" else words[:1]):
            got = w.decode(errors="replace")
        ok = r["rc"] == 0 and got == self.hexd
        B.log("  %s (%s): %.0f ms, cpu %.2fs %s" % (PEER_LABEL[tool], cache_state,
                                                    r["wall_s"] * 1000, r["cpu_s"],
                                                    "ok" if ok else "FAILED"))
        return {"tool": tool, "cache": cache_state, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                "ok": ok}


def med(rows, key):
    xs = [r[key] for r in rows if r.get(key) is not None and r[key] == r[key]]
    return B.median(xs) if xs else None


def fmt(x, nd=2):
    return "—" if x is None or x != x else "%.*f" % (nd, x)


def fmt_ms(x):
    return "—" if x is None or x != x else "%.0f" % x


def flip_offset(size, frac, bounds):
    """An offset near frac of size that is not on (or next to) any multiple of bounds."""
    off = int(size * frac) // 4096 * 4096 + 1234
    for b in bounds:
        if off % b < 4096 or off % b > b - 4096:
            off += 5 * B.MIB + 4321
    return min(off, size - 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant (median shown)")
    ap.add_argument("--parts", default="i,ii", help="i: last byte -> commit; ii: repair")
    ap.add_argument("--chunk-mib", type=int, default=64,
                    help="chunk size of the published chunk digests in (i)")
    ap.add_argument("--repair-chunk-mib", default="16,64",
                    help="chunk sizes compared with --chunksums off in (ii)")
    ap.add_argument("--flip-at", type=float, default=0.4,
                    help="(ii): where the bad byte is, as a fraction of the blob")
    ap.add_argument("--modelfs", default=B.default_modelfs())
    ap.add_argument("--modelfs-args", default="", help="extra mount flags for every run")
    ap.add_argument("--modelfs-rev", default=None,
                    help="the git revision the binary was built from, for the header (default: "
                    "this tree's `git describe --always --dirty`)")
    ap.add_argument("--part-mib", type=int, default=64,
                    help="modelfs's part (= repair piece) size, to keep the bad byte off its "
                    "boundaries (64 unless --modelfs-args sets --part-size)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per run (default: max(120, size in MiB / 8))")
    ap.add_argument("--no-drop-caches", action="store_true")
    B.add_report_args(ap)
    args = ap.parse_args()
    if args.timeout is None:
        args.timeout = max(120.0, args.size_mib / 8.0)
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in ("i", "ii"):
            ap.error("unknown part %s" % p)
    repair_chunks = [int(x) for x in args.repair_chunk_mib.split(",") if x]
    if not os.access(args.modelfs, os.X_OK):
        ap.error("no modelfs binary at %s (scripts/build build-bench, or --modelfs)"
                 % args.modelfs)

    blob, hexd = B.ensure_blob(args.size_mib)
    size = os.path.getsize(blob)
    for n in {args.chunk_mib, *repair_chunks}:
        B.ensure_chunksums(blob, n)  # before any timing
    flip = flip_offset(size, args.flip_at,
                       [args.part_mib * B.MIB] + [n * B.MIB for n in repair_chunks])
    work = tempfile.mkdtemp(prefix="modelfs-bench-verify-", dir=B.BENCH_CACHE)
    args.logdir = tempfile.mkdtemp(prefix="modelfs-bench-logs-")
    runner = Runner(args, blob, hexd, work)
    models = {MODEL: (blob, hexd)}
    runs, peers, repairs = [], [], []
    t_start = time.time()
    try:
        if "i" in parts:
            variants = [("off", ["--chunksums", "off"]), ("chunks%d" % args.chunk_mib, [])]
            with B.BlobServer(models, chunk_mib=args.chunk_mib) as server:
                for rep in range(args.repeat):
                    B.log("(i) rep %d" % (rep + 1))
                    for name, extra in variants:
                        r = runner.modelfs(server, name, extra)
                        r["rep"] = rep
                        runs.append(r)
                    committed = runs[-1]["committed"]
                    if not committed:
                        B.log("  no committed file: peers skipped")
                        continue
                    for tool, state in PEERS:
                        p = runner.peer(tool, state, committed)
                        p["rep"] = rep
                        peers.append(p)
        if "ii" in parts:
            variants = [("off", None, ["--chunksums", "off"])] + [
                ("chunks%d" % n, n, []) for n in repair_chunks]
            for rep in range(args.repeat):
                for name, cm, extra in variants:
                    for fault in (False, True):
                        B.log("(ii) rep %d: %s, %s" % (rep + 1, name,
                                                       "byte %d flipped" % flip if fault
                                                       else "no fault"))
                        for attempt in range(1, 4):
                            with B.BlobServer(models, chunk_mib=cm or repair_chunks[0],
                                              flip=flip if fault else None) as server:
                                r = runner.modelfs(server, name, extra)
                            # The fault lands only if modelfs wrote the flipped byte: a response
                            # it cancels may be acknowledged by TCP yet dropped unread, and an
                            # overlapping request may bring the byte first. No detection line:
                            # the run is redone.
                            if not fault or r["detect_line"] or not r["ok"]:
                                break
                            B.log("  no mismatch detected (flipped byte acknowledged by TCP: "
                                  "%s); again" % r["flip_delivered"])
                        r.update(rep=rep, fault=fault, attempts=attempt)
                        repairs.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total_bench = time.time() - t_start

    # ---- report -----------------------------------------------------------------------------
    lines = ["# modelfs verify benchmark, %s" % args.date, ""]
    if args.note:
        lines += ["**%s**" % args.note, ""]
    lines.append("- blob: %d MiB of random bytes (sha256 %s…) served on loopback without a cap "
                 "by bench/paced_server.py (sendfile from the page cache), with Ollama-style "
                 "chunk digests at `/v2/library/bench/chunksums/sha256:<hex>`"
                 % (args.size_mib, hexd[:12]))
    modelfs_path = os.path.abspath(args.modelfs)
    if modelfs_path.startswith(B.REPO_ROOT + os.sep):
        modelfs_path = os.path.relpath(modelfs_path, B.REPO_ROOT)
    lines.append("- %s (`%s`, built from git %s), mount flags: `%s`; bench at git %s"
                 % (B.tool_version([args.modelfs, "--version"]), modelfs_path,
                    args.modelfs_rev or B.git_rev(),
                    args.modelfs_args or "(defaults: 64M parts, 32 in flight)", B.git_rev()))
    lines.append("- peers: %s; %s" % (B.tool_version(["openssl", "version"]),
                                      B.tool_version(["sha256sum", "--version"])))
    lines.append("- machine: " + B.machine_line())
    lines.append("- page cache: %s before every modelfs run; the source blob then read once so "
                 "the server serves from memory"
                 % ("dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`)"
                    if runner.dropped_all and not args.no_drop_caches else "NOT dropped"))
    lines.append("- repetitions: %d per variant (medians shown, each column on its own); "
                 "total bench time %.0f s; modelfs logs in `%s`"
                 % (args.repeat, total_bench, args.logdir))
    lines.append("")

    if "i" in parts:
        lines.append("## (i) Last byte → committed")
        lines.append("")
        lines.append("modelfs: `cat MNT/bench:t/model.gguf > /dev/null` from a fresh mount "
                     "until `cache/blobs/sha256-<hex>` exists. \"Last byte → commit\" and its "
                     "parts are modelfs's own log line (`verified … X ms after the last byte "
                     "(hashed A ms, fsync B ms, rename C ms)`): hashed = the frontier's hashing "
                     "left after the last byte landed, fsync = the partial file made durable, "
                     "rename = the commit into blobs/ plus the directory fsyncs. Hashed at "
                     "the last byte = hash frontier / blob size in the first sample of "
                     "`MNT/.modelfs/status` (read every 10 ms during the run) with every byte "
                     "present. Mount → commit "
                     "is timed by the bench from the mount command; data = `cat` had every "
                     "byte; CPU = the daemon's user+sys; served = blob bytes the server sent "
                     "(over the blob size: fetched twice). Peers: the verify pass a "
                     "download-then-verify client (Ollama's \"verifying sha256 digest\") runs "
                     "after its last byte, timed as a whole process, on the file modelfs just "
                     "committed (same bytes, same disk): warm = the file in the page cache, as "
                     "right after a download; cold = after `drop_caches`, read back from disk.")
        lines.append("")
        lines.append("| modelfs | last byte → commit ms | hashed ms | fsync ms | rename ms | "
                     "hashed at the last byte | mount → commit s | data s | CPU s | served MiB "
                     "| chunks | ok |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                     "---: | --- |")
        vnames = [("off", "`--chunksums off` (blob digest only)"),
                  ("chunks%d" % args.chunk_mib, "%d MiB chunk digests" % args.chunk_mib)]
        xmed = {}
        for v, label in vnames:
            rs = [r for r in runs if r["variant"] == v]
            if not rs:
                continue
            xmed[v] = med(rs, "x_ms")
            xs = ", ".join(fmt_ms(r["x_ms"]) for r in rs)
            pct = ", ".join(fmt(r["hashed_at_last_byte_pct"], 0) for r in rs)
            lines.append("| %s | %s%s | %s | %s | %s | %s%%%s | %s | %s | %s | %.0f | %s | %s |"
                         % (label, fmt_ms(xmed[v]), " (%s)" % xs if len(rs) > 1 else "",
                            fmt_ms(med(rs, "hashed_ms")), fmt_ms(med(rs, "fsync_ms")),
                            fmt_ms(med(rs, "rename_ms")),
                            fmt(med(rs, "hashed_at_last_byte_pct"), 0),
                            " (%s)" % pct if len(rs) > 1 else "", fmt(med(rs, "total_s")),
                            fmt(med(rs, "data_s")), fmt(med(rs, "cpu_s")),
                            med(rs, "served") / B.MIB, med(rs, "chunks") or "—",
                            "yes" if all(r["ok"] for r in rs) else "**no**"))
        lines.append("")
        lines.append("| verify pass after the last byte | wall ms | CPU s | MB/s | ok |")
        lines.append("| --- | ---: | ---: | ---: | --- |")
        pmed = {}
        for tool, state in PEERS:
            ps = [p for p in peers if p["tool"] == tool and p["cache"] == state]
            if not ps:
                continue
            w = med(ps, "wall_s")
            pmed[(tool, state)] = w * 1000
            lines.append("| `%s FILE`, %s | %s%s | %s | %.0f | %s |"
                         % (" ".join(PEER_CMD[tool]), state, fmt_ms(w * 1000),
                            " (%s)" % ", ".join(fmt_ms(p["wall_s"] * 1000) for p in ps)
                            if len(ps) > 1 else "", fmt(med(ps, "cpu_s")), size / w / 1e6,
                            "yes" if all(p["ok"] for p in ps) else "**no**"))
        lines.append("")
        lines.append("Ratio: verify pass / modelfs last byte → commit (how many times longer a "
                     "download-then-verify client takes after its last byte; below 1×: modelfs "
                     "took longer after its last byte than a whole verify pass; modelfs's time "
                     "is taken as at least 1 ms):")
        lines.append("")
        lines.append("| verify pass | " + " | ".join("vs modelfs, " + label
                                                    for v, label in vnames if v in xmed) + " |")
        lines.append("| --- |" + " ---: |" * len(xmed))
        for tool, state in PEERS:
            if (tool, state) not in pmed:
                continue
            cells = []
            for v, _ in vnames:
                if v not in xmed:
                    continue
                x = xmed[v]
                cells.append("—" if x is None else "%.2f×" % (pmed[(tool, state)] / max(1.0, x)))
            lines.append("| `%s`, %s | %s |" % (" ".join(PEER_CMD[tool]), state, " | ".join(cells)))
        lines.append("")

    if "ii" in parts:
        piece = args.part_mib * B.MIB
        lines.append("## (ii) Repair one bad byte")
        lines.append("")
        lines.append("The server XORs byte %d (%.1f%% of the blob: inside %d MiB piece %d, %s) "
                     "with 0x01 in the first response to reach it; re-fetches get the right "
                     "byte. A fault run counts only if modelfs logged the bad byte (else it is "
                     "redone). Each variant runs once without the fault and once with it per "
                     "repetition, on a fresh server. Beyond the blob = body bytes the server "
                     "sent for the blob minus its size (its access log counts what the client's "
                     "TCP acknowledged; the no-fault run shows the baseline overlap of demand "
                     "reads and background parts). Re-fetched = modelfs's `verified` line: "
                     "bad chunks (`after re-fetching N bad chunk`) or pieces (`repaired after "
                     "re-fetching K of N pieces`). Detection → commit = from the log line that "
                     "noticed the bad byte (`does not match its chunk digest` or `digest "
                     "mismatch for`) to the `verified` line. Ollama, on a digest mismatch, "
                     "deletes the blob and downloads it again: 1× the blob size (%d MiB) more; "
                     "the last column is that over modelfs's bytes beyond the blob in the "
                     "fault run (its split-request overlap included, so a lower bound). Fault − "
                     "no fault "
                     "= the difference of the two medians: what the fault itself cost."
                     % (flip, 100.0 * flip / size, args.part_mib, flip // piece,
                        ", ".join("%d MiB chunk %d" % (n, flip // (n * B.MIB))
                                  for n in repair_chunks), args.size_mib))
        lines.append("")
        lines.append("| modelfs | beyond the blob MiB (no fault) | fault − no fault MiB | "
                     "re-fetched | detection → commit ms | last byte → commit ms | mount → "
                     "commit s (no fault) | fault / no fault | Ollama re-download / modelfs "
                     "extra bytes | ok |")
        lines.append("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        rvars = [("off", "`--chunksums off` (64 MiB pieces)")] + [
            ("chunks%d" % n, "%d MiB chunk digests" % n) for n in repair_chunks]
        picked = {}
        for v, label in rvars:
            fs = [r for r in repairs if r["variant"] == v and r["fault"]]
            ns = [r for r in repairs if r["variant"] == v and not r["fault"]]
            if not fs:
                continue
            mid = sorted(fs, key=lambda r: r["total_s"])[len(fs) // 2]
            picked[v] = mid
            if v == "off":
                refetched = ", ".join("%d of %d pieces" % (r["pieces_refetched"], r["pieces"])
                                      for r in fs)
            else:
                refetched = ", ".join("%d chunk%s" % (r["bad_chunks"],
                                                      "" if r["bad_chunks"] == 1 else "s")
                                      + (" + %d of %d pieces" % (r["pieces_refetched"],
                                                                r["pieces"])
                                         if r["pieces_refetched"] else "")
                                      + (" (distrusted)" if r["distrusted"] else "")
                                      for r in fs)
            ex = med(fs, "excess")
            ratio_t = (med(fs, "total_s") / med(ns, "total_s")) if ns else None
            ex0 = med(ns, "excess") if ns else None
            lines.append("| %s | %.1f (%s) | %s | %s | %s (%s) | %s | %s (%s) | %s | %s | %s |"
                         % (label, ex / B.MIB, fmt(ex0 / B.MIB if ex0 is not None else None, 1),
                            fmt((ex - ex0) / B.MIB if ex0 is not None else None, 1), refetched,
                            fmt_ms(med(fs, "detect_to_commit_ms")),
                            ", ".join(fmt_ms(r["detect_to_commit_ms"]) for r in fs),
                            fmt_ms(med(fs, "x_ms")), fmt(med(fs, "total_s")),
                            fmt(med(ns, "total_s")) if ns else "—",
                            "%.2f×" % ratio_t if ratio_t else "—",
                            "%.1f×" % (size / ex) if ex and ex > 0 else "—",
                            "yes" if all(r["ok"] and r["detect_line"] for r in fs)
                            else "**no**"))
        lines.append("")
        redone = sum(r["attempts"] - 1 for r in repairs if r["fault"])
        if redone:
            lines.append("%d fault run%s had to be redone because modelfs never saw the bad byte "
                         "(no detection line). This happens when the response carrying it was cut "
                         "by modelfs (TCP acknowledged it but the daemon never read it) or an "
                         "overlapping request delivered the byte first."
                         % (redone, "" if redone == 1 else "s"))
            lines.append("")
        lines.append("Detection → commit lists every run in parentheses. Without chunk "
                     "digests the mismatch is found after the whole blob was hashed, so that "
                     "span is the repair alone; with them the bad chunk is found while the "
                     "download is still running, so the span also holds the rest of the "
                     "download: compare mount → commit with the no-fault run instead. \"Last "
                     "byte\" in a repair is the last byte of the re-fetched chunk or piece. The "
                     "median fault run's log lines:")
        lines.append("")
        lines.append("```")
        for v, _ in rvars:
            r = picked.get(v)
            if r is None:
                continue
            for ln in r["warnings"][:4] + [r["verified_line"] or "(no verified line)"]:
                lines.append(ln if len(ln) <= 400 else ln[:400] + "…")
        lines.append("```")
        lines.append("")
        orders = [r["piece_order"] for r in repairs if r["fault"] and r["piece_order"]]
        if orders:
            lines.append("Pieces re-fetched, in order (`repairing …: re-fetching piece k` "
                         "lines), per fault run: " + "; ".join(
                             "%s: %s" % (r["variant"], ", ".join(map(str, r["piece_order"])))
                             for r in repairs if r["fault"] and r["piece_order"]) + ".")
            lines.append("")
    md = "\n".join(lines)
    print(md)

    if not args.no_write:
        tmpd = tempfile.mkdtemp(prefix="modelfs-bench-verify-json-")
        js = os.path.join(tmpd, "verify.json")
        with open(js, "w") as f:
            json.dump({"args": vars(args), "blob_size": size, "sha256": hexd, "flip": flip,
                       "modelfs_runs": runs, "peer_runs": peers, "repair_runs": repairs},
                      f, indent=1)
        for p in B.write_results("verify", args.date, md, [("json", js)]):
            B.log("wrote " + p)
        B.update_readme("verify", B.demote_headings(md))
        shutil.rmtree(tmpd, ignore_errors=True)
    B.log("modelfs logs kept in " + args.logdir)


if __name__ == "__main__":
    main()
