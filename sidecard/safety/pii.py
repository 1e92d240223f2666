"""Finding personal data and credentials in text, precisely enough to act on.

The log redactor (`observe/redact.py`) is greedy on purpose: a false positive there costs a log reader a few
characters. Here a match is masked in an answer, replaced before a request leaves the host, or refuses a request,
so each kind is the redactor's pattern (reused, not copied) narrowed by a validator, or a pattern of its own
where the redactor has none:

- `key`: the redactor's credential patterns (API keys, bearer tokens, JWTs, `password=...`).
- `email`: the redactor's pattern.
- `card`: the redactor's pattern (13 to 19 digits, single spaces or dashes between them) passing the Luhn check.
- `us_ssn`: `AAA-GG-SSSS` with dashes; area not 000, 666 or 9xx, group not 00, serial not 0000.
- `uk_nino`: two prefix letters (not D, F, I, Q, U, V; second not O; not BG, GB, KN, NK, NT, TN, ZZ), six digits
  (optionally in pairs separated by single spaces) and a suffix A to D.
- `iban`: the redactor's pattern and shape (country letters, two check digits, 11 to 30 more letters or digits,
  optionally in groups of four separated by single spaces; at least 8 digits in all), with the ISO 13616 mod-97
  check passing.
- `phone`: the redactor's pattern with 8 to 15 digits (E.164's most), not an IPv4 address and not a date.

Speed: every kind has a cheap necessary condition checked before its regex runs: a literal (`@`, `sk-`), or on ASCII
text a shape in the text's marks (`000-00-0000` for an SSN: one C-speed translation, then literal-led searches),
so prose with no candidates costs a few microseconds per kilobyte.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, NamedTuple

from ..observe.redact import DATE, iban_valid, is_ipv4, marks, patterns_for

KINDS: Final = ("key", "email", "card", "us_ssn", "uk_nino", "iban", "phone")  # also the order of precedence
CUSTOM_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class Span(NamedTuple):
    start: int
    end: int
    kind: str


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if "0" <= ch <= "9")


def _card(match: str) -> bool:
    digits = _digits(match)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _phone(match: str) -> bool:
    return 8 <= len(_digits(match)) <= 15 and not is_ipv4(match) and not DATE.fullmatch(match)


def _scan(pattern: re.Pattern[str], text: str, pos: int) -> Iterator[re.Match[str]]:
    return pattern.finditer(text, pos)


_LOCAL: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")  # an address's local part


def _scan_emails(pattern: re.Pattern[str], text: str, pos: int) -> Iterator[re.Match[str]]:
    """What `pattern.finditer(text, pos)` gives for the email pattern, without trying every position: a match
    holds an "@" and starts where the run of local-part characters before it starts (a tail of that run would
    fail exactly when the whole run does), so only those positions are tried. A test pins the equivalence."""
    floor = pos
    at = text.find("@", pos)
    while at >= 0:
        start = at
        while start > floor and text[start - 1] in _LOCAL:
            start -= 1
        m = pattern.match(text, start) if start < at else None
        if m is not None:
            yield m
            floor = m.end()
            at = text.find("@", floor)
        else:
            at = text.find("@", at + 1)


class _Finder(NamedTuple):
    kind: str
    patterns: tuple[re.Pattern[str], ...]
    valid: Callable[[str], bool] | None
    # Necessary conditions: one of `literals` in the text (checked folded when `fold`), and on ASCII text, the
    # shape `gate` in its marks (digits as 0, capitals as A): the least a match of this kind has. Tests pin both.
    literals: tuple[str, ...] = ()
    fold: bool = False
    gate: re.Pattern[str] | None = None
    scan: Callable[[re.Pattern[str], str, int], Iterator[re.Match[str]]] = _scan


# The redactor's credential patterns, each with the literals it cannot match without (tests pin both).
KEY_LITERALS: Final = (
    ("sk-",), ("AKIA", "ASIA"), ("gh", "xox"), ("AIza",), ("bearer",), ("eyJ",), ("api", "secret", "passw", "token"),
)
_KEY_PATTERNS: Final = (*patterns_for("[key]"), *patterns_for("[token]"), *patterns_for("[secret]"))
_FOLDED_KEYS: Final = (False, False, False, False, True, False, True)

_FINDERS: Final = {
    "key": [
        _Finder("key", (pattern,), None, literals, fold)
        for pattern, literals, fold in zip(_KEY_PATTERNS, KEY_LITERALS, _FOLDED_KEYS, strict=True)
    ],
    "email": [_Finder("email", patterns_for("[email]"), None, ("@",), scan=_scan_emails)],
    "card": [_Finder("card", patterns_for("[card]"), _card, gate=re.compile(r"0(?:[ -]?0){12}"))],
    "us_ssn": [_Finder("us_ssn", (re.compile(r"\b(?!000|666|9[0-9][0-9])[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}\b"),), None, gate=re.compile("000-00-0000"))],
    "uk_nino": [
        _Finder(
            "uk_nino",
            (re.compile(r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D]\b"),),
            None,
            gate=re.compile("00 ?00 ?00"),
        )
    ],
    "iban": [
        _Finder("iban", patterns_for("[iban]"), iban_valid, gate=re.compile("AA00"))
    ],
    "phone": [_Finder("phone", patterns_for("[phone]"), _phone, gate=re.compile(r"0(?:[ ().+-]*0){7}"))],
}


class PiiMatcher:
    """Finds the configured kinds, plus operator-named patterns, as non-overlapping spans.

    Overlaps go to the kind listed first in `KINDS` (custom patterns come last), then to the leftmost match:
    the same order the log redactor applies its patterns in.
    """

    __slots__ = ("kinds", "_finders", "_folded", "_gated")

    def __init__(self, kinds: Iterable[str], custom: Mapping[str, str] | None = None) -> None:
        wanted = set(kinds)
        unknown = wanted - set(KINDS) - set(custom or ())
        if unknown:
            raise ValueError(f"unknown data kind {sorted(unknown)[0]!r}: use one of {', '.join(KINDS)} or a named pattern")
        finders = [f for kind in KINDS if kind in wanted for f in _FINDERS[kind]]
        for name, source in (custom or {}).items():
            if name in wanted:
                finders.append(_Finder(name, (compile_pattern(source, name),), None))
        self.kinds = tuple(dict.fromkeys(f.kind for f in finders))
        self._finders = tuple(finders)
        self._folded = any(f.fold for f in finders)
        self._gated = any(f.gate is not None for f in finders)

    def find(self, text: str, pos: int = 0, candidates: list[tuple[int, int]] | None = None) -> list[Span]:
        """Spans starting at or after `pos` (characters before it still count for lookbehinds).

        `candidates`, when given, also gets every pattern match, kept or not: a streaming caller must not cut
        the text inside one, or a later scan starting at the cut could find what a whole-text scan does not."""
        if not self._finders or len(text) <= pos:
            return []
        folded = text.casefold() if self._folded else text
        shapes = marks(text) if self._gated and text.isascii() else None
        taken: list[Span] = []
        for finder in self._finders:
            if shapes is not None and finder.gate is not None and not finder.gate.search(shapes):
                continue
            if finder.literals and not any(lit in (folded if finder.fold else text) for lit in finder.literals):
                continue
            for pattern in finder.patterns:
                for m in finder.scan(pattern, text, pos):
                    start, end = m.span()
                    if candidates is not None:
                        candidates.append((start, end))
                    if start == end or (finder.valid is not None and not finder.valid(m.group())):
                        continue
                    i = bisect.bisect_left(taken, (start,))
                    if (i == 0 or taken[i - 1].end <= start) and (i == len(taken) or end <= taken[i].start):
                        taken.insert(i, Span(start, end, finder.kind))
        return taken

    def kinds_in(self, text: str) -> list[str]:
        """The kinds present in `text`, in this matcher's order."""
        found = {span.kind for span in self.find(text)}
        return [kind for kind in self.kinds if kind in found]


def compile_pattern(source: str, name: str) -> re.Pattern[str]:
    """An operator's regex, refused with its name when it does not compile or can match the empty string."""
    try:
        pattern = re.compile(source)
    except re.error as exc:
        raise ValueError(f"{name}: invalid regular expression: {exc}") from None
    if pattern.fullmatch(""):
        raise ValueError(f"{name}: the pattern matches the empty string")
    return pattern
