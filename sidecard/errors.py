"""The one error type that crosses layers, and the stable codes it carries.

A failure becomes a `SidecardError` at the place where it is understood; the server alone turns it into
an error frame. Codes are part of the wire protocol: never rename one, only add.
"""

from __future__ import annotations

from typing import Final, Self


class Code:
    """Stable error codes, with whether a client may retry the same request."""

    # The client's frame or request.
    BAD_FRAME: Final = "bad_frame"
    FRAME_TOO_LARGE: Final = "frame_too_large"
    UNKNOWN_OP: Final = "unknown_op"
    BAD_REQUEST: Final = "bad_request"
    PROMPT_NOT_FOUND: Final = "prompt_not_found"
    # The upstream refused the request itself: retrying the same request cannot help.
    INVALID_REQUEST: Final = "invalid_request"
    REQUEST_TOO_LARGE: Final = "request_too_large"
    # The upstream, or sidecard's way to it.
    UPSTREAM_AUTH: Final = "upstream_auth"
    UPSTREAM_FORBIDDEN: Final = "upstream_forbidden"
    MODEL_NOT_FOUND: Final = "model_not_found"
    RATE_LIMITED: Final = "rate_limited"
    OVERLOADED: Final = "overloaded"
    UPSTREAM_ERROR: Final = "upstream_error"
    UPSTREAM_TIMEOUT: Final = "upstream_timeout"
    UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"
    DEADLINE_EXCEEDED: Final = "deadline_exceeded"
    # The answer came, but not in the shape the prompt declares, even after one corrective retry.
    BAD_OUTPUT: Final = "bad_output"
    # An operator switched AI off for this request's scope: show the non-AI path.
    AI_DISABLED: Final = "ai_disabled"
    # A spend budget is used up until its reset time (in retry_after_ms).
    BUDGET_EXCEEDED: Final = "budget_exceeded"
    # Cache policy `only` and nothing cached.
    CACHE_MISS: Final = "cache_miss"
    # A guardrail blocked the answer (an output check's `block` action, or a retry that failed again).
    OUTPUT_BLOCKED: Final = "output_blocked"
    # A data or injection policy refused to send the request upstream (forbidden data, no allowed provider).
    POLICY_REFUSED: Final = "policy_refused"
    # Feedback named a request this daemon never answered, or one answered too long ago to keep.
    UNKNOWN_REQUEST: Final = "unknown_request"
    EXPIRED_REQUEST: Final = "expired_request"
    # The request already has this kind of feedback (one score, each implicit signal once).
    DUPLICATE_FEEDBACK: Final = "duplicate_feedback"
    # Async jobs: no such job (unknown, or finished and forgotten), no such batch in flight.
    JOB_NOT_FOUND: Final = "job_not_found"
    BATCH_NOT_FOUND: Final = "batch_not_found"
    # The daemon itself.
    FORBIDDEN: Final = "forbidden"
    SHUTTING_DOWN: Final = "shutting_down"
    INTERNAL: Final = "internal"
    # The client cancelled the request (a `cancel` frame, or it left): only the logs and metrics see this code.
    CANCELLED: Final = "cancelled"


RETRYABLE: Final[frozenset[str]] = frozenset(
    {
        Code.RATE_LIMITED,
        Code.OVERLOADED,
        Code.UPSTREAM_ERROR,
        Code.UPSTREAM_TIMEOUT,
        Code.UPSTREAM_UNAVAILABLE,
        Code.DEADLINE_EXCEEDED,
        Code.SHUTTING_DOWN,
    }
)


class SidecardError(Exception):
    """A failure with a stable `code`, a human `message` and whether retrying may help.

    `message` goes to the client verbatim: it must never hold secrets, request bodies or a traceback.
    `request_id`, `upstream_request_id`: the request it ended, once the engine had begun one (`of_request`), and the
    provider's id of the last answer an upstream gave it; None for a refusal before that (a malformed frame).
    """

    __slots__ = ("code", "message", "retryable", "retry_after_ms", "request_id", "upstream_request_id")

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = code in RETRYABLE if retryable is None else retryable
        self.retry_after_ms = retry_after_ms
        self.request_id: str | None = None
        self.upstream_request_id: str | None = None

    def of_request(self, request_id: str, upstream_request_id: str | None) -> Self:
        """This error as one request's reply, naming the request and the provider's answer: a copy, since one error
        may end several requests (a constant, a coalesced leader's)."""
        reply = type(self).__new__(type(self), *self.args)
        reply.__dict__.update(self.__dict__)  # what a subclass adds (a partial answer's text)
        reply.code, reply.message, reply.retryable, reply.retry_after_ms = self.code, self.message, self.retryable, self.retry_after_ms
        reply.request_id, reply.upstream_request_id = request_id, upstream_request_id
        return reply


# How long a `shutting_down` client waits before it connects again: under systemd the replacement daemon takes the
# socket within a second.
RECONNECT_AFTER_MS: Final = 1000


def shutting_down(message: str) -> SidecardError:
    """A `shutting_down` error, with the wait every one carries (`retry_after_ms`), whoever refuses: a face, the
    engine or the jobs desk."""
    return SidecardError(Code.SHUTTING_DOWN, message, retry_after_ms=RECONNECT_AFTER_MS)


class StartupError(Exception):
    """The daemon cannot start; the message says why in one line (what `sidecard serve` prints before exiting 1)."""


def first_leaf(error: BaseException) -> BaseException:
    """The one error at the bottom of nested exception groups (each nursery adds a level), for a one-line report."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def describe_validation_error(exc: Exception) -> str:
    """A msgspec validation error for people: `Expected `int`, got `str` - at `$.server.max_frame_bytes`` becomes
    `server.max_frame_bytes: expected int, got str`; unknown and missing fields `KEY: unknown key` and
    `KEY: required key is missing`. The one wording of such errors: config, prompt files, frames, admin ops, headers."""
    text = str(exc).replace("`", "")
    message, _, where = text.partition(" - at $")
    key = where.lstrip(".")
    if message.startswith("Object contains unknown field "):
        unknown = message.removeprefix("Object contains unknown field ")
        return f"{key + '.' if key else ''}{unknown}: unknown key"
    if message.startswith("Object missing required field "):
        missing = message.removeprefix("Object missing required field ")
        return f"{key + '.' if key else ''}{missing}: required key is missing"
    if not message[1:2].isupper():  # ("JSON is malformed" keeps its capitals)
        message = message[:1].lower() + message[1:]
    return f"{key}: {message}" if key else message
