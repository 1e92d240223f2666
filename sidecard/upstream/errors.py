"""Upstream failures in one shape, whichever way the call went (fast path or SDK), and their mapping to
sidecard error codes."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Final

import msgspec

from ..errors import Code, SidecardError

# kinds of failure with no HTTP status
TIMEOUT: Final = "timeout"
DEADLINE: Final = "deadline"  # the request's deadline, not the target's timeout, cut the attempt short
CONNECT: Final = "connect"
MALFORMED: Final = "malformed"
STATUS: Final = "status"
UNUSABLE: Final = "unusable"  # sidecard could not build or call the target (its settings, a missing credential)


class UpstreamError(Exception):
    """One failed attempt. `message` is the provider's own text (kept out of logs: it may quote input)."""

    def __init__(
        self,
        kind: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        message: str = "",
        retry_after_s: float | None = None,
        should_retry: bool | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{kind} {status or ''} {error_type or ''}".strip())
        self.kind = kind
        self.status = status
        self.error_type = error_type
        self.message = message
        self.retry_after_s = retry_after_s
        self.should_retry = should_retry
        self.request_id = request_id

    @property
    def outcome(self) -> str:
        """A short label for logs and metrics: the status, or the kind of transport failure."""
        return str(self.status) if self.status is not None else self.kind


class _ApiErrorDetail(msgspec.Struct):
    type: str = "api_error"
    message: str = ""


class _ApiError(msgspec.Struct):
    error: _ApiErrorDetail = msgspec.field(default_factory=_ApiErrorDetail)


_error_decoder: Final = msgspec.json.Decoder(_ApiError)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None if absent or invalid."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def from_response(status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
    """An HTTP error response as an `UpstreamError`."""
    try:
        detail = _error_decoder.decode(body).error
    except msgspec.MsgspecError:
        detail = _ApiErrorDetail()
    should_retry = headers.get("x-should-retry")
    return UpstreamError(
        STATUS,
        status=status,
        error_type=detail.type,
        message=detail.message[:500],
        retry_after_s=parse_retry_after(headers),
        should_retry=None if should_retry is None else should_retry.strip().lower() == "true",
        request_id=headers.get("request-id"),
    )


_STATUS_CODES: Final = {
    400: Code.INVALID_REQUEST,
    413: Code.REQUEST_TOO_LARGE,
    422: Code.INVALID_REQUEST,
    401: Code.UPSTREAM_AUTH,
    403: Code.UPSTREAM_FORBIDDEN,
    404: Code.MODEL_NOT_FOUND,
    429: Code.RATE_LIMITED,
    529: Code.OVERLOADED,
}


# What a refusal about the target itself means, for the operator who must act on it.
_REFUSALS: Final = {
    Code.UPSTREAM_AUTH: "the upstream refused sidecard's credentials",
    Code.UPSTREAM_FORBIDDEN: "sidecard's credentials may not use this model or feature",
    Code.MODEL_NOT_FOUND: "the upstream does not know this model",
}


def to_sidecard_error(err: UpstreamError, target: str | None = None) -> SidecardError:
    """The client-facing error for a failure that ends a request; `target` ("provider:model") is named in it."""
    where = f"{target}: " if target else ""
    if err.kind == TIMEOUT:
        return SidecardError(Code.UPSTREAM_TIMEOUT, f"{where}the upstream did not answer in time")
    if err.kind == DEADLINE:
        return SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
    if err.kind == CONNECT:
        return SidecardError(Code.UPSTREAM_ERROR, f"{where}could not reach the upstream")
    if err.kind == MALFORMED:
        return SidecardError(Code.UPSTREAM_ERROR, f"{where}the upstream sent a malformed response")
    if err.kind == UNUSABLE:
        return SidecardError(Code.UPSTREAM_ERROR, f"{where}sidecard could not call the upstream (the daemon's log says why)")
    status = err.status or 0
    code = _STATUS_CODES.get(status, Code.UPSTREAM_ERROR)
    answered = f"{status} {err.error_type or ''}".rstrip()
    if code in (Code.INVALID_REQUEST, Code.REQUEST_TOO_LARGE):
        # The provider's reason is what the caller needs to fix the request.
        message = err.message or f"the upstream rejected the request ({status})"
    elif code in _REFUSALS:
        message = f"{where}{_REFUSALS[code]} ({answered})"
    else:
        message = f"{where}upstream answered {answered}"
    retry_after_ms = None if err.retry_after_s is None else int(err.retry_after_s * 1000)
    return SidecardError(code, message, retry_after_ms=retry_after_ms)
