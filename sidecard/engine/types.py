"""The engine's records: a request's plan, what happened to it on its way, and its end.

A `Plan` is decided before any upstream call (`plan.py`) and never changes; a step that needs another one (a soft
budget moving the request to a cheaper route, a stream's deadline after its first token) makes a new one. A
`Trace` is what happened, as it happened: the attempts, the walk's failures (`Failures`), what was paid (`Bill`),
and marks for the reply and the log line. `Finished` is a request at its end, as the accounting sinks get it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ..config import Route
from ..errors import SidecardError
from ..prompts.files import PromptVersion
from ..protocol import Attempt, Complete, Completion, TokenCount, Usage
from ..streaming import StreamEvent
from ..tracing.spans import SpanMarks

if TYPE_CHECKING:
    from ..limits.queue import Overloaded
    from ..traffic import Admission
    from ..upstream.errors import UpstreamError

Emit = Callable[[StreamEvent], Awaitable[None]]  # how a face sends a stream's events
TargetKey = tuple[str, str, str | None]  # provider, model, base_url


class Plan(msgspec.Struct, frozen=True, gc=False):  # (nothing it holds refers back to it)
    """What a request will do: its API body, its route, its deadline and whether its answer is cached."""

    request: Complete
    deadline: float
    body: dict[str, Any]
    headers: dict[str, str]  # the request's own anthropic-* headers, sent upstream
    route_name: str
    route: Route
    version: PromptVersion | None = None
    prompt: str | None = None  # the version's prompt name
    canary: bool = False
    cache_key: str | None = None
    cache_ttl_s: float = 0.0
    estimated_tokens: float = 0.0  # input (estimated) plus max_tokens: the most this request can use
    first_text: str = ""  # for the log line's redacted prefix
    experiment: str | None = None  # the experiment this request is in, and the arm serving it
    arm: str | None = None
    rollout: str | None = None  # a route's rollout: "stable" or "candidate"


class JobRun(msgspec.Struct, frozen=True):
    """The async job a request answers (`engine/jobs.py`): its id, the experiment arm it was assigned at submit
    (experiment, arm), which its run keeps, and its admission at submit (`traffic.Admission`), whose rate limits
    the run does not take again."""

    id: str
    arm: tuple[str, str] | None = None
    prepaid: Admission | None = None


def called(attempt: Attempt) -> bool:
    """Whether an attempt called its target: not one skipped for its open breaker, nor one its admission queue
    turned away (`overloaded:REASON`)."""
    return attempt.outcome != "breaker_open" and not attempt.outcome.startswith("overloaded")


def last_call(attempts: list[Attempt]) -> Attempt | None:
    """The last attempt that called its target (`called`)."""
    for attempt in reversed(attempts):
        if called(attempt):
            return attempt
    return None


class Failures(msgspec.Struct):
    """What the walk met, from which its final error is chosen (`walk.failure`)."""

    # Per target, its last failure as the client would be told it.
    causes: dict[TargetKey, SidecardError] = msgspec.field(default_factory=dict)
    last_error: UpstreamError | None = None
    refused: Overloaded | None = None  # the last target that turned the attempt away locally (queue, shedding)


class Bill(msgspec.Struct, gc=False):
    """Every upstream answer is paid for at its own model's price, a retried, resumed or broken one too."""

    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    spent_on: str | None = None  # the model of the last answer paid for


class Trace(msgspec.Struct):
    """One request on its way: what it asks, its plan once made, and what happened."""

    request: Complete
    request_id: str
    started: float
    internal: bool = False  # sidecard's own call (the judge): no retries, hedges, retry budget or shared breakers
    about: dict[str, str | int] | None = None  # an internal call's subject, for its log line (what the judge judged)
    plan: Plan | None = None
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    failures: Failures = msgspec.field(default_factory=Failures)
    bill: Bill = msgspec.field(default_factory=Bill)
    admission: Admission | None = None
    cache_result: str | None = None  # hit, miss, coalesced, stale, refresh, bypass
    killed_by: str | None = None
    ttft_ms: float | None = None  # streams: time to the first token
    resumed: bool = False  # streams: continued on another target after a failure
    output_problem: str | None = None  # the first answer broke the prompt's output format
    rejected: Completion | None = None  # the answer that ended in `bad_output`, for the quality signal
    safety: Any = None  # `engine.safety.Marks`: the caller's identity and what the safety rules did
    marks: SpanMarks | None = None  # tracing on: the request's trace ids and the times its spans need
    job: JobRun | None = None  # an async job's run or answer
    scope: Any = None  # the `trio.CancelScope` its answer runs in (under its deadline), once it has one
    cancelled: bool = False  # its client gave up (`cancel`)
    # The feature it is accounted under (metrics, log line, usage, quality, feedback, rate-limit and budget keys):
    # its own, or `names.OTHER` past requests.max_named_features. What looks a feature up reads the request's own.
    feature: str = "default"
    # The provider's request id of the last answer an upstream gave on the way (a failed attempt's, a stream's once
    # opened, a count's): what the request's error and log line name. A whole answer names its own (`Completion`).
    upstream_request_id: str | None = None

    @property
    def upstream_attempts(self) -> int:
        return sum(1 for a in self.attempts if a.outcome != "breaker_open")

    def failed(self, err: UpstreamError) -> None:
        """An attempt failed: the walk's last error, and the provider's id if an upstream answered."""
        self.failures.last_error = err
        if err.request_id:
            self.upstream_request_id = err.request_id

    def cancel(self) -> None:
        """The client gave up: the answer stops where it is, or as soon as it starts (ending `cancelled`)."""
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class Finished(msgspec.Struct, frozen=True, gc=False):  # (handed to the sinks and dropped)
    """A request at its end: its answer (or token count), or the error it ended with."""

    trace: Trace
    completion: Completion | None
    tokens: TokenCount | None  # count_tokens: the count and the model that counted
    error: SidecardError | None
    latency_s: float
    outcome: str  # "ok", "degraded", or the error's code: as metrics and the log line name it
    # The model that answered, else the last one called (`last_call`), else the one the plan named; none for a model
    # that holds no slot (`names.NamedModels.ended`) or one named by a request refused before its plan.
    model: str | None
    counting: bool  # a count_tokens request


class PartialAnswer(SidecardError):
    """A stream failed after its first token: `text` is what the client already has."""

    def __init__(self, code: str, message: str, text: str) -> None:
        super().__init__(code, message)
        self.text = text


class Exhausted(Exception):
    """Every target of the route failed (or was skipped by its breaker)."""
