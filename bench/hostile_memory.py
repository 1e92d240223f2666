"""Memory under half-sent requests: the daemon's RSS while clients hold large incomplete requests, and after.

    .venv/bin/python bench/hostile_memory.py [--clients 8] [--mb 30]

Each client sends all but the end of a large request and then waits: an HTTP body on the HTTP face, and a
frame (after a `hello` raising its frame limit) on the app socket. The daemon's resident memory is printed
at rest, while the clients hold their requests, and after they have gone. `server.max_incomplete_bytes`
(128 MiB by default) bounds the middle figure; the last one shows whether the memory went back.
"""

from __future__ import annotations

import argparse
import socket
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mb", type=int, default=30)
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


if __name__ == "__main__":
    main()
