"""What the app faces share: the engine, draining, the work a drain waits for, and the one dispatch of a request.

A face (the NDJSON socket, the HTTP face) decodes a request and hands it to `answer`, which returns what came of
it, a token count, a whole answer (a stream's, after its events went to the face's `emit`) or the `SidecardError`
it ended with; the face encodes each its own way. A drain stops new work (`draining`) and waits for what is in
progress (`busy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Union

import trio

from ..errors import Code, SidecardError, shutting_down
from ..protocol import Complete, Completion, CountTokens, Feedback, FeedbackReply, JobGet, JobOp, JobWait, Submit, TokenCount
from ..safety.access import ANYONE, AccessControl, Denied, Identity
from ..safety.settings import AccessSettings

if TYPE_CHECKING:
    from ..engine.jobs import JobDesk
    from ..loop.feedback import FeedbackDesk
    from ..engine.types import Emit, Trace
    from ..engine import Engine
    from ..jobs.store import JobView

# What came of a request: a whole answer, a token count, or its error (naming the request, once the engine began it).
Answer = Union[Completion, TokenCount, SidecardError]
# A request that comes while the daemon drains (one still running when the drain ends gets the engine's `STOPPED`).
DRAINING: Final = shutting_down("the daemon is shutting down")
LAST_WORD_S: Final = 0.1  # how long a request the drain stops may take to say so (a client not reading gets nothing)


class Face:
    pings = False  # whether a stream relays the API's keep-alive pings
    name = "socket"  # for the access metric

    def __init__(
        self, engine: Engine, access: AccessControl | None = None, feedback: FeedbackDesk | None = None, jobs: JobDesk | None = None
    ) -> None:
        self.engine = engine
        self.access = access or AccessControl(AccessSettings())  # who may call (off: everyone, as before)
        self.feedback = feedback
        self.jobs = jobs  # async jobs, when enabled
        self.draining = False
        self.busy = _Busy()  # `with face.busy:` around work a drain waits for (an NDJSON connection, an HTTP request)

    def refused(self, who: Identity | Denied) -> SidecardError | None:
        """A typed `forbidden` for a caller access control does not know."""
        if isinstance(who, Identity):
            return None
        self.engine.metrics.access_denied(self.name, who.key).inc()
        return SidecardError(Code.FORBIDDEN, who.message)

    async def answer(self, request: Complete, emit: Emit, identity: Identity = ANYONE, begun: Trace | None = None) -> Answer:
        """The one dispatch: a token count, a stream (its events through `emit`) or a whole answer; or the error.
        `begun`: the trace `begin` returned."""
        engine = self.engine
        try:
            if isinstance(request, CountTokens):
                return await engine.count_tokens(request, identity=identity, begun=begun)
            if request.stream:
                return await engine.stream(request, emit, pings=self.pings, identity=identity, begun=begun)
            return await engine.complete(request, identity=identity, begun=begun)
        except SidecardError as err:
            return err

    def begin(self, request: Complete, identity: Identity = ANYONE) -> Completion | SidecardError | Trace:
        """A whole answer at once (a cache hit, a kill switch's) or its error; else the trace `answer` continues
        (a stream's or a token count's before anything is done: they have no first step of their own), which names
        the request however it ends (`named`)."""
        if request.stream or isinstance(request, CountTokens):
            return self.engine.open(request, identity=identity)
        try:
            return self.engine.begin(request, identity=identity)
        except SidecardError as err:
            return err

    def take_feedback(self, request: Feedback) -> FeedbackReply | SidecardError:
        """Feedback on an answer: accepted, or the typed error saying why not."""
        if self.feedback is None:
            return SidecardError(Code.BAD_REQUEST, "feedback is not taken by this daemon")
        try:
            return self.feedback.accept(request)
        except SidecardError as err:
            return err

    async def job(self, request: JobOp, identity: Identity = ANYONE) -> list[JobView] | JobView | SidecardError:
        """A job op: the jobs a submit accepted (each authorised for IDENTITY as a request would be), or the job a
        `job` or `wait` names; or the error."""
        jobs = self.jobs
        if jobs is None:
            return SidecardError(Code.BAD_REQUEST, "async jobs are not enabled on this daemon ([jobs] enabled)")
        try:
            if isinstance(request, Submit):
                return await jobs.submit(request, identity)
            if isinstance(request, JobWait):
                return await jobs.wait(request.job, request.timeout_ms / 1000, identity)
            assert isinstance(request, JobGet)
            return await jobs.view(request.job, identity)
        except SidecardError as err:
            return err

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


def named(err: SidecardError, begun: Trace | None) -> SidecardError:
    """ERR, which a face says for a request the engine began and then stopped (a client's cancel, the drain's last
    word: the engine's own exit was a cancellation), naming the request as the engine's errors do."""
    return err if begun is None else err.of_request(begun.request_id, begun.upstream_request_id)
