#!/usr/bin/env python3
"""fetch_bench.py: whole-blob fetch time, modelfs against curl, aria2c and rclone (issue 3).

One random blob (--size-mib, default 1024) is served on loopback, one server per scenario:
  (a) no cap, (b) --rate per connection (default 25m = 25 MiB/s), (c) the same with
  --slow-share (default 5%) of requests crawling at --slow-rate (default 200k = 200 KiB/s).
  --server paced (default) enforces the cap with TCP pacing per connection (paced_server.py);
  --server nginx uses nginx limit_rate + split_clients on $request_id, whose per-request
  one-second allowance lets small range requests skip the cap (see README.md). The same file
  is published as /files/<name> (for curl, aria2c, rclone) and as the model layer of a
  registry manifest (for modelfs); see benchlib.BlobServer.

Per scenario and repetition, each tool turns the blob into verified bytes on local disk:
  modelfs  `modelfs mount -f` (defaults: 64M parts, 32 in flight); `cat MNT/bench:t/model.gguf
           > /dev/null`; done when cache/blobs/sha256-<hex> exists (digest matched, committed).
           Timed from the mount command (so manifest fetch and FUSE setup are included).
  curl     `curl -o FILE URL`, then `sha256sum FILE` (compared with the known digest).
  aria2    `aria2c -x16 -s16 --file-allocation=falloc`, then `sha256sum FILE`.
  rclone   `rclone mount :http: --vfs-cache-mode full`, then `sha256sum MNT/FILE` (the hash is
           computed while reading, so this is rclone's read time with the digest checked at
           the end, as a user verifying a pull would do; rclone itself checks nothing).
Before every run: previous outputs deleted, `sync; echo 3 > /proc/sys/vm/drop_caches`, then
the source blob is read once so nginx serves it from memory (a CDN edge, not this disk).

Prints and writes bench/results/fetch-<date>.{md,png,json} and fetch-latest.{md,png,json}.
Usage: bench/fetch_bench.py [--size-mib 1024] [--repeat 1] [--scenarios a,b,c] [--tools ...]
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

MODEL = "bench:t"
TOOLS = ["modelfs", "curl", "aria2", "rclone"]
TOOL_LABEL = {"modelfs": "modelfs", "curl": "curl + sha256sum",
              "aria2": "aria2c -x16 -s16 + sha256sum",
              "rclone": "rclone mount (vfs full) + sha256sum"}


def scenarios(args):
    rate_mib = args.rate.rstrip("mM")
    per = "connection" if args.server == "paced" else "request (nginx)"
    return {
        "a": {"title": "(a) no cap", "short": "(a) no cap", "rate": None, "slow": None},
        "b": {"title": "(b) %s MiB/s per %s" % (rate_mib, per),
              "short": "(b) %s MiB/s" % rate_mib, "rate": args.rate, "slow": None},
        "c": {"title": "(c) %s MiB/s, %s of requests at %s KiB/s" % (
                  rate_mib, args.slow_share, args.slow_rate.rstrip("kK")),
              "short": "(c) + %s slow" % args.slow_share, "rate": args.rate,
              "slow": args.slow_share},
    }


class Runner:
    def __init__(self, args, blob, hexd, work):
        self.args, self.blob, self.hexd, self.work = args, blob, hexd, work
        self.size = os.path.getsize(blob)

    def prepare(self):
        for name in os.listdir(self.work):
            B.rm_rf(os.path.join(self.work, name))
        dropped = True if self.args.no_drop_caches else B.drop_caches()
        B.warm(self.blob)
        return dropped

    def sha_check(self, path, timeout):
        r = B.run(["sha256sum", path], timeout=timeout, stdout=subprocess.PIPE)
        return r

    # Each returns a dict: data_s, wall_s, cpu_s, rss_kib, ok, note.
    def modelfs(self, server):
        cache = os.path.join(self.work, "modelfs-cache")
        os.makedirs(cache)
        extra = shlex.split(self.args.modelfs_args)
        t0 = time.monotonic()
        m = B.modelfs_mount(self.args.modelfs, server.url, cache, extra)
        try:
            path = m.path(MODEL, "model.gguf")
            cat = B.run(["cat", path], timeout=self.args.timeout)
            data_s = time.monotonic() - t0
            committed = os.path.join(cache, "blobs", "sha256-" + self.hexd)
            left = max(1.0, self.args.timeout - data_s)
            ok = cat["rc"] == 0 and B.wait_file(committed, left, m.alive)
            wall = time.monotonic() - t0
            cpu = m.cpu_s() + cat["cpu_s"] if m.alive() else float("nan")
            rss = max(m.hwm_kib() if m.alive() else 0, cat["maxrss_kib"])
            note = "" if ok else ("cat rc=%d" % cat["rc"] if cat["rc"] else "not committed")
            if cat["timed_out"] or (not ok and wall >= self.args.timeout):
                note = "timeout"
        finally:
            m.stop()
        log = m.log_text()
        events = [w for w in ("slow", "stall", "split", "retry", "re-request", "error", "warn")
                  if w in log.lower()]
        if events:
            note = (note + " " if note else "") + "log mentions: " + ",".join(events)
        with open(os.path.join(self.args.logdir, "modelfs-%d.log" % int(t0 * 1000)), "w") as f:
            f.write(log)
        return {"data_s": data_s, "wall_s": wall, "cpu_s": cpu, "rss_kib": rss, "ok": ok,
                "timed_out": cat["timed_out"] or note == "timeout", "note": note}

    def _download_then_hash(self, cmd, out):
        t0 = time.monotonic()
        d = B.run(cmd, timeout=self.args.timeout)
        data_s = time.monotonic() - t0
        if d["rc"] != 0 or not os.path.exists(out):
            return {"data_s": data_s, "wall_s": data_s, "cpu_s": d["cpu_s"],
                    "rss_kib": d["maxrss_kib"], "ok": False, "timed_out": d["timed_out"],
                    "note": "timeout" if d["timed_out"] else "rc=%d" % d["rc"]}
        with tempfile.TemporaryFile() as sha_out:
            h = B.run(["sha256sum", out], stdout=sha_out)
            sha_out.seek(0)
            got = sha_out.read().split()[0].decode()
        wall = time.monotonic() - t0
        ok = got == self.hexd
        return {"data_s": data_s, "wall_s": wall, "cpu_s": d["cpu_s"] + h["cpu_s"],
                "rss_kib": max(d["maxrss_kib"], h["maxrss_kib"]), "ok": ok,
                "timed_out": False, "note": "" if ok else "digest mismatch"}

    def curl(self, server):
        out = os.path.join(self.work, "curl.bin")
        return self._download_then_hash(
            ["curl", "-sS", "-f", "-o", out, server.file_url(MODEL)], out)

    def aria2(self, server):
        out = os.path.join(self.work, "aria2.bin")
        return self._download_then_hash(
            ["aria2c", "-x16", "-s16", "--file-allocation=falloc", "--allow-overwrite=true",
             "--auto-file-renaming=false", "--console-log-level=warn", "--summary-interval=0",
             "--download-result=hide", "-d", self.work, "-o", "aria2.bin",
             server.file_url(MODEL)], out)

    def rclone(self, server):
        conf = os.path.join(self.work, "rclone.conf")
        open(conf, "w").close()
        cache = os.path.join(self.work, "rclone-cache")
        t0 = time.monotonic()
        m = B.Daemon(["rclone", "mount", ":http:"],
                     ["--http-url", server.url + "/files/", "--config", conf,
                      "--vfs-cache-mode", "full", "--cache-dir", cache, "--read-only"],
                     name="rclone")
        try:
            with tempfile.TemporaryFile() as sha_out:
                h = B.run(["sha256sum", m.path(server.models[MODEL]["file"])],
                          timeout=self.args.timeout, stdout=sha_out)
                sha_out.seek(0)
                words = sha_out.read().split()
            wall = time.monotonic() - t0
            ok = h["rc"] == 0 and bool(words) and words[0].decode() == self.hexd
            cpu = m.cpu_s() + h["cpu_s"]
            rss = max(m.hwm_kib(), h["maxrss_kib"])
        finally:
            m.stop()
        note = "timeout" if h["timed_out"] else ("" if ok else "rc=%d / digest" % h["rc"])
        return {"data_s": wall, "wall_s": wall, "cpu_s": cpu, "rss_kib": rss, "ok": ok,
                "timed_out": h["timed_out"], "note": note}


def blob_requests(server, entries, slow_rate):
    """(count, bytes served, count sent at slow_rate or None) of requests for the blob."""
    reqs = [e for e in entries if e[0].endswith(server.models[MODEL]["file"]) or
            e[0].endswith("sha256:" + server.models[MODEL]["sha256"])]
    slow = None
    if slow_rate and server.backend == "paced":
        slow = sum(1 for e in reqs if e[4] == slow_rate)
    return len(reqs), sum(e[2] for e in reqs), slow


def fmt(x, nd=2):
    return "—" if x is None or x != x else ("%.*f" % (nd, x))


def chart(path_png, data_path, scen_keys, sc, tools, rows, size_mib, date, server):
    """Two clustered bar charts (wall, CPU), one group per scenario, one bar per tool."""
    walls = {(r["scenario"], r["tool"]): r for r in rows}
    finite = [r["wall_s"] for r in rows if not r["timed_out"] and r["wall_s"] == r["wall_s"]]
    ymax = max(finite) * 1.3 if finite else 10
    cpus = [r["cpu_s"] for r in rows if r["cpu_s"] == r["cpu_s"]]
    cmax = max(cpus) * 1.4 if cpus else 1
    with open(data_path, "w") as f:
        f.write("# scenario " + " ".join(tools) + " " + " ".join("cpu_" + t for t in tools) +
                " " + " ".join("lbl_" + t for t in tools) + "\n")
        for k in scen_keys:
            w, c, lbl = [], [], []
            for t in tools:
                r = walls.get((k, t))
                if r is None:
                    w.append("NaN"); c.append("NaN"); lbl.append('""')
                elif r["timed_out"] or not r["ok"]:
                    w.append("%.3f" % min(ymax * 0.97, r["wall_s"]))
                    c.append("%.3f" % r["cpu_s"] if r["cpu_s"] == r["cpu_s"] else "NaN")
                    lbl.append('">%.0f"' % r["wall_s"] if r["timed_out"] else '"fail"')
                else:
                    w.append("%.3f" % r["wall_s"]); c.append("%.3f" % r["cpu_s"])
                    lbl.append('"%.1f"' % r["wall_s"])
            f.write('"%s" %s %s %s\n' % (sc[k]["short"], " ".join(w), " ".join(c),
                                         " ".join(lbl)))
    n = len(tools)
    gap = 1
    offs = [(i - (n - 1) / 2) / (n + gap) for i in range(n)]
    colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"]
    wall_plots, cpu_plots = [], []
    for i, t in enumerate(tools):
        title = TOOL_LABEL[t]
        wall_plots.append("'%s' using %d:xtic(1) title '%s' lc rgb '%s'"
                          % (data_path, 2 + i, title, colors[i % 4]))
        cpu_plots.append("'%s' using %d:xtic(1) title '%s' lc rgb '%s'"
                         % (data_path, 2 + n + i, title, colors[i % 4]))
    for i in range(n):
        wall_plots.append("'' using ($0%+.3f):%d:%d with labels offset 0,0.7 font ',9' notitle"
                          % (offs[i], 2 + i, 2 + 2 * n + i))
        cpu_plots.append("'' using ($0%+.3f):%d:(sprintf('%%.1f', $%d)) with labels offset "
                         "0,0.7 font ',9' notitle" % (offs[i], 2 + n + i, 2 + n + i))
    script = f"""
