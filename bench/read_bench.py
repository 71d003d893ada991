#!/usr/bin/env python3
"""read_bench.py: read-path latency through the mount (issue 5).

(i) Time to first byte. A random blob (--size-mib, default 1024) is published as a registry
    blob. Per round: a fresh cache dir, `modelfs mount --lazy` (no background fetch, so each
    read must fetch its own bytes), the file opened once (lookup + manifest, timed apart), then
    --reads-per-round 4 KiB preads at 4 KiB-aligned random offsets, one per stratum of
    size/reads (at least 16 MiB apart, so no read lands in bytes an earlier read's demand
    window or kernel readahead brought in), in shuffled order (no forward stream for
    readahead to detect). Each pread is timed; right after it, `curl -r` fetches the same
    4 KiB from the same server (new process, new connection; curl's own %{time_total} is the
    request time, the process wall time is shown too). A read counts as cold when the server
    logged new blob bytes for it; the bytes fetched per read are reported. Run per rate in
    --ttfb-rates (default "0,25m": no cap, and 25 MiB/s per connection).
(ii) llama.cpp cold start. A generated GGUF (--gguf-mib, default 512; harness.make_gguf) as a
    model layer, server capped at --rate (default 25m) per connection.
      cold modelfs: fresh cache, page cache dropped, `modelfs mount` (default flags), then
        scripts/llama/run.mjs MODEL --tokens 1; time to first token = from the mount command to
        run.mjs exiting after its first token (1 token: the process ends right after it).
      aria2c: `aria2c -x16 -s16` download, `sha256sum`, then run.mjs on the local file.
      warm: with the blob verified in modelfs's cache, run.mjs through a new mount against the
        local file, --warm-repeat times each, page cache dropped before each pair ("cold page
        cache") and again right after in the same mount ("hot page cache"); medians.
Writes bench/results/read-<date>.{md,json} and read-latest.{md,json}.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

H = B.harness
MODEL = "bench:t"
LLAMA_MODEL = "llama:t"
RUN_MJS = os.path.join(B.REPO_ROOT, "scripts", "llama", "run.mjs")


def fmt_ms(x):
    return "—" if x is None or x != x else "%.1f" % x


# ---- (i) time to first byte ------------------------------------------------------------------

def ttfb(args, blob, hexd, rate):
    size = os.path.getsize(blob)
    reads = max(1, min(args.reads_per_round, size // (16 * B.MIB)))
    stratum = size // reads
    rng = random.Random(args.seed)
    samples = []
    opens = []
    backend = args.server
    if backend == "auto":  # no cap: nginx (C, sub-ms per request); a cap: TCP pacing
        backend = "paced" if rate else "nginx"
    with B.BlobServer({MODEL: (blob, hexd)}, rate=rate or None, backend=backend) as server:
        url = server.blob_url(MODEL)
        for rnd in range(args.rounds):
            cache = tempfile.mkdtemp(prefix="modelfs-bench-cache-", dir=B.BENCH_CACHE)
            try:
                B.drop_caches()
                B.warm(blob)
                m = B.modelfs_mount(args.modelfs, server.url, cache, ["--lazy"])
                try:
                    t0 = time.monotonic()
                    fd = os.open(m.path(MODEL, "model.gguf"), os.O_RDONLY)
                    opens.append((time.monotonic() - t0) * 1000)
                    offsets = []
                    for k in range(reads):
                        lo = k * stratum + 4 * B.MIB
                        hi = (k + 1) * stratum - 4 * B.MIB - 4096
                        if hi <= lo:
                            lo, hi = k * stratum, (k + 1) * stratum - 4096
                        offsets.append(rng.randrange(lo, hi + 1) // 4096 * 4096)
                    rng.shuffle(offsets)
                    server.requests_since_mark()
                    for off in offsets:
                        t1 = time.monotonic()
                        data = os.pread(fd, 4096, off)
                        dt = (time.monotonic() - t1) * 1000
                        # The demand request is logged when it ends (its window may still be
                        # arriving): wait for it, so curl's request is not counted with it.
                        fetched, deadline = 0, time.monotonic() + 2
                        while time.monotonic() < deadline:
                            fetched += sum(e[2] for e in server.requests_since_mark()
                                           if "/blobs/" in e[0])
                            if fetched:
                                time.sleep(0.02)  # a window split over two requests
                                fetched += sum(e[2] for e in server.requests_since_mark()
                                               if "/blobs/" in e[0])
                                break
                            time.sleep(0.005)
                        c = curl_range(url, off)
                        time.sleep(0.005)
                        server.requests_since_mark()
                        samples.append({"round": rnd, "offset": off, "mount_ms": dt,
                                        "ok": len(data) == 4096, "fetched": fetched,
                                        "curl_ms": c["time_total_ms"],
                                        "curl_wall_ms": c["wall_ms"], "curl_ok": c["ok"]})
                    os.close(fd)
                finally:
                    m.stop()
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    return {"rate": rate or "none", "server": backend, "reads": samples, "open_ms": opens}


def curl_range(url, off):
    t0 = time.monotonic()
    r = subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-r", "%d-%d" % (off, off + 4095),
                        "-w", "%{time_total} %{size_download}", url],
                       capture_output=True, text=True, timeout=60)
    wall = (time.monotonic() - t0) * 1000
    try:
        total, size = r.stdout.split()
        return {"time_total_ms": float(total) * 1000, "wall_ms": wall,
                "ok": r.returncode == 0 and int(size) == 4096}
    except ValueError:
        return {"time_total_ms": float("nan"), "wall_ms": wall, "ok": False}


# ---- (ii) llama.cpp cold start and warm load -----------------------------------------------

def run_llama(path, timeout=900):
    """run.mjs with 1 token as a measured child; returns (Result, parsed JSON or None)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        r = B.run(["node", RUN_MJS, path, "--tokens", "1"], timeout=timeout, stdout=out,
                  stderr=err)
        out.seek(0)
        text = out.read().decode(errors="replace").strip()
        err.seek(0)
        etext = err.read().decode(errors="replace")[-1500:]
    try:
        j = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        j = None
        B.log("run.mjs failed (rc %s): %s" % (r["rc"], etext))
    return r, j


