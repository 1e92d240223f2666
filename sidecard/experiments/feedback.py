"""Feedback on answers: the record of the requests sidecard issued, and the validation of feedback items.

Every answer (streamed and cached ones too) is recorded under its `request_id` with what it was served by:
prompt, version, model, route, feature, and its experiment arm or canary role (never its text). Feedback names
a request id and carries one of:

- `score`: a number in the configured range (default 0-1), kept scaled to 0-1;
- `thumbs`: "up" (1) or "down" (0);
- `signal`: an implicit signal the app saw, "retry" (the user asked the same question again) or "abandoned"
  (the user left a streamed answer before its end); both count as negative (0);

with an optional `label` (one of the configured labels, or any short label when none are configured) and an
optional `comment`. A request takes one explicit score and each implicit signal once.

Memory is bounded: ids are kept for `retention_s` and at most `max_entries` of them (the oldest forgotten
first); a forgotten id is remembered as expired (its id only, at most `max_entries` of those too), so feedback
that comes too late is told so rather than told the id is unknown. `now` is injected; nothing here does I/O.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from enum import Enum
from typing import Annotated, Final, Literal

import msgspec

MAX_REQUEST_ID_CHARS: Final = 128
Kind = Literal["score", "thumbs", "retry", "abandoned"]


class FeedbackSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    retention_s: Annotated[float, msgspec.Meta(gt=0)] = 24 * 3600.0
    max_entries: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    score_min: float = 0.0
    score_max: float = 1.0
    labels: tuple[str, ...] = ()  # the labels allowed; empty: any label of at most max_label_chars
    max_label_chars: Annotated[int, msgspec.Meta(ge=1)] = 64
    max_comment_chars: Annotated[int, msgspec.Meta(ge=0)] = 2000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.score_min) and math.isfinite(self.score_max) and self.score_min < self.score_max):
            raise ValueError("score_min must be below score_max")


class Served(msgspec.Struct, frozen=True, kw_only=True, gc=False):  # (scalars only: never in a cycle)
    """What served a request (as the review queue keeps it)."""

    feature: str
    model: str
    route: str | None = None
    prompt: str | None = None
    version: int | None = None
    experiment: str | None = None
    arm: str | None = None


class Issued(Served, frozen=True, kw_only=True, gc=False):
    """What served a request, and when, for the feedback on it to be counted against."""

    canary: bool = False
    issued_at: float = 0.0


class FeedbackItem(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Feedback as a client sends it."""

    request_id: str
    score: float | None = None
    thumbs: Literal["up", "down"] | None = None
    signal: Literal["retry", "abandoned"] | None = None
    label: str | None = None
    comment: str | None = None


class Feedback(msgspec.Struct, frozen=True, kw_only=True):
    """Accepted feedback, ready to count."""

    request_id: str
    request: Issued
    kind: Kind
    value: float  # 0-1, higher is better
    label: str | None
    comment: str | None
    at: float

    @property
    def negative(self) -> bool:
        return self.value < 0.5


class Reason(str, Enum):
    """Why feedback was refused; every one is the caller's mistake, none is worth retrying."""

    BAD_REQUEST_ID = "bad_request_id"
    UNKNOWN_REQUEST = "unknown_request"
    EXPIRED_REQUEST = "expired_request"
    DUPLICATE = "duplicate"
    NO_SCORE = "no_score"
    SEVERAL_SCORES = "several_scores"
    SCORE_OUT_OF_RANGE = "score_out_of_range"
    BAD_LABEL = "bad_label"
    COMMENT_TOO_LONG = "comment_too_long"


class Refused(msgspec.Struct, frozen=True):
    reason: Reason
    message: str


