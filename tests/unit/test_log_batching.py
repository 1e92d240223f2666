"""The log file's lines go out in batches from a background task, never from a request's path (issue 24)."""

from __future__ import annotations

import trio
import trio.testing

from sidecard.observe.log import JsonLog, LineBatcher


async def test_lines_are_written_together_after_the_interval(autojump_clock):
    writes: list[bytes] = []
    batcher = LineBatcher(writes.append, interval_s=0.02)
    batcher(b"before\n")  # not running yet: written at once (start-up failures must reach the file)
    assert writes == [b"before\n"]
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        log = JsonLog(batcher, wall_clock=lambda: 0.0)
        log.info("one", n=1)
        log.info("two", n=2)
        assert len(writes) == 1  # nothing written on the caller's path
        await trio.sleep(0.03)
        assert len(writes) == 2 and writes[1].count(b"\n") == 2
        assert writes[1].startswith(b'{"ts":"1970-01-01T00:00:00.000Z","level":"info","event":"one","n":1}\n')
        log.info("last")
        nursery.cancel_scope.cancel()
    assert writes[-1].endswith(b'"event":"last"}\n')  # flushed when the task ends
    batcher(b"after\n")
    assert writes[-1] == b"after\n"


async def test_a_large_batch_is_written_at_once(autojump_clock):
    writes: list[bytes] = []
    batcher = LineBatcher(writes.append, max_bytes=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for _ in range(5):
            batcher(b"x" * 30 + b"\n")
        assert writes == [(b"x" * 30 + b"\n") * 4]  # over 100 bytes: no waiting for the interval
        nursery.cancel_scope.cancel()
    assert writes[-1] == b"x" * 30 + b"\n"


async def test_a_broken_destination_fails_nothing(autojump_clock):
    def broken(line: bytes) -> None:
        raise OSError("disk full")

    batcher = LineBatcher(broken)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        batcher(b"line\n")
        await trio.sleep(1)
        nursery.cancel_scope.cancel()


async def test_a_line_from_another_thread_is_handed_to_the_loop(autojump_clock):
    """watchfiles logs each change from its worker thread; the batcher set a trio.Event there and the daemon died
    on every edit of the prompt directory (a fresh-clone trial)."""
    writes: list[bytes] = []
    batcher = LineBatcher(writes.append, interval_s=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await trio.to_thread.run_sync(batcher, b"from a worker\n")
        await trio.sleep(0.03)
        assert writes == [b"from a worker\n"]
        nursery.cancel_scope.cancel()