def llama(args):
    gguf = H.make_gguf(size_mib=args.gguf_mib, seed=7)
    os.chmod(gguf, 0o644)
    hexd = B.cached_sha256(gguf)
    work = tempfile.mkdtemp(prefix="modelfs-bench-read-", dir=B.BENCH_CACHE)
    res = {"gguf_mib": args.gguf_mib, "rate": args.rate}
    try:
        with B.BlobServer({LLAMA_MODEL: (gguf, hexd)}, rate=args.rate,
                          backend="paced" if args.server == "auto" else args.server) as server:
            cache = os.path.join(work, "cache")
            os.makedirs(cache)
            # cold modelfs
            B.drop_caches()
            B.warm(gguf)
            t0 = time.monotonic()
            m = B.modelfs_mount(args.modelfs, server.url, cache)
            try:
                r, j = run_llama(m.path(LLAMA_MODEL, "model.gguf"))
                ttft = time.monotonic() - t0
                committed = os.path.join(cache, "blobs", "sha256-" + hexd)
                ok = B.wait_file(committed, args.timeout, m.alive)
                verified = time.monotonic() - t0
                cpu = m.cpu_s() + r["cpu_s"]
            finally:
                m.stop()
            res["cold_modelfs"] = {"ttft_s": ttft, "verified_s": verified if ok else None,
                                   "cpu_s": cpu, "llama": j, "ok": j is not None and ok}
            B.log("cold modelfs: first token %.2fs, verified %.2fs, %s" % (ttft, verified, j))
            # aria2c + sha256sum + local load
            B.drop_caches()
            B.warm(gguf)
            dl = os.path.join(work, "dl")
            os.makedirs(dl)
            t0 = time.monotonic()
            d = B.run(["aria2c", "-x16", "-s16", "--file-allocation=falloc",
                       "--allow-overwrite=true", "--auto-file-renaming=false",
                       "--console-log-level=warn", "--summary-interval=0",
                       "--download-result=hide", "-d", dl, "-o", "model.gguf",
                       server.file_url(LLAMA_MODEL)], timeout=args.timeout)
            t_dl = time.monotonic() - t0
            with tempfile.TemporaryFile() as so:
                h = B.run(["sha256sum", os.path.join(dl, "model.gguf")], stdout=so)
                so.seek(0)
                hash_ok = so.read().split()[0].decode() == hexd
            t_hash = time.monotonic() - t0
            r2, j2 = run_llama(os.path.join(dl, "model.gguf"))
            total = time.monotonic() - t0
            res["aria2"] = {"download_s": t_dl, "sha256_s": t_hash - t_dl,
                            "load_s": total - t_hash, "ttft_s": total,
                            "cpu_s": d["cpu_s"] + h["cpu_s"] + r2["cpu_s"], "llama": j2,
                            "ok": hash_ok and j2 is not None}
            B.log("aria2c path: first token %.2fs (download %.2f, sha256 %.2f)"
                  % (total, t_dl, t_hash - t_dl))
            same = (j is not None and j2 is not None and j["tokens"] == j2["tokens"])
            res["same_tokens"] = same
            shutil.rmtree(dl, ignore_errors=True)
            # warm: blob verified in the cache
            warm = {"mount_cold_pc": [], "local_cold_pc": [], "mount_hot_pc": [],
                    "local_hot_pc": []}
            for _ in range(args.warm_repeat):
                B.drop_caches()
                m = B.modelfs_mount(args.modelfs, server.url, cache)
                try:
                    path = m.path(LLAMA_MODEL, "model.gguf")
                    os.stat(path)  # the lookup (manifest from the cache) is not the load
                    for key in ("mount_cold_pc", "mount_hot_pc"):
                        r3, j3 = run_llama(path)
                        warm[key].append({"wall_s": r3["wall_s"], "llama": j3})
                finally:
                    m.stop()
                B.drop_caches()
                for key in ("local_cold_pc", "local_hot_pc"):
                    r4, j4 = run_llama(gguf)
                    warm[key].append({"wall_s": r4["wall_s"], "llama": j4})
            res["warm"] = warm
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


