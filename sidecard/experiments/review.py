"""The human review queue: which answers a person should look at, and the store of them and their labels.

**Sampling.** A share of answers goes to review: `rate` per prompt (or per `feature:<name>`, else the
default), multiplied by `low_score_weight` when the judge scored the answer below `low_score`, by
`negative_feedback_weight` when its feedback was negative, and by `check_failure_weight` when it failed a
heuristic check (capped at 1). The answers most likely to be bad are the ones most worth a person's time.

**The store.** A small SQLite file (in the state directory; mode 0600, and SQLite gives its journal the same
mode), one row per request: what served it, its question and answer already redacted by the caller (the same
redaction layer as the logs), why it was sampled, and a reviewer's label and note. Items older than
`retention_s` and the oldest beyond `max_items` are deleted (with `secure_delete`, so their text is overwritten,
not left in free pages). A label maps to a score (default: good 1, bad 0, unsure none), which the caller feeds
back as a `review_score` value. Nothing here leaves the host.

The store is synchronous (sqlite3); callers run it off the event loop, one call at a time.
"""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec

from .feedback import Issued, Served

Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Weight = Annotated[float, msgspec.Meta(ge=1.0)]
PAGE_LIMIT: Final = 100
SCHEMA_VERSION: Final = 1


class ReviewSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    rate: Fraction = 0.01  # the share of answers reviewed, before weights
    rates: dict[str, Fraction] = {}  # per prompt name, or "feature:<name>"
    low_score: Fraction = 0.5
    low_score_weight: Weight = 10.0
    negative_feedback_weight: Weight = 10.0
    check_failure_weight: Weight = 5.0
    retention_s: Annotated[float, msgspec.Meta(gt=0)] = 30 * 86400.0
    max_items: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    max_text_chars: Annotated[int, msgspec.Meta(ge=1)] = 20_000  # per question and per answer
    max_note_chars: Annotated[int, msgspec.Meta(ge=0)] = 2000
    labels: dict[str, Fraction | None] = msgspec.field(default_factory=lambda: {"good": 1.0, "bad": 0.0, "unsure": None})


class Signals(msgspec.Struct, frozen=True, kw_only=True):
    """What is known about an answer's quality when it is offered for review."""

    judge_score: float | None = None
    negative_feedback: bool = False
    failed_checks: tuple[str, ...] = ()
    flagged: tuple[str, ...] = ()  # output guardrail checks whose action is `flag`: such an answer is always queued


def reasons(settings: ReviewSettings, signals: Signals) -> list[str]:
    """The signals that raise an answer's chance of review."""
    found = []
    if signals.judge_score is not None and signals.judge_score < settings.low_score:
        found.append("low_score")
    if signals.negative_feedback:
        found.append("negative_feedback")
    if signals.failed_checks:
        found.append("check_failure")
    if signals.flagged:
        found.append("guardrail_flag")
    return found


def probability(settings: ReviewSettings, prompt: str | None, feature: str, signals: Signals) -> float:
    if signals.flagged:
        return 1.0  # an operator's guardrail asked for a person's look at this answer
    rate = settings.rates.get(prompt or "", settings.rates.get(f"feature:{feature}", settings.rate))
    weights = {"low_score": settings.low_score_weight, "negative_feedback": settings.negative_feedback_weight,
               "check_failure": settings.check_failure_weight}
    for reason in reasons(settings, signals):
        rate *= weights[reason]
    return min(1.0, rate)


def sample(settings: ReviewSettings, prompt: str | None, feature: str, signals: Signals, rng: random.Random) -> bool:
    return rng.random() < probability(settings, prompt, feature, signals)


class NewItem(msgspec.Struct, frozen=True, kw_only=True):
    """An answer to queue; `question` and `answer` already redacted by the caller."""

    request_id: str
    served: Issued  # what served it, as the feedback record has it
    question: str
    answer: str
    signals: Signals = Signals()


