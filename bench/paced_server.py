#!/usr/bin/env python3
"""paced_server.py: a static HTTP/1.1 file server whose per-connection rate cap is enforced by
the kernel's TCP pacing (SO_MAX_PACING_RATE), for bench/ (Python 3 stdlib).

Why not nginx `limit_rate`: nginx computes a request's allowance as
rate * (now_s - start_s + 1) - sent, so every response may send one second's worth of bytes at
once (ngx_http_write_filter_module.c). A client that splits a blob into requests of at most
`rate` bytes (25 MiB at 25m) is then not capped at all, and one with 64 MiB parts is capped
only partly; per-connection caps of real CDNs have no such per-request burst. Here every
connection's socket is paced by TCP itself at the cap (a smooth rate from the first byte,
measured 25.2 MiB/s at 25 MiB/s on loopback), and bodies go out with sendfile(2) from the
page cache, like nginx's `sendfile on`.

Serves GET and HEAD of files under --root (symlinks followed), a single "Range: bytes=a-b",
"a-" or "-n" (206 + Content-Range, 416 when unsatisfiable), keep-alive, and a plain HTML
listing for directory paths ending in "/" (what rclone's :http: backend reads). Paths ending
in "/manifests/<tag>" get the Docker v2 manifest Content-Type; "/v2/" answers "{}".

Rates (bytes/s, per request, set on the connection before the body is sent):
  --rate R             every request (0 = no cap)
  --slow-share P       with probability P (0..1) a request is sent at --slow-rate instead,
  --slow-rate S        drawn per request from a PRNG seeded with --seed (nginx's
                       split_clients on $request_id, reproducibly)
Fault injection (bench/verify_bench.py):
  --flip OFFSET        the first response to reach byte OFFSET of its file (any file; one per
                       server process, whichever thread gets there first) sends that byte
                       XORed with 0x01. A response covering OFFSET goes out with sendfile up
                       to it; there it takes the flip (under the lock) or not, sends the byte
                       by pread/modify/write if it did, and sendfile carries on after it, at
                       the same pacing. Every other response, including later ones covering
                       OFFSET (the client's re-fetch), is unchanged. The flip is taken at the
                       byte, not when the response starts, because a client may cut a part
                       before it reaches OFFSET (modelfs splits the tail of a part it is
                       waiting for): "first response covering OFFSET" would then waste the
                       fault. The response that took it ends its access-log line with
                       "flip=<OFFSET>".
Prints "PORT <n>" on stdout once listening on 127.0.0.1:<free port>. Appends one line per
request to --access-log: "<path> <status> <body bytes> <range or -> <rate> <t_begin> <t_end>"
(body bytes: what the client's TCP acknowledged if it went away mid-body; CLOCK_MONOTONIC s),
plus " flip=<OFFSET>" on the flipped response (the client's TCP acknowledged the flipped byte
if body bytes > OFFSET - range start; a client that cancels may still drop it unread).
Runs until SIGTERM. Thread per connection (ThreadingHTTPServer).
"""
import argparse
import email.utils
import html
import http.server
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "integration"))
from harness import parse_range  # noqa: E402  (one Range parser for the bench and the tests)

SO_MAX_PACING_RATE = 47  # <asm-generic/socket.h>
UNLIMITED = 0xFFFFFFFF   # ~0U: no pacing cap
MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"


