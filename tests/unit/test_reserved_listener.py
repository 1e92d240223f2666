"""A listener out of descriptors: the reserve first, then patience, reported once per episode (not trio's error
line every 100 ms)."""

import errno

import pytest
import trio

from sidecard.process import ACCEPT_RETRY_S, FdReserve, ReservedListener


class Exhausted(trio.abc.Listener):
    """accept(2) failing with EMFILE `failures` times, then a connection."""

    def __init__(self, failures: int, error: int = errno.EMFILE) -> None:
        self.failures = failures
        self.error = error

    async def accept(self):
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(self.error, "Too many open files")
        return "a connection"

    async def aclose(self):
        pass


async def test_an_episode_is_reported_once_as_it_begins_and_once_as_it_ends(autojump_clock):
    heard = []
    listener = ReservedListener(Exhausted(50), FdReserve(0), on_shortage=lambda error, s: heard.append((error and error.errno, s)))
    started = trio.current_time()
    assert await listener.accept() == "a connection"
    assert trio.current_time() - started == pytest.approx(50 * ACCEPT_RETRY_S)
    assert heard == [(errno.EMFILE, 0.0), (None, pytest.approx(50 * ACCEPT_RETRY_S))]
    assert await listener.accept() == "a connection" and len(heard) == 2  # nothing more once over


async def test_the_reserve_goes_first_and_other_errors_are_raised(autojump_clock):
    heard = []
    reserve = FdReserve(2)
    listener = ReservedListener(Exhausted(2), reserve, on_shortage=lambda *a: heard.append(a))
    assert await listener.accept() == "a connection" and heard == []  # two reserved descriptors let go, no wait
    assert reserve.held == 2  # and taken back
    reserve.close()
    with pytest.raises(OSError):
        await ReservedListener(Exhausted(1, errno.EBADF), FdReserve(0)).accept()
