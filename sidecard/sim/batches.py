"""The simulated Message Batches API's state: batches, their processing on trio's clock, and their results.

A batch is answered when it is created (each request as a Messages call would be, its model's fault included) and
revealed on the clock, as the API reports it: `in_progress` with every request counted `processing` until the
batch's processing time has passed, then `ended` with the counts by outcome and a `results_url`. A request whose
fault says `expire` is never processed: it comes back `expired`, and its batch runs until `expires_at`. A cancel
makes the batch `canceling` for `cancel_s`, then `ended`: requests done before the cancel keep their result, the
others come back `canceled`. Requests finish one after another, evenly over the processing time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

BATCHES_KEPT: Final = 1000  # the oldest are forgotten beyond this
MAX_REQUESTS: Final = 100_000
MAX_BYTES: Final = 256 * 1024 * 1024
CUSTOM_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

_encoder: Final = msgspec.json.Encoder()


class BatchTiming(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How long batches take, in trio seconds (the API's: up to 24 hours, most within one)."""

    processing_s: float = 60.0  # from creation to `ended`
    expiry_s: float = 86_400.0  # from creation to `expires_at`
    cancel_s: float = 1.0  # how long a cancelled batch stays `canceling`

    def __post_init__(self) -> None:
        if not 0 <= self.processing_s <= self.expiry_s:
            raise ValueError("processing_s must be within [0, expiry_s]")
        if self.cancel_s < 0:
            raise ValueError("cancel_s must not be negative")


@dataclass(slots=True)
class Item:
    custom_id: bytes  # JSON-encoded
    outcome: str  # what processing gives: "succeeded", "errored" or "expired"
    result: bytes  # the `result` object's body once processed (JSON), for "succeeded" and "errored"


class Batch:
    """One batch; times are trio time."""

    __slots__ = ("cancel_at", "created", "expires_at", "id", "items", "natural_end", "processing_s", "timing")

    def __init__(self, batch_id: str, items: list[Item], now: float, timing: BatchTiming) -> None:
        self.id = batch_id
        self.items = items
        self.created = now
        self.timing = timing
        self.expires_at = now + timing.expiry_s
        self.processing_s = timing.processing_s
        expiring = any(item.outcome == "expired" for item in items)
        self.natural_end = self.expires_at if expiring else now + timing.processing_s
        self.cancel_at: float | None = None

    @property
    def end(self) -> float:
        if self.cancel_at is None:
            return self.natural_end
        return min(self.natural_end, self.cancel_at + self.timing.cancel_s)

    def status(self, now: float) -> str:
        if now >= self.end:
            return "ended"
        return "in_progress" if self.cancel_at is None else "canceling"

    def cancel(self, now: float) -> None:
        if self.cancel_at is None and now < self.end:
            self.cancel_at = now

    def outcome(self, index: int) -> str:
        """The request's outcome once the batch has ended."""
        item = self.items[index]
        if self.cancel_at is None:
            return item.outcome
        if item.outcome == "expired":
            return "canceled"
        done_at = self.created + self.processing_s * (index + 1) / len(self.items)
        return item.outcome if done_at <= self.cancel_at else "canceled"

    def counts(self, now: float) -> dict[str, int]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if self.status(now) != "ended":
            counts["processing"] = len(self.items)
        else:
            for index in range(len(self.items)):
                counts[self.outcome(index)] += 1
        return counts

    def view(self, now: float, base_url: str, wall_base: float) -> dict[str, Any]:
        """The MessageBatch object."""
        ended = self.status(now) == "ended"
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status(now),
            "request_counts": self.counts(now),
            "ended_at": stamp(wall_base + self.end) if ended else None,
            "created_at": stamp(wall_base + self.created),
            "expires_at": stamp(wall_base + self.expires_at),
            "archived_at": None,
            "cancel_initiated_at": None if self.cancel_at is None else stamp(wall_base + self.cancel_at),
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if ended else None,
        }

    def result_lines(self) -> Iterator[bytes]:
        """The results file, a line per request (the batch must have ended)."""
        for index, item in enumerate(self.items):
            outcome = self.outcome(index)
            if outcome == item.outcome and outcome != "expired":
                yield b'{"custom_id":%b,"result":%b}\n' % (item.custom_id, item.result)
            else:
                yield b'{"custom_id":%b,"result":{"type":"%b"}}\n' % (item.custom_id, outcome.encode())


def succeeded(message: dict[str, Any]) -> bytes:
    return b'{"type":"succeeded","message":%b}' % _encoder.encode(message)


def errored(error_body: bytes) -> bytes:
    return b'{"type":"errored","error":%b}' % error_body


def request_problem(requests: Any, max_requests: int) -> str | None:
    """What the API would say is wrong with a create's `requests` as a whole, if anything (each request's `params`
    are checked as it is processed: a bad one is an errored result, not a refused batch)."""
    if not isinstance(requests, list) or not requests:
        return "requests: Input should be a non-empty list"
    if len(requests) > max_requests:
        return f"requests: a batch holds at most {max_requests} requests, got {len(requests)}"
    seen: set[str] = set()
    for i, request in enumerate(requests):
        if not isinstance(request, dict):
            return f"requests.{i}: Input should be an object"
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
            return f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
        if custom_id in seen:
            return f"requests.{i}.custom_id: Duplicate custom_id {custom_id!r}; each must be unique within the batch"
        seen.add(custom_id)
        if not isinstance(request.get("params"), dict):
            return f"requests.{i}.params: Field required"
    return None


def stamp(wall: float) -> str:
    """RFC 3339 with microseconds, as the API writes times."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
