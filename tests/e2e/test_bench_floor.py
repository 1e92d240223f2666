"""The floor proxy `bench/python_floor.py` compares sidecard with does the same exchange: an answer on each face."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import python_floor  # noqa: E402


@pytest.fixture
def sim_url() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "sidecard", "sim", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        yield re.search(r"on (http://\S+) ", proc.stderr.readline()).group(1)  # printed once the port listens
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


async def test_the_floor_proxy_answers_on_its_socket_and_on_http(sim_url, short_tmp, nursery):
    path = f"{short_tmp}/floor.sock"
    port = await nursery.start(partial(python_floor.serve, sim_url, path, 0))
    with trio.fail_after(10):
        async with await trio.open_unix_socket(path) as stream:
            await stream.send_all(python_floor.FRAME.replace('{"op"', '{"id":"a","op"').encode() + b"\n")
            line = b""
            while not line.endswith(b"\n"):
                line += await stream.receive_some()
        answer = msgspec.json.decode(line)
        assert answer["id"] == "a" and answer["ok"] and answer["text"]
        async with await trio.open_tcp_stream("127.0.0.1", port) as http:
            body = python_floor.BODY.encode()
            await http.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
                reply += await http.receive_some()
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and msgspec.json.decode(payload)["content"][0]["text"]
