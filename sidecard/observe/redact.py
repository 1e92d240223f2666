"""The redaction layer: the only way user text reaches a log line.

Patterns are deliberately greedy: a false positive costs a log reader a few characters, a false negative
leaks a user's data or a credential.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Final

_PATTERNS: Final = (
    # Credentials first, so a key that happens to contain digits is not taken for a phone number.
    ("[key]", re.compile(r"\bsk-(?:ant-)?[A-Za-z0-9_-]{16,}")),
    ("[key]", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
    ("[key]", re.compile(r"\b(?:ghp|gho|ghs|xox[abpr])[-_][A-Za-z0-9_-]{10,}")),
    ("[key]", re.compile(r"\bAIza[0-9A-Za-z_-]{30,}")),
    ("[token]", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}")),
    ("[token]", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")),  # JWT
    ("[secret]", re.compile(r"(?i)\b(?:api[_-]?key|secret|password|passwd|token)\s*[:=]\s*\S+")),
    ("[email]", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")),
    ("[card]", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
    ("[ssn]", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),  # before the phone pattern, which would take it
    ("[phone]", re.compile(r"(?<![\w.])\+?\d[\d ().-]{6,}\d(?![\w.])")),
)
# What any match of each pattern above contains: one of these strings, "bearer" in any case (None), or a digit.
# A text without it cannot match, so the pattern is skipped: for most prompts ten scans become a few substring
# checks, with the same result.
_DIGIT: Final = re.compile(r"\d")
_NEEDS: Final = (("sk-",), ("AKIA", "ASIA"), ("gh", "xox"), ("AIza",), None, ("eyJ",), (":", "="), ("@",), _DIGIT, _DIGIT,
                  _DIGIT)
# Any of the above: a text without one (most short prompts) is returned after one scan.
_ANY_NEED: Final = re.compile(r"sk-|AKIA|ASIA|gh|xox|AIza|(?i:bearer)|eyJ|[:=@]|\d")
_IPV4: Final = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def patterns_for(label: str) -> tuple[re.Pattern[str], ...]:
    """The redactor's patterns for one label ("[key]", "[token]", "[secret]", "[email]", "[card]", "[ssn]", "[phone]"), in
    the order it applies them: for detectors that narrow them (`safety/pii.py`) rather than copy them."""
    return tuple(pattern for name, pattern in _PATTERNS if name == label)


def is_ipv4(text: str) -> bool:
    """Whether `text` is shaped like a dotted IPv4 address (which the phone pattern also matches)."""
    return _IPV4.fullmatch(text) is not None


def _unless_ipv4(match: re.Match[str]) -> str:
    # An address like 127.0.0.1 is not a phone number, and hiding it only hurts debugging.
    return match.group(0) if is_ipv4(match.group(0)) else "[phone]"


# How far past the prefix we redact before cutting: a secret straddling the cut is matched whole.
_LOOKAHEAD: Final = 128


class Redactor:
    """Masks PII and credentials; `literals` are exact secrets (the configured API key) masked anywhere."""

    def __init__(self, literals: Iterable[str] = ()) -> None:
        self._literals = tuple(s for s in literals if len(s) >= 8)
        self._named: dict[str, re.Pattern[str]] = {}  # label -> an operator's pattern

    def mask_also(self, named: Mapping[str, re.Pattern[str]]) -> None:
        """The data policy's own kinds (`patterns`), masked as `[name]` in every text from now on (and kept:
        a reload that drops one cannot unmask what it might still meet)."""
        self._named.update({f"[{name}]": pattern for name, pattern in named.items()})

    def redact(self, text: str) -> str:
        for secret in self._literals:
            if secret in text:
                text = text.replace(secret, "[key]")
        for label, pattern in self._named.items():
            text = pattern.sub(label, text)
        if _ANY_NEED.search(text) is None:
            return text
        digits = bearer = None
        for (label, pattern), needs in zip(_PATTERNS, _NEEDS, strict=True):
            if needs is _DIGIT:
                if digits is None:
                    digits = _DIGIT.search(text) is not None
                if not digits:
                    continue
            elif needs is None:  # "bearer", in any case
                if bearer is None:
                    bearer = "bearer" in text.lower()
                if not bearer:
                    continue
            elif not any(literal in text for literal in needs):
                continue
            text = pattern.sub(_unless_ipv4 if label == "[phone]" else label, text)
        return text

    def prefix(self, text: str, limit: int) -> str:
        """The first `limit` characters of `text`, redacted, on one line."""
        if limit <= 0 or not text:
            return ""
        cut = self.redact(text[: limit + _LOOKAHEAD]).replace("\n", " ").replace("\r", " ")
        return cut if len(cut) <= limit and len(text) <= limit else cut[: limit - 1] + "…"


def pseudonym(value: str, salt: bytes) -> str:
    """A stable, salted stand-in for an identifier (the `user` key), so logs can group without naming."""
    return hashlib.blake2b(value.encode(), key=salt, digest_size=8).hexdigest()