class FeedbackLedger:
    def __init__(self, settings: FeedbackSettings) -> None:
        self.settings = settings
        self._live: OrderedDict[str, Issued] = OrderedDict()  # oldest first
        self._received: dict[str, set[Kind]] = {}  # the kinds of feedback a live request has had (few have any)
        self._expired: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._live)

    def issue(self, request_id: str, issued: Issued, now: float) -> None:
        """Remember a request that was answered (call it once per request, in time order)."""
        self._forget(now)
        if issued.issued_at != now:
            issued = msgspec.structs.replace(issued, issued_at=now)
        live = self._live
        if request_id in live:
            live.move_to_end(request_id)
            self._received.pop(request_id, None)
        live[request_id] = issued
        while len(live) > self.settings.max_entries:  # (a reload may have lowered it)
            self._expire(next(iter(live)))

    def lookup(self, request_id: str, now: float) -> Issued | None:
        self._forget(now)
        return self._live.get(request_id)

    def accept(self, item: FeedbackItem, now: float) -> Feedback | Refused:
        """The feedback to count, or why it is refused (nothing is recorded then)."""
        refused = self._check_fields(item)
        if refused is not None:
            return refused
        self._forget(now)
        issued = self._live.get(item.request_id)
        if issued is None:
            if item.request_id in self._expired:
                hours = self.settings.retention_s / 3600
                return Refused(Reason.EXPIRED_REQUEST, f"request {item.request_id} is too old for feedback (kept for "
                                                       f"{hours:g} h, at most {self.settings.max_entries} requests)")
            return Refused(Reason.UNKNOWN_REQUEST, f"no request {item.request_id} was answered here")
        received = self._received.setdefault(item.request_id, set())
        kind, value = self._kind_and_value(item)
        slot: Kind = "score" if kind in ("score", "thumbs") else kind  # one explicit score per request
        if slot in received:
            what = "a score" if slot == "score" else f"a {slot} signal"
            return Refused(Reason.DUPLICATE, f"request {item.request_id} already has {what}")
        received.add(slot)
        return Feedback(request_id=item.request_id, request=issued, kind=kind, value=value, label=item.label,
                        comment=item.comment, at=now)

    # -- internals

    def _check_fields(self, item: FeedbackItem) -> Refused | None:
        settings = self.settings
        request_id = item.request_id
        if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable() or request_id != request_id.strip():
            return Refused(Reason.BAD_REQUEST_ID, f"request_id must be 1-{MAX_REQUEST_ID_CHARS} printable characters")
        given = sum(value is not None for value in (item.score, item.thumbs, item.signal))
        if given == 0:
            return Refused(Reason.NO_SCORE, "feedback needs one of score, thumbs or signal")
        if given > 1:
            return Refused(Reason.SEVERAL_SCORES, "feedback takes only one of score, thumbs or signal")
        if item.score is not None and not (math.isfinite(item.score) and settings.score_min <= item.score <= settings.score_max):
            return Refused(Reason.SCORE_OUT_OF_RANGE, f"score must be from {settings.score_min:g} to {settings.score_max:g}")
        label = item.label
        if label is not None:
            if settings.labels:
                if label not in settings.labels:
                    return Refused(Reason.BAD_LABEL, f"label must be one of: {', '.join(settings.labels)}")
            elif not label or len(label) > settings.max_label_chars or not label.isprintable():
                return Refused(Reason.BAD_LABEL, f"label must be 1-{settings.max_label_chars} printable characters")
        if item.comment is not None and len(item.comment) > settings.max_comment_chars:
            return Refused(Reason.COMMENT_TOO_LONG, f"comment must be at most {settings.max_comment_chars} characters")
        return None

    def _kind_and_value(self, item: FeedbackItem) -> tuple[Kind, float]:
        if item.score is not None:
            low, high = self.settings.score_min, self.settings.score_max
            return "score", (item.score - low) / (high - low)
        if item.thumbs is not None:
            return "thumbs", 1.0 if item.thumbs == "up" else 0.0
        assert item.signal is not None  # _check_fields saw exactly one
        return item.signal, 0.0

    def _forget(self, now: float) -> None:
        horizon = now - self.settings.retention_s
        while self._live:
            request_id, issued = next(iter(self._live.items()))
            if issued.issued_at > horizon:
                break
            self._expire(request_id)

    def _expire(self, request_id: str) -> None:
        del self._live[request_id]
        self._received.pop(request_id, None)
        self._expired[request_id] = None
        if len(self._expired) > self.settings.max_entries:
            self._expired.popitem(last=False)