def bytes_acked(sock):
    """tcp_info.tcpi_bytes_acked (offset 120, Linux >= 4.1): bytes the peer acknowledged."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        return struct.unpack_from("=Q", info, 120)[0] if len(info) >= 128 else 0
    except OSError:
        return 0


def bytes_acked_pending(sock, acked0):
    """Header bytes just written: tcpi_bytes_sent (offset 200) would say, but is newer (4.19);
    use the send-queue size (SIOCOUTQ) plus what was already acknowledged."""
    return outq(sock) + bytes_acked(sock) - acked0


def outq(sock):
    try:
        import fcntl
        import termios
        return struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


def drain(sock, timeout=600):
    """Waits until the send queue is empty, the peer closed, or timeout seconds passed."""
    import select
    deadline = time.monotonic() + timeout
    while outq(sock) > 0 and time.monotonic() < deadline:
        try:
            r, _, _ = select.select([sock], [], [], 0.002)
            if r and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                return  # peer closed
        except BlockingIOError:
            pass
        except OSError:
            return


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--rate", type=int, default=0)
    ap.add_argument("--slow-share", type=float, default=0.0)
    ap.add_argument("--slow-rate", type=int, default=200 * 1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--access-log", required=True)
    ap.add_argument("--flip", type=int, default=None, metavar="OFFSET",
                    help="XOR byte OFFSET with 0x01 in the first response to reach it")
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    rng = random.Random(args.seed)
    lock = threading.Lock()
    log = open(args.access_log, "a", buffering=1)
    flip_pending = [args.flip is not None]  # written under lock; read unlocked only as a hint

    def take_flip():
        """True for the one response (the first to ask) that is about to send byte --flip."""
        with lock:
            mine, flip_pending[0] = flip_pending[0], False
        return mine

    def pick_rate():
        with lock:
            slow = args.slow_share > 0 and rng.random() < args.slow_share
        return args.slow_rate if slow else args.rate

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "paced"

        def log_message(self, *a):
            pass

        def do_GET(self):
            self.handle_one(body=True)

        def do_HEAD(self):
            self.handle_one(body=False)

        def record(self, path, status, sent, rng_header, rate, extra=""):
            now = time.monotonic()
            with lock:
                log.write("%s %d %d %s %d %.4f %.4f%s\n"
                          % (path, status, sent, rng_header or "-", rate,
                             getattr(self, "t_begin", now), now, extra))

        def small(self, status, data, ctype="text/plain", body=True, extra=None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def handle_one(self, body):
            self.t_begin = time.monotonic()
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            rng_header = self.headers.get("Range")
            if path == "/v2/":
                self.record(path, 200, 2, rng_header, 0)
                return self.small(200, b"{}", "application/json", body)
            full = os.path.join(root, path.lstrip("/"))  # symlinks inside root are followed
            if ".." in path.split("/"):
                self.record(path, 404, 0, rng_header, 0)
                return self.small(404, b"not found\n", body=body)
            if path.endswith("/") and os.path.isdir(full):
                names = sorted(os.listdir(full))
                page = "<html><body><pre>\n" + "".join(
                    '<a href="%s">%s</a>\n' % (urllib.parse.quote(n), html.escape(n))
                    for n in names) + "</pre></body></html>\n"
                self.record(path, 200, len(page), rng_header, 0)
                return self.small(200, page.encode(), "text/html", body)
            try:
                fd = os.open(os.path.join(root, path.lstrip("/")), os.O_RDONLY)
            except OSError:
                self.record(path, 404, 0, rng_header, 0)
                return self.small(404, b"not found\n", body=body)
            try:
                self.send_file(fd, path, rng_header, body)
            finally:
                os.close(fd)

        def send_file(self, fd, path, rng_header, body):
            st = os.fstat(fd)
            size = st.st_size
            start, end, status = parse_range(rng_header, size)
            if status == 416:
                self.record(path, 416, 0, rng_header, 0)
                return self.small(416, b"", body=body,
                                  extra={"Content-Range": "bytes */%d" % size})
            length = end - start + 1
            ctype = MANIFEST_MEDIA if "/manifests/" in path else "application/octet-stream"
            rate = pick_rate() if body else 0
            self.connection.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE,
                                       struct.pack("=I", rate if rate > 0 else UNLIMITED))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            if status == 206:
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
            acked0 = bytes_acked(self.connection)
            self.end_headers()  # headers leave in one write: count them out below
            header_len = bytes_acked_pending(self.connection, acked0)
            sent = 0
            flipped = False
            flip_here = args.flip is not None and start <= args.flip <= end
            if body:
                out = self.connection.fileno()
                try:
                    while sent < length:
                        pos = start + sent
                        if flip_here and pos == args.flip and not flipped and take_flip():
                            byte = bytearray(os.pread(fd, 1, pos))
                            byte[0] ^= 0x01
                            self.connection.sendall(byte)
                            sent += 1
                            flipped = True
                            continue
                        n = length - sent
                        if flip_here and pos < args.flip and flip_pending[0]:
                            n = args.flip - pos  # stop at the byte to take the flip there
                        n = os.sendfile(out, fd, pos, min(n, 64 << 20))
                        if n == 0:
                            break
                        sent += n
                except OSError:  # the client went away (cancelled part, timeout)
                    self.close_connection = True
                # sendfile() returns once bytes are queued in the socket buffer (up to a few
                # MiB), which a client that cancels never receives: wait until the queue has
                # drained or the client is gone, and count what its TCP acknowledged.
                drain(self.connection)
                sent = min(sent, max(0, bytes_acked(self.connection) - acked0 - header_len))
            self.record(path, status, sent, rng_header, rate,
                        " flip=%d" % args.flip if flipped else "")

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                super().handle_error(request, client_address)

    httpd = Server(("127.0.0.1", 0), Handler)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    print("PORT %d" % httpd.server_address[1], flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
