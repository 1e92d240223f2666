"""The SDK drop-in, continued: what the official `anthropic` SDK sees of deadlines, failures, betas, named models and
streams when it talks to sidecard's HTTP face."""

import anthropic
import pytest
import trio

from sidecard.sim import Fault
from tests.e2e.test_httpface import ASK, FALLBACK, PRIMARY, async_client


async def test_requests_whose_deadline_passes_before_any_attempt_are_504_deadline_exceeded(daemon_factory, sim):
    """Real time, as on the socket: concurrent SDK calls with 1-5 ms deadlines. Before the fix some were a 500."""
    d = await daemon_factory()
    sim.set_fault("*", Fault(hang=True))
    statuses: list[tuple[int, str]] = []
    async with async_client(d) as client:

        async def one(i: int) -> None:
            try:
                await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK,
                                             extra_headers={"x-sidecard-deadline-ms": str(1 + i % 5), "x-sidecard-cache": "bypass"})
            except anthropic.APIStatusError as exc:
                statuses.append((exc.status_code, exc.response.headers["x-sidecard-error-code"]))

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
    assert set(statuses) == {(504, "deadline_exceeded")} and len(statuses) == 40