set terminal pngcairo size 1400,560 font ',11'
set output '{path_png}'
set multiplot layout 1,2 title 'modelfs fetch benchmark: {size_mib} MiB random blob, {server} server on loopback ({date}); lower is better'
set style data histogram
set style histogram clustered gap {gap}
set style fill solid 0.85 border -1
set boxwidth 0.9
set key top left font ',10' opaque
set grid ytics
set xtics nomirror
set yrange [0:{ymax:.3f}]
set title 'Wall time to verified bytes on disk (s)'
set ylabel 'seconds'
plot {", ".join(wall_plots)}
set yrange [0:{cmax:.3f}]
set title 'CPU time, user+sys of every process of the tool (s)'
plot {", ".join(cpu_plots)}
unset multiplot
"""
    r = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
    if r.returncode != 0:
        B.log("gnuplot failed: " + r.stderr)
        return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and scenario (median)")
    ap.add_argument("--scenarios", default="a,b,c")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--rate", default="25m", help="nginx limit_rate per request in (b), (c)")
    ap.add_argument("--slow-share", default="5%")
    ap.add_argument("--slow-rate", default="200k")
    ap.add_argument("--server", choices=["paced", "nginx"], default="paced",
                    help="paced: per-connection cap by TCP pacing (default); nginx: limit_rate "
                    "per request (one second's worth of bytes unthrottled per response)")
    ap.add_argument("--seed", type=int, default=1, help="paced server: slow-request PRNG seed")
    ap.add_argument("--modelfs", default=B.default_modelfs())
    ap.add_argument("--modelfs-args", default="", help="extra mount flags, e.g. '--part-size 16M'")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per tool run (default: 4x the time at 25 MiB/s on 1 connection)")
    ap.add_argument("--no-drop-caches", action="store_true")
    B.add_report_args(ap)
    args = ap.parse_args()
    if args.timeout is None:
        args.timeout = max(60.0, 4 * args.size_mib / 25.0)
    tools = [t for t in args.tools.split(",") if t]
    for t in tools:
        if t not in TOOLS:
            ap.error("unknown tool %s" % t)
    if "modelfs" in tools and not os.access(args.modelfs, os.X_OK):
        ap.error("no modelfs binary at %s (scripts/build build-bench, or --modelfs)"
                 % args.modelfs)
    sc = scenarios(args)
    scen_keys = [k for k in args.scenarios.split(",") if k]

    blob, hexd = B.ensure_blob(args.size_mib)
    work = tempfile.mkdtemp(prefix="modelfs-bench-fetch-", dir=B.BENCH_CACHE)
    args.logdir = tempfile.mkdtemp(prefix="modelfs-bench-logs-")
    runner = Runner(args, blob, hexd, work)
    rows_all = []
    t_start = time.time()
    dropped_all = True
    try:
        for k in scen_keys:
            s = sc[k]
            with B.BlobServer({MODEL: (blob, hexd)}, rate=s["rate"], slow_share=s["slow"],
                              slow_rate=args.slow_rate, backend=args.server,
                              seed=args.seed) as server:
                for rep in range(args.repeat):
                    for t in tools:
                        dropped_all &= runner.prepare()
                        server.requests_since_mark()
                        B.log("%s rep %d: %s ..." % (s["title"], rep + 1, t))
                        r = getattr(runner, t)(server)
                        time.sleep(0.2)  # let nginx log requests closed at teardown
                        nreq, nbytes, nslow = blob_requests(server, server.requests_since_mark(),
                                                            B.parse_rate(args.slow_rate)
                                                            if s["slow"] else None)
                        r.update(scenario=k, tool=t, rep=rep, requests=nreq,
                                 bytes_served=nbytes, slow_requests=nslow)
                        B.log("  wall %.2fs (data %.2fs) cpu %.2fs rss %.0f MiB req %d "
                              "(slow %s) served %.0f MiB %s %s"
                              % (r["wall_s"], r["data_s"], r["cpu_s"], r["rss_kib"] / 1024,
                                 nreq, nslow, nbytes / B.MIB, "ok" if r["ok"] else "FAILED",
                                 r["note"]))
                        rows_all.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Median per (scenario, tool) over repetitions.
    rows = []
    for k in scen_keys:
        for t in tools:
            rs = [r for r in rows_all if r["scenario"] == k and r["tool"] == t]
            if not rs:
                continue
            mid = sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2]
            rows.append(dict(mid, all_walls=[round(r["wall_s"], 3) for r in rs]))
    by = {(r["scenario"], r["tool"]): r for r in rows}

    lines = []
    lines.append("# modelfs fetch benchmark, %s" % args.date)
    lines.append("")
    if args.note:
        lines.append("**%s**" % args.note)
        lines.append("")
    lines.append("- blob: %d MiB of random bytes (sha256 %s…) served on loopback with "
                 "sendfile from the page cache" % (args.size_mib, hexd[:12]))
    if args.server == "paced":
        lines.append("- server: bench/paced_server.py, cap per connection by TCP pacing "
                     "(SO_MAX_PACING_RATE, set per request); slow requests drawn with a PRNG "
                     "(seed %d). Rates: 25m = 25 MiB/s, 200k = 200 KiB/s" % args.seed)
    else:
        lines.append("- server: nginx, `limit_rate` per request (each response may send one "
                     "second's worth at full speed); slow requests by `split_clients` on "
                     "`$request_id`. Rates: 25m = 25 MiB/s, 200k = 200 KiB/s")
    lines.append("- scenarios: " + "; ".join(sc[k]["title"] for k in scen_keys))
    lines.append("- %s (`%s`), mount flags: `%s`; git %s"
                 % (B.tool_version([args.modelfs, "--version"]), os.path.relpath(
                     args.modelfs, B.REPO_ROOT), args.modelfs_args or "(defaults: 64M parts, "
                    "32 in flight)", B.git_rev()))
    lines.append("- peers: %s; %s; %s; sha256sum (coreutils)"
                 % (B.tool_version(["curl", "--version"]).split(" (")[0],
                    B.tool_version(["aria2c", "--version"]),
                    B.tool_version(["rclone", "version"])))
    lines.append("- machine: " + B.machine_line())
    lines.append("- page cache: %s before every run; the source blob then read once so the server "
                 "serves from memory" % ("dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`)"
                                         if dropped_all and not args.no_drop_caches
                                         else "NOT dropped"))
    lines.append("- repetitions: %d per tool and scenario (the median run is shown); timeout "
                 "%.0f s per run; total bench time %.0f s" % (args.repeat, args.timeout,
                                                              time.time() - t_start))
    lines.append("")
    lines.append("Wall = from starting the tool to verified bytes on local disk (modelfs: blob "
                 "committed in its cache after its own SHA-256 check; peers: after `sha256sum` "
                 "matched). Data = when the reader had every byte (modelfs: `cat` done; curl/"
                 "aria2c: download done). CPU = user+sys of all the tool's processes (daemons "
                 "from /proc/<pid>/stat at completion). Peak RSS = the largest of the tool's "
                 "processes (daemons: VmHWM; children: GNU time %M). Requests = blob requests "
                 "the server logged (in parentheses: how many were sent at the slow rate); "
                 "served = the bytes it sent for them (over the blob size = bytes fetched "
                 "twice).")
    lines.append("")
    lines.append("| scenario | tool | wall s | data s | CPU s | peak RSS MiB | requests "
                 "(slow) | served MiB | ok | note |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        wall = (">%.0f" % r["wall_s"]) if r["timed_out"] else fmt(r["wall_s"])
        if len(r["all_walls"]) > 1:
            wall += " (%s)" % ", ".join("%.1f" % w for w in r["all_walls"])
        reqs = "%d" % r["requests"]
        if r.get("slow_requests") is not None:
            reqs += " (%d)" % r["slow_requests"]
        lines.append("| %s | %s | %s | %s | %s | %.0f | %s | %.0f | %s | %s |"
                     % (sc[r["scenario"]]["title"], TOOL_LABEL[r["tool"]], wall,
                        fmt(r["data_s"]), fmt(r["cpu_s"]), r["rss_kib"] / 1024, reqs,
                        r["bytes_served"] / B.MIB, "yes" if r["ok"] else "**no**", r["note"]))
    lines.append("")
    lines.append("Ratios (peer wall / modelfs wall: how many times faster modelfs is; "
                 "a timed-out peer gives a lower bound):")
    lines.append("")
    lines.append("| scenario | " + " | ".join("vs " + TOOL_LABEL[t] for t in tools
                                               if t != "modelfs") + " |")
    lines.append("| --- |" + " ---: |" * (len(tools) - 1))
    verdicts = []
    for k in scen_keys:
        m = by.get((k, "modelfs"))
        cells = []
        for t in tools:
            if t == "modelfs":
                continue
            p = by.get((k, t))
            if m is None or p is None or not m["ok"]:
                cells.append("—")
            else:
                cells.append("%s%.2f×" % (">" if p["timed_out"] else "", p["wall_s"] / m["wall_s"]))
        lines.append("| %s | %s |" % (sc[k]["title"], " | ".join(cells)))
    lines.append("")
    mb, mc, ab = by.get(("b", "modelfs")), by.get(("c", "modelfs")), by.get(("b", "aria2"))
    if mb and ab and mb["ok"]:
        x = ab["wall_s"] / mb["wall_s"]
        verdicts.append("- target (b): modelfs ≥ 1.4× faster than aria2c -x16 -s16 + sha256sum: "
                        "**%.2f×, %s**" % (x, "met" if x >= 1.4 else "NOT met"))
    if mb and mc and mb["ok"] and mc["ok"]:
        x = mc["wall_s"] / mb["wall_s"]
        verdicts.append("- target (c): modelfs (c) within 1.15× of modelfs (b): **%.2f×, %s**"
                        % (x, "met" if x <= 1.15 else "NOT met"))
    lines += verdicts
    lines.append("")
    lines.append("![fetch benchmark](fetch-%s.png)" % args.date)
    lines.append("")
    md = "\n".join(lines)
    print(md)

    if not args.no_write:
        tmpd = tempfile.mkdtemp(prefix="modelfs-bench-chart-")
        png = os.path.join(tmpd, "fetch.png")
        js = os.path.join(tmpd, "fetch.json")
        with open(js, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "runs": rows_all},
                      f, indent=1)
        extra = [("json", js)]
        if chart(png, os.path.join(tmpd, "fetch.dat"), scen_keys, sc, tools, rows,
                 args.size_mib, args.date, args.server):
            extra.append(("png", png))
        for p in B.write_results("fetch", args.date, md, extra):
            B.log("wrote " + p)
        with open(os.path.join(B.RESULTS_DIR, "fetch-latest.md"), "w") as f:
            f.write(md.replace("(fetch-%s.png)" % args.date, "(fetch-latest.png)"))
        B.update_readme("fetch", B.demote_headings(
            md.replace("(fetch-%s.png)" % args.date, "(results/fetch-latest.png)")))
        shutil.rmtree(tmpd, ignore_errors=True)
    B.log("modelfs logs kept in " + args.logdir)


if __name__ == "__main__":
    main()
