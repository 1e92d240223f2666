"""Typed errors: one class per family of error codes; `code` keeps the exact code."""

from __future__ import annotations

from typing import Optional


class SidecardError(Exception):
    """An error frame from the daemon (or a client-side failure with a code of its own). `frame`: the error
    frame as the daemon sent it, if it sent one. `request_id`: sidecard's id for the failed request (its log line's),
    and `upstream_request_id` the provider's id of the last answer it gave (for a support ticket); None when the
    daemon refused the frame before starting a request, or gave no id."""

    def __init__(self, code: str, message: str, retryable: bool = False, retry_after_ms: Optional[int] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms
        self.frame: Optional[dict] = None
        self.request_id: Optional[str] = None
        self.upstream_request_id: Optional[str] = None


class BadRequest(SidecardError):
    """The frame or request is malformed (bad_frame, frame_too_large, unknown_op, bad_request)."""


class InvalidRequest(SidecardError):
    """The upstream refused the request itself (invalid_request, request_too_large)."""


class UpstreamAuthError(SidecardError):
    """sidecard's credentials, permissions or model id are wrong (upstream_auth, upstream_forbidden, model_not_found)."""


class RateLimited(SidecardError):
    """rate_limited: slow down; see `retry_after_ms`."""


class Overloaded(SidecardError):
    """overloaded or shutting_down: try again shortly."""


class Unavailable(SidecardError):
    """upstream_unavailable, upstream_error, upstream_timeout: the model could not answer."""


class DeadlineExceeded(SidecardError):
    """deadline_exceeded: no answer within the request's deadline."""


class AIDisabled(SidecardError):
    """ai_disabled: an operator switched this feature off; show the non-AI path."""


class PartialAnswer(SidecardError):
    """A stream failed after its first token: `text` is what arrived, and it is not the whole answer."""

    def __init__(self, code: str, message: str, retryable: bool = False, retry_after_ms: Optional[int] = None, text: str = "") -> None:
        super().__init__(code, message, retryable, retry_after_ms)
        self.text = text


class InvalidOutput(SidecardError):
    """bad_output: the answer did not match the prompt's declared output format, even after a retry."""


class OutputBlocked(SidecardError):
    """output_blocked: a guardrail blocked the answer; show the non-AI path (asking again gets the same answer)."""


class PolicyRefused(SidecardError):
    """policy_refused: a data or injection policy refused to send this request to a model."""


class Forbidden(SidecardError):
    """forbidden: this app may not make this request (access control), or is not a known app."""


class CacheMiss(SidecardError):
    """cache_miss: the request asked for a cached answer only, and there was none."""


class BudgetExceeded(SidecardError):
    """budget_exceeded: a spend budget is used up until its reset; see `retry_after_ms`."""


class FeedbackRefused(BadRequest):
    """Feedback on a request this daemon never answered, answered too long ago, or already scored."""


class JobNotFound(SidecardError):
    """job_not_found: no such job (unknown, or finished and forgotten after the retention time)."""


class ConnectionLost(SidecardError):
    """The connection to the daemon failed or closed before the reply arrived."""


class Timeout(SidecardError):
    """No reply within the client-side timeout."""


_BY_CODE = {
    "bad_frame": BadRequest,
    "frame_too_large": BadRequest,
    "unknown_op": BadRequest,
    "bad_request": BadRequest,
    "invalid_request": InvalidRequest,
    "request_too_large": InvalidRequest,
    "upstream_auth": UpstreamAuthError,
    "upstream_forbidden": UpstreamAuthError,
    "model_not_found": UpstreamAuthError,
    "rate_limited": RateLimited,
    "overloaded": Overloaded,
    "shutting_down": Overloaded,
    "upstream_unavailable": Unavailable,
    "upstream_error": Unavailable,
    "upstream_timeout": Unavailable,
    "deadline_exceeded": DeadlineExceeded,
    "ai_disabled": AIDisabled,
    "prompt_not_found": BadRequest,
    "bad_output": InvalidOutput,
    "cache_miss": CacheMiss,
    "budget_exceeded": BudgetExceeded,
    "output_blocked": OutputBlocked,
    "policy_refused": PolicyRefused,
    "forbidden": Forbidden,
    "unknown_request": FeedbackRefused,
    "expired_request": FeedbackRefused,
    "duplicate_feedback": FeedbackRefused,
    "job_not_found": JobNotFound,
}


def from_frame(error: dict, frame: Optional[dict] = None) -> SidecardError:
    code = str(error.get("code", "internal"))
    args = (code, str(error.get("message", "")), bool(error.get("retryable", False)), error.get("retry_after_ms"))
    if frame is not None and frame.get("partial"):
        exc: SidecardError = PartialAnswer(*args, text=str(frame.get("text", "")))
    else:
        exc = _BY_CODE.get(code, SidecardError)(*args)
    exc.frame = frame
    if frame is not None:
        exc.request_id = frame.get("request_id")
        exc.upstream_request_id = frame.get("upstream_request_id")
    return exc
