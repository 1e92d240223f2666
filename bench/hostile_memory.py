"""Memory under hostile clients: half-sent requests, and a flood of feature names.

    .venv/bin/python bench/hostile_memory.py [--clients 8] [--mb 30] [--features 20000]

Each client sends all but the end of a large request and then waits: an HTTP body on the HTTP face, and a
frame (after a `hello` raising its frame limit) on the app socket. The daemon's resident memory is printed
at rest, while the clients hold their requests, and after they have gone. `server.max_incomplete_bytes`
(128 MiB by default) bounds the middle figure; the last one shows whether the memory went back.

Then one client sends `--features` requests, each with a feature of its own: the daemon's resident memory and
the size of a /metrics scrape before and after (`requests.max_named_features` bounds both).
"""

from __future__ import annotations

import argparse
import re
import socket
import time
import urllib.request
from pathlib import Path

from _common import current_rss_mb, daemon, simulator


def settle() -> None:
    time.sleep(1.0)  # the daemon reads what was sent, or lets go of what it held


def hold_http(path: str, size: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: b\r\ncontent-length: %d\r\n\r\n" % (size + 1))
    s.sendall(b'{"pad":"' + b"x" * (size - 8))
    return s


def hold_frame(path: str, size: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b'{"op":"hello","id":1,"max_frame_bytes":%d}\n' % (size + 1024))
    s.recv(4096)
    s.sendall(b'{"op":"ping","id":2,"pad":"' + b"x" * (size - 30))
    return s


def flood_features(path: str, count: int, batch: int = 500) -> None:
    """COUNT requests on one connection, each with a feature of its own, BATCH pipelined at a time."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        for start in range(0, count, batch):
            s.sendall(b"".join(
                b'{"op":"complete","id":%d,"feature":"f%d","max_tokens":2,"messages":[{"role":"user","content":"c"}]}\n' % (n, n)
                for n in range(start, min(count, start + batch))
            ))
            replies = b""
            while replies.count(b"\n") < min(batch, count - start):
                replies += s.recv(1 << 16)


def scrape(app_path: str) -> bytes:
    config = (Path(app_path).parent / "sidecard.toml").read_text()
    address = re.search(r'\[metrics\]\naddress = "([^"]+)"', config).group(1)  # type: ignore[union-attr]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        return response.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mb", type=int, default=30)
    parser.add_argument("--features", type=int, default=20_000)
    args = parser.parse_args()
    size = args.mb << 20
    with simulator() as (sim_url, _), daemon(sim_url) as (app_path, proc):
        http_path = str(Path(app_path).with_name("http.sock"))
        print(f"{args.clients} clients, {args.mb} MB each; daemon RSS in MB")
        for name, path, hold in (("HTTP bodies", http_path, hold_http), ("app frames", app_path, hold_frame)):
            settle()
            rest = current_rss_mb(proc.pid)
            held = []
            for _ in range(args.clients):
                try:
                    held.append(hold(path, size))
                except OSError:
                    continue  # refused and closed: the budget at work
            settle()
            holding = current_rss_mb(proc.pid)
            for s in held:
                s.close()
            settle()
            print(f"  {name:12} at rest {rest:6.0f}   holding {holding:6.0f}   after {current_rss_mb(proc.pid):6.0f}")
        if args.features:
            rest, before = current_rss_mb(proc.pid), scrape(app_path)
            started = time.perf_counter()
            flood_features(app_path, args.features)
            took = time.perf_counter() - started
            after = scrape(app_path)
            series = sum(1 for line in after.splitlines() if line and not line.startswith(b"#"))
            print(f"{args.features} features, one per request ({took:.0f} s): RSS at rest {rest:.0f} MB, after "
                  f"{current_rss_mb(proc.pid):.0f} MB; /metrics {len(before) >> 10} KB before, {len(after) >> 10} KB "
                  f"({series} series) after")


if __name__ == "__main__":
    main()