class ReviewItem(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    request_id: str
    created_at: float
    served: Served  # (not `Issued`: the queue keeps no canary bit nor issue time, which would read as false and 0)
    question: str
    answer: str
    judge_score: float | None
    negative_feedback: bool
    failed_checks: list[str]
    reasons: list[str]
    label: str | None = None
    note: str | None = None
    labelled_at: float | None = None
    score: float | None = None  # the label's score: fed back as a `review_score` value


class LabelRefused(msgspec.Struct, frozen=True):
    reason: Literal["unknown_item", "already_labelled", "unknown_label", "note_too_long"]
    message: str


_SERVED: Final = tuple(f.name for f in msgspec.structs.fields(Served))
_COLUMNS: Final = ("id", "request_id", "created_at", "feature", "model", "route", "prompt", "version", "experiment",
                   "arm", "question", "answer", "judge_score", "negative_feedback", "failed_checks", "reasons", "label",
                   "note", "labelled_at", "score")
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    feature TEXT NOT NULL,
    model TEXT NOT NULL,
    route TEXT,
    prompt TEXT,
    version INTEGER,
    experiment TEXT,
    arm TEXT,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    judge_score REAL,
    negative_feedback INTEGER NOT NULL,
    failed_checks TEXT NOT NULL,
    reasons TEXT NOT NULL,
    label TEXT,
    note TEXT,
    labelled_at REAL,
    score REAL
);
CREATE INDEX IF NOT EXISTS items_created ON items (created_at);
"""


class ReviewStore:
    def __init__(self, path: str | os.PathLike[str], settings: ReviewSettings) -> None:
        self.settings = settings
        self.path = Path(path)
        # Create the file 0600 before SQLite opens it (SQLite gives its journal the database's mode), and
        # tighten one an earlier run or another umask left open.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA secure_delete = ON")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def add(self, item: NewItem, now: float) -> int | None:
        """Queue an answer; its id, or None when its request is already queued. Prunes first."""
        self.prune(now)
        limit = self.settings.max_text_chars
        served, signals = item.served, item.signals
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO items (request_id, created_at, feature, model, route, prompt, version, experiment,"
            " arm, question, answer, judge_score, negative_feedback, failed_checks, reasons)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (item.request_id, now, served.feature, served.model, served.route, served.prompt, served.version,
             served.experiment, served.arm, _cut(item.question, limit), _cut(item.answer, limit), signals.judge_score,
             int(signals.negative_feedback), msgspec.json.encode(signals.failed_checks).decode(),
             msgspec.json.encode(reasons(self.settings, signals)).decode()),
        )
        if cursor.rowcount == 0:
            return None
        self._trim()
        return cursor.lastrowid

    def get(self, item_id: int) -> ReviewItem | None:
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM items WHERE id = ?", (item_id,)).fetchone()
        return _item(row) if row is not None else None

    def page(self, *, state: Literal["pending", "labelled", "all"] = "pending", prompt: str | None = None,
             after: int = 0, limit: int = 20) -> list[ReviewItem]:
        """Items oldest first, from the one after id `after` (pass the last id seen for the next page)."""
        where, args = ["id > ?"], [after]
        if state != "all":
            where.append("label IS NULL" if state == "pending" else "label IS NOT NULL")
        if prompt is not None:
            where.append("prompt = ?")
            args.append(prompt)
        rows = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM items WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            (*args, max(1, min(limit, PAGE_LIMIT))),
        ).fetchall()
        return [_item(row) for row in rows]

    def label(self, item_id: int, label: str, note: str | None, now: float) -> ReviewItem | LabelRefused:
        """Record a reviewer's label and note on a pending item; the item, with the label's score."""
        if label not in self.settings.labels:
            return LabelRefused("unknown_label", f"label must be one of: {', '.join(self.settings.labels)}")
        if note is not None and len(note) > self.settings.max_note_chars:
            return LabelRefused("note_too_long", f"a note must be at most {self.settings.max_note_chars} characters")
        cursor = self._db.execute(
            "UPDATE items SET label = ?, note = ?, labelled_at = ?, score = ? WHERE id = ? AND label IS NULL",
            (label, note, now, self.settings.labels[label], item_id),
        )
        item = self.get(item_id)
        if item is None:
            return LabelRefused("unknown_item", f"no review item {item_id} (labelled long ago, or never queued)")
        if cursor.rowcount == 0:
            return LabelRefused("already_labelled", f"item {item_id} is already labelled {item.label!r}")
        return item

    def counts(self) -> dict[str, int]:
        pending, labelled = self._db.execute(
            "SELECT COALESCE(SUM(label IS NULL), 0), COALESCE(SUM(label IS NOT NULL), 0) FROM items"
        ).fetchone()
        return {"pending": pending, "labelled": labelled}

    def prune(self, now: float) -> int:
        """Delete the items past retention; how many went."""
        cursor = self._db.execute("DELETE FROM items WHERE created_at < ?", (now - self.settings.retention_s,))
        return cursor.rowcount

    def _trim(self) -> None:
        self._db.execute(
            "DELETE FROM items WHERE id IN (SELECT id FROM items ORDER BY id DESC LIMIT -1 OFFSET ?)",
            (self.settings.max_items,),
        )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}\n[... {len(text) - limit} characters cut ...]"


_strings: Final = msgspec.json.Decoder(list[str])


def _item(row: tuple[object, ...]) -> ReviewItem:
    fields = dict(zip(_COLUMNS, row))
    served = {name: fields.pop(name) for name in _SERVED}
    for name in ("failed_checks", "reasons"):
        fields[name] = _strings.decode(fields[name])
    return msgspec.convert({**fields, "served": served, "negative_feedback": bool(fields["negative_feedback"])},
                           ReviewItem)
