"""What the app faces share: the engine, draining, the work a drain waits for, and the one dispatch of a request.

A face (the NDJSON socket, the HTTP face) decodes a request, hands it to `answer` with a `Reply` that writes
the face's own encoding, and encodes what comes back: a token count, a stream's events and its end, a whole
answer, or a `SidecardError`. A drain stops new work (`draining`) and waits for what is in progress (`busy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import trio

from ..errors import SidecardError
from ..protocol import Complete, Completion, CountTokens
from ..streaming import StreamEvent

if TYPE_CHECKING:
    from ..engine import Engine


class Reply(Protocol):
    """One request's answer, written the face's own way."""

    async def tokens(self, count: int, model: str) -> None: ...

    async def event(self, event: StreamEvent) -> None:
        """A stream's event, as it comes."""
        ...

    async def done(self, completion: Completion) -> None:
        """A stream's end, after its events."""
        ...

    async def completion(self, completion: Completion) -> None: ...

    async def error(self, err: SidecardError) -> None:
        """The request failed (a stream's `PartialAnswer` after its first token included)."""
        ...


class Face:
    pings = False  # whether a stream relays the API's keep-alive pings

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.draining = False
        self.busy = _Busy()  # `with face.busy:` around work a drain waits for (an NDJSON connection, an HTTP request)

    async def answer(self, request: Complete, reply: Reply) -> None:
        """The one dispatch: a token count, a stream or a whole answer; a failure goes to `reply.error`."""
        engine = self.engine
        try:
            if isinstance(request, CountTokens):
                await reply.tokens(*await engine.count_tokens(request))
            elif request.stream:
                await reply.done(await engine.stream(request, reply.event, pings=self.pings))
            else:
                await reply.completion(await engine.complete(request))
        except SidecardError as err:
            await reply.error(err)

    def drain(self) -> None:
        """Take no new work; what is in progress finishes."""
        self.draining = True

    async def wait_idle(self) -> None:
        """Return once no work is in progress (after `drain()`)."""
        await self.busy.idle.wait()


class _Busy:
    """Counts the work in progress; `idle` is set while there is none. One per face, entered once per piece of
    work (a context manager of its own rather than a generator's: the HTTP face enters it for every request)."""

    __slots__ = ("count", "idle")

    def __init__(self) -> None:
        self.count = 0
        self.idle = trio.Event()
        self.idle.set()

    def __enter__(self) -> None:
        self.count += 1
        if self.count == 1:
            self.idle = trio.Event()

    def __exit__(self, *exc: object) -> None:
        self.count -= 1
        if not self.count:
            self.idle.set()