# ---- report ----------------------------------------------------------------------------------

def report(args, ttfbs, ll, t_start):
    L = []
    L.append("# modelfs read-path benchmark, %s" % args.date)
    L.append("")
    if args.note:
        L += ["**%s**" % args.note, ""]
    L.append("- modelfs `%s`, git %s; servers on loopback, sendfile from the page cache: "
             "`paced` = bench/paced_server.py (cap per connection by TCP pacing), `nginx` = "
             "nginx (used without a cap)" % (os.path.relpath(args.modelfs, B.REPO_ROOT),
                                             B.git_rev()))
    L.append("- machine: " + B.machine_line())
    L.append("- total bench time %.0f s" % (time.time() - t_start))
    L.append("")
    if ttfbs:
        L.append("## (i) Time to first byte: 4 KiB preads at random offsets, cold")
        L.append("")
        L.append("%d MiB random blob; per round a fresh cache and a fresh `modelfs mount --lazy`; "
                 "reads ≥ 16 MiB apart in shuffled order; curl fetches the same 4 KiB range from "
                 "the same server right after each read (curl time = its `%%{time_total}`, a new "
                 "connection each time; curl process = the whole `curl` process)."
                 % args.size_mib)
        L.append("")
        L.append("| cap (server) | reads (cold) | mount median ms | mount p99 ms | curl median ms | "
                 "curl p99 ms | curl process median ms | ratio median | ratio p99 | "
                 "fetched per read KiB (median) | first open ms (median) |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for t in ttfbs:
            rs = [s for s in t["reads"] if s["ok"] and s["curl_ok"]]
            cold = [s for s in rs if s["fetched"] > 0]
            mm = [s["mount_ms"] for s in rs]
            cm = [s["curl_ms"] for s in rs]
            cw = [s["curl_wall_ms"] for s in rs]
            med_r = B.median(mm) / B.median(cm) if cm else float("nan")
            p99_r = B.percentile(mm, 99) / B.percentile(cm, 99) if cm else float("nan")
            t["ratio_median"], t["ratio_p99"] = med_r, p99_r
            L.append("| %s | %d (%d) | %s | %s | %s | %s | %s | %.1f× | %.1f× | %.0f | %s |"
                     % ("%s (%s)" % (t["rate"], t["server"]), len(rs), len(cold), fmt_ms(B.median(mm)),
                        fmt_ms(B.percentile(mm, 99)), fmt_ms(B.median(cm)),
                        fmt_ms(B.percentile(cm, 99)), fmt_ms(B.median(cw)), med_r, p99_r,
                        B.median([s["fetched"] for s in rs]) / 1024 if rs else 0,
                        fmt_ms(B.median(t["open_ms"]))))
        L.append("")
        for t in ttfbs:
            L.append("- target, cap %s: mount ≤ 3× curl: median %.1f× (%s), p99 %.1f× (%s)"
                     % (t["rate"], t["ratio_median"],
                        "met" if t["ratio_median"] <= 3 else "NOT met", t["ratio_p99"],
                        "met" if t["ratio_p99"] <= 3 else "NOT met"))
        L.append("")
    if ll:
        L.append("## (ii) llama.cpp (node-llama-cpp, mmap, CPU, 1 thread): time to first token")
        L.append("")
        L.append("%d MiB generated GGUF (scripts/make-gguf, seed 7); server capped at %s per "
                 "connection; page cache dropped before each cold run; the source is then read "
                 "once so the server serves from memory. run.mjs generates 1 token, so its "
                 "process ends right after the first token." % (ll["gguf_mib"], ll["rate"]))
        L.append("")
        c, a = ll["cold_modelfs"], ll["aria2"]
        L.append("| path | first token s | of which | CPU s | load_ms / first_token_ms (run.mjs) |")
        L.append("| --- | ---: | --- | ---: | --- |")
        lj = c["llama"] or {}
        L.append("| modelfs mount, cold cache | %.2f | whole blob verified by %s s (checked once "
                 "run.mjs exited) | %.2f | %s / %s |"
                 % (c["ttft_s"], "%.2f" % c["verified_s"] if c["verified_s"] else "—",
                    c["cpu_s"], lj.get("load_ms"), lj.get("first_token_ms")))
        aj = a["llama"] or {}
        L.append("| aria2c -x16 -s16 + sha256sum + local load | %.2f | download %.2f, sha256sum "
                 "%.2f, load + 1 token %.2f | %.2f | %s / %s |"
                 % (a["ttft_s"], a["download_s"], a["sha256_s"], a["load_s"], a["cpu_s"],
                    aj.get("load_ms"), aj.get("first_token_ms")))
        L.append("")
        x = a["ttft_s"] / c["ttft_s"]
        L.append("- target: modelfs faster than aria2c + sha256sum + load: **%.2f× %s**; same "
                 "generated token from both: %s" % (x, "(met)" if x > 1 else "(NOT met)",
                                                    "yes" if ll["same_tokens"] else "**no**"))
        L.append("")
        w = ll["warm"]
        L.append("Warm cache (blob verified in modelfs's cache), %d repetitions, medians. Cold "
                 "page cache = caches dropped and a new mount; hot = the same run again at "
                 "once (same mount)." % args.warm_repeat)
        L.append("")
        L.append("| page cache | local wall s | mount wall s | ratio | local load_ms | "
                 "mount load_ms | local first_token_ms | mount first_token_ms |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for pc in ("cold_pc", "hot_pc"):
            lo, mo = w["local_" + pc], w["mount_" + pc]

            def med(xs, k):
                v = [x["llama"][k] for x in xs if x["llama"]]
                return B.median(v) if v else float("nan")
            lw, mw = B.median([x["wall_s"] for x in lo]), B.median([x["wall_s"] for x in mo])
            ll[pc + "_ratio"] = mw / lw
            L.append("| %s | %.2f | %.2f | %.2f× | %.0f | %.0f | %.0f | %.0f |"
                     % ("cold" if pc == "cold_pc" else "hot", lw, mw, mw / lw,
                        med(lo, "load_ms"), med(mo, "load_ms"), med(lo, "first_token_ms"),
                        med(mo, "first_token_ms")))
        L.append("")
        for pc in ("cold_pc", "hot_pc"):
            L.append("- target: warm mount ≤ 1.1× local disk (%s page cache): **%.2f× %s**"
                     % ("cold" if pc == "cold_pc" else "hot", ll[pc + "_ratio"],
                        "(met)" if ll[pc + "_ratio"] <= 1.1 else "(NOT met)"))
        L.append("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="blob for (i)")
    ap.add_argument("--rounds", type=int, default=4, help="(i): fresh mounts")
    ap.add_argument("--reads-per-round", type=int, default=64,
                    help="(i): capped at size/16 MiB")
    ap.add_argument("--ttfb-rates", default="0,25m", help="(i): caps, 0 = none")
    ap.add_argument("--gguf-mib", type=int, default=512, help="(ii): GGUF size")
    ap.add_argument("--rate", default="25m", help="(ii): cap per connection")
    ap.add_argument("--warm-repeat", type=int, default=3)
    ap.add_argument("--parts", default="ttfb,llama")
    ap.add_argument("--server", choices=["auto", "paced", "nginx"], default="auto",
                    help="auto: (i) without a cap on nginx, every capped run on paced_server.py")
    ap.add_argument("--modelfs", default=B.default_modelfs())
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    B.add_report_args(ap)
    args = ap.parse_args()
    if not os.access(args.modelfs, os.X_OK):
        ap.error("no modelfs binary at %s (scripts/build build-bench, or --modelfs)"
                 % args.modelfs)
    parts = args.parts.split(",")
    t_start = time.time()
    ttfbs, ll = [], None
    if "ttfb" in parts:
        blob, hexd = B.ensure_blob(args.size_mib)
        for rate in args.ttfb_rates.split(","):
            B.log("(i) time to first byte, cap %s ..." % rate)
            ttfbs.append(ttfb(args, blob, hexd, rate if rate != "0" else None))
    if "llama" in parts:
        B.log("(ii) llama.cpp cold start ...")
        ll = llama(args)
    md = report(args, ttfbs, ll, t_start)
    print(md)
    if not args.no_write:
        tmpd = tempfile.mkdtemp(prefix="modelfs-bench-")
        js = os.path.join(tmpd, "read.json")
        with open(js, "w") as f:
            json.dump({"args": vars(args), "ttfb": ttfbs, "llama": ll}, f, indent=1)
        for p in B.write_results("read", args.date, md, [("json", js)]):
            B.log("wrote " + p)
        B.update_readme("read", B.demote_headings(md))
        shutil.rmtree(tmpd, ignore_errors=True)


if __name__ == "__main__":
    main()
