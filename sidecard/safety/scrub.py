"""Outbound scrubbing: personal data replaced by placeholders before a request leaves the host, and put back
into the answer where the policy allows.

A placeholder is `[KIND_N]` (`[EMAIL_1]`, `[CARD_2]`, `[EMPLOYEE_ID_1]`): short, plain ASCII, and the kind of
token a model copies verbatim. One request shares one `Placeholders` mapping across its texts, so the same
value is the same placeholder everywhere. Numbering starts above any placeholder-shaped text the request
already holds, so restoring touches only what scrubbing put in: `restore(scrub(x)) == x` for every x.

`Restorer` does the restoring on a stream, delta by delta: a placeholder can be split across deltas, so it
holds back a possible placeholder's beginning (at most the longest placeholder issued) until it is complete.

What scrubbing reports is which kinds acted and how often, never what they matched.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from .pii import PiiMatcher

_PLACEHOLDER: Final = re.compile(r"\[([A-Z][A-Z0-9_]*)_([1-9][0-9]{0,8})\]")
_PARTIAL: Final = re.compile(r"\[[A-Z0-9_]*\Z")  # what a placeholder looks like before its closing bracket


class Placeholders:
    """One request's mapping from placeholders to the values they stand for."""

    __slots__ = ("originals", "_by_value", "_next", "counts", "longest")

    def __init__(self) -> None:
        self.originals: dict[str, str] = {}
        self._by_value: dict[tuple[str, str], str] = {}
        self._next: dict[str, int] = {}
        self.counts: Counter[str] = Counter()  # replacements per kind: what the log may say
        self.longest = 0

    def reserve(self, text: str) -> None:
        """Number new placeholders above any placeholder-shaped text already in `text`."""
        for m in _PLACEHOLDER.finditer(text):
            label, number = m.group(1), int(m.group(2))
            self._next[label] = max(self._next.get(label, 1), number + 1)

    def placeholder(self, kind: str, value: str) -> str:
        self.counts[kind] += 1
        key = (kind, value)
        if (existing := self._by_value.get(key)) is not None:
            return existing
        label = kind.upper()
        number = self._next.get(label, 1)
        self._next[label] = number + 1
        token = f"[{label}_{number}]"
        self.originals[token] = value
        self._by_value[key] = token
        self.longest = max(self.longest, len(token))
        return token

    @property
    def rules(self) -> list[str]:
        return sorted(self.counts)

    def restore(self, text: str) -> str:
        if not self.originals or "[" not in text:
            return text
        return _PLACEHOLDER.sub(lambda m: self.originals.get(m.group(0), m.group(0)), text)

    def restorer(self) -> Restorer:
        return Restorer(self)


class Scrubber:
    """Replaces the configured kinds (see `pii.py`) and named patterns with placeholders."""

    __slots__ = ("matcher",)

    def __init__(self, kinds: Iterable[str], custom: Mapping[str, str] | None = None) -> None:
        self.matcher = PiiMatcher(kinds, custom)

    def scrub(self, texts: Sequence[str], placeholders: Placeholders | None = None) -> tuple[list[str], Placeholders]:
        """`texts` (a request's system prompt and message texts) scrubbed, and the mapping to restore them."""
        mapping = placeholders if placeholders is not None else Placeholders()
        for text in texts:
            mapping.reserve(text)
        return [self._one(text, mapping) for text in texts], mapping

    def _one(self, text: str, mapping: Placeholders) -> str:
        spans = self.matcher.find(text)
        if not spans:
            return text
        out: list[str] = []
        cursor = 0
        for start, end, kind in spans:
            out.append(text[cursor:start])
            out.append(mapping.placeholder(kind, text[start:end]))
            cursor = end
        out.append(text[cursor:])
        return "".join(out)

    def forbidden(self, texts: Iterable[str]) -> list[str]:
        """The kinds present in `texts`, for `policy_refused` (the kinds, never the values)."""
        found: set[str] = set()
        for text in texts:
            found.update(self.matcher.kinds_in(text))
        return [kind for kind in self.matcher.kinds if kind in found]


class Restorer:
    """Sans-I/O placeholder restoring for a stream: `feed` each delta, `finish` at the end."""

    __slots__ = ("_mapping", "_held")

    def __init__(self, mapping: Placeholders) -> None:
        self._mapping = mapping
        self._held = ""

    def feed(self, piece: str) -> str:
        text = self._held + piece
        self._held = ""
        if not self._mapping.originals:
            return text
        bracket = text.rfind("[")
        if bracket >= 0 and len(text) - bracket < self._mapping.longest and _PARTIAL.match(text, bracket):
            text, self._held = text[:bracket], text[bracket:]
        return self._mapping.restore(text)

    def finish(self) -> str:
        held, self._held = self._held, ""
        return self._mapping.restore(held)
