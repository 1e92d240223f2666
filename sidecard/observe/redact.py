"""The redaction layer: the only way user text reaches a log line.

Patterns are deliberately greedy: a false positive costs a log reader a few characters, a false negative
leaks a user's data or a credential. User text (a prompt's prefix, the audit trail, the review queue) is
masked in full; an operational message (an exception's, a library's) keeps its IP addresses, which is what it
is read for.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final, NamedTuple

# Shapes shared with the detectors of `safety/pii.py`, which narrow them (a checksum, a digit count).
IBAN: Final = re.compile(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
# A year of two or four digits. Dotted with a two-digit year, day and month have two digits too ("12.04.85"): a
# version number has the same shape ("Python 3.11.10", which was masked as a date).
DATE: Final = re.compile(
    r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/]\d{1,2}[-/](?:\d{4}|\d\d)|\d{1,2}\.\d{1,2}\.\d{4}|\d\d\.\d\d\.\d\d"
)
_IPV4: Final = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# Where a number may end: not inside a word, nor before ".5" (a longer dotted number), but before a full stop
# that ends a sentence ("call me on 555-123-4567.", "I was born on 12.04.1985.").
_END: Final = r"(?!\w|\.\d)"

# Each character's class, for the cheap conditions: ASCII digits become 0, capitals A, other letters and _ a; the
# rest stay as they are. One C-speed pass over ASCII text.
_MARKS: Final = str.maketrans({**{ch: "0" for ch in "0123456789"}, **{ch: "A" for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
                               **{ch: "a" for ch in "abcdefghijklmnopqrstuvwxyz_"}})


def marks(text: str) -> str:
    return text.translate(_MARKS)


def iban_shaped(text: str) -> bool:
    """Whether an `IBAN` match has an IBAN's length (15 to 34 letters and digits) and at least 8 digits: what
    tells an account number from a code like `AB12 CDEF GHIJ` (the check digits are `safety/pii.py`'s)."""
    compact = text.replace(" ", "")
    return 15 <= len(compact) <= 34 and sum("0" <= ch <= "9" for ch in compact) >= 8


def iban_valid(text: str) -> bool:
    """Whether an `IBAN` match (in either case) has an IBAN's shape and its ISO 13616 check digits pass."""
    if not iban_shaped(text):
        return False
    compact = text.replace(" ", "")
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def is_ipv4(text: str) -> bool:
    """Whether `text` is shaped like a dotted IPv4 address (which the phone pattern also matches)."""
    return _IPV4.fullmatch(text) is not None


def _iban(match: re.Match[str]) -> str:
    return "[iban]" if iban_shaped(match.group(0)) else match.group(0)


def _iban_folded(match: re.Match[str]) -> str:
    return "[iban]" if iban_valid(match.group(0)) else match.group(0)


def _in_subscript(text: str, start: int) -> bool:
    """Whether `start` is inside code's subscript (`x[1::2]`, `a[:, ::2]`): the last "[" before it, at most 32
    characters back (a text of many matches is not searched to its start for each), is still open and follows a
    name or a closing bracket, where an address's "[" follows a space or "//" (`[::1]:443`)."""
    bracket = text.rfind("[", max(0, start - 32), start)
    return bracket > 0 and text.find("]", bracket, start) < 0 and (text[bracket - 1].isalnum() or text[bracket - 1] in "_)]")


def _ipv6(match: re.Match[str]) -> str:
    # Hex groups and colons are also times (10:30:45) and code (a::b, x[1::2]): an address parses as one, has a
    # digit, and is no subscript.
    text = match.group(0)
    if not any("0" <= ch <= "9" for ch in text) or _in_subscript(match.string, match.start()):
        return text
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return "[ip]"


def _unless_ipv4(match: re.Match[str]) -> str:
    # An address like 127.0.0.1 in an operational message is not a phone number, and hiding it only hurts debugging.
    return match.group(0) if is_ipv4(match.group(0)) else "[phone]"


def _generated(match: re.Match[str]) -> str:
    text = match.group(0)
    mixed = any(c.isupper() for c in text) and any(c.islower() for c in text) and any(c.isdigit() for c in text)
    return "[key]" if mixed else text


class _Rule(NamedTuple):
    label: str
    pattern: re.Pattern[str]
    replace: str | Callable[[re.Match[str]], str]  # the label, or what decides whether a match is masked
    # What any match needs, checked first: a text without it cannot match, so the pattern is skipped (for most
    # prompts a dozen scans become a few substring checks, with the same result; tests pin each condition).
    literals: tuple[str, ...] = ()  # one of these in the text
    need: re.Pattern[str] | None = None  # found in the text lowered (searched once per text: masks add none)
    shape: re.Pattern[str] | None = None  # on ASCII text, found in its marks (taken once: masks add none either)


_DIGIT: Final = re.compile(r"\d")

# A password said in prose ("my password is hunter2", "the passcode for the gate is 4417", "PIN 1234"): the word
# after "is" or a colon, or digits right after the keyword; not an ordinary word after "is" ("the password field
# is required", "the password you entered is incorrect" were masked), as no one's password is "required". Too
# loose still for a detector that acts on its matches, so `patterns_for` leaves it out. The keyword's case is
# folded for ASCII only ("paſsword" is no keyword), so that its need, in the lowered text, is exact.
_ORDINARY: Final = (
    "a|an|the|this|that|it|its|my|your|our|their|his|her|not|no|now|also|still|too|very|so|only|just|never|always|"
    "already|being|been|same|different|in|on|at|for|from|to|of|with|by|about|like|required|optional|mandatory|"
    "needed|missing|empty|blank|wrong|incorrect|invalid|correct|valid|weak|strong|long|short|expired|changed|reset|"
    "set|saved|stored|hashed|encrypted|hidden|shown|sent|used|accepted|rejected|secure|case|updated|forgotten|"
    "locked|shared|generated"
)
_SAID_SECRET: Final = re.compile(
    r"\b(?ai:pass(?:word|wd|code|phrase)|pwd|pin)\b"
    r"(?:(?:\s+\w+){0,3}?(?:\s*[:=]|\s+(?i:is|was)\b(?:\s*[:=]|(?!\s+(?i:" + _ORDINARY + r")\b)))|(?=\s+\d))\s*\S+"
)
_SAID_NEED: Final = r"pass|pwd|pin\b(?<!\wpin)"  # "pin" as a word ("typing" has none), led by its literal: fast

# A street address in its commonest written forms: a house number, one to three capitalised words and a street
# word ("12 Baker Street", "221B Baker St"), or a German or Dutch street name and its number ("Hauptstraße 5").
# Other forms ("12 baker street", "12 rue de la Paix", a street without its number) are not masked.
_ADDRESS: Final = re.compile(
    r"\b\d{1,5}[A-Za-z]?,?\s+(?:[A-Z][\w'-]*\s+){1,3}"
    r"(?:(?i:street|road|avenue|lane|drive|boulevard|court|place|square|terrace|crescent|highway|parkway)"
    r"|St|Rd|Ave|Ln|Blvd|Ct|Way|Close)\b"
)
_STRASSE: Final = re.compile(r"\b[A-ZÄÖÜ][\w-]*(?:straße|strasse|str\.|straat|weg|gasse|platz|allee|laan)\s+\d{1,4}[a-z]?\b")

_PEM: Final = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----(?:[\s\S]*?-----END[A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----|[\s\S]*)"
)
_GENERATED: Final = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
# An IBAN in lower case ("de89 3704 ..."): a lower-case run of letters and digits is common in code (a hash, an
# id), so here the check digits must pass too.
_IBAN_FOLDED: Final = re.compile(IBAN.pattern, re.ASCII | re.IGNORECASE)
# Rules for log lines only: too loose (a said password) or too new to a detector's kinds (`safety/pii.py`'s `key`
# and `iban` act on their matches: they refuse or scrub requests), so `patterns_for` leaves them out.
_LOG_ONLY: Final = frozenset({_SAID_SECRET, _PEM, _GENERATED, _IBAN_FOLDED})

_RULES: Final = (
    # Credentials first, so a key that happens to contain digits is not taken for a phone number.
    _Rule("[key]", re.compile(r"\bsk-(?:ant-)?[A-Za-z0-9_-]{16,}"), "[key]", ("sk-",)),
    _Rule("[key]", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), "[key]", ("AKIA", "ASIA")),
    _Rule("[key]", re.compile(r"\b(?:ghp|gho|ghs|xox[abpr])[-_][A-Za-z0-9_-]{10,}"), "[key]", ("gh", "xox")),
    _Rule("[key]", re.compile(r"\bAIza[0-9A-Za-z_-]{30,}"), "[key]", ("AIza",)),
    _Rule("[token]", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"), "[token]", need=re.compile("bearer")),
    _Rule("[token]", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), "[token]", ("eyJ",)),  # JWT
    # A private key's PEM block, to its end line (or the text's end: a prefix cuts it).
    _Rule("[key]", _PEM, "[key]", ("PRIVATE KEY",)),
    # 40 characters of base64 mixing cases and digits, alone: an AWS secret access key's shape (and other
    # generated secrets'); a git commit id, lower-case hex, is spared.
    _Rule("[key]", _GENERATED, _generated, need=_DIGIT, shape=re.compile(r"[0Aa/+]{40}")),
    _Rule("[secret]", re.compile(r"(?i)\b(?:api[_-]?key|secret|password|passwd|token)\s*[:=]\s*\S+"), "[secret]", (":", "=")),
    _Rule("[secret]", _SAID_SECRET, "[secret]", need=re.compile(_SAID_NEED)),
    _Rule("[email]", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]", ("@",)),
    _Rule("[iban]", IBAN, _iban, need=_DIGIT, shape=re.compile("AA00")),  # before cards, whose pattern takes its digits
    _Rule("[iban]", _IBAN_FOLDED, _iban_folded, need=_DIGIT, shape=re.compile("[Aa]{2}00")),
    # Each before the phone pattern, which would take a card or social security number, an IPv4 address or a date.
    _Rule("[card]", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), "[card]", need=_DIGIT, shape=re.compile(r"0(?:[ -]?0){12}")),
    _Rule("[ssn]", re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[ssn]", need=_DIGIT, shape=re.compile("000-00-0000")),
    _Rule("[address]", _ADDRESS, "[address]", need=_DIGIT, shape=re.compile(r"0[Aa]?,?\s+A")),
    _Rule("[address]", _STRASSE, "[address]", ("stra", "str.", "weg", "gasse", "platz", "allee", "laan"), _DIGIT),
    # IP addresses: masked in user text, kept in operational messages (`keep_ips`).
    _Rule("[ip]", re.compile(rf"(?<![\w.]){_IPV4.pattern}{_END}"), "[ip]", need=_DIGIT, shape=re.compile(r"0\.0+\.0+\.0")),
    _Rule("[ip]", re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"), _ipv6,
          need=re.compile(r":[0-9a-f]{0,4}:")),
    _Rule("[date]", re.compile(rf"(?<![\w.])(?:{DATE.pattern}){_END}"), "[date]", need=_DIGIT,
          shape=re.compile(r"0[-/.]00?[-/.]0")),
    _Rule("[phone]", re.compile(rf"(?<![\w.])\+?\d[\d ().-]{{6,}}\d{_END}"), "[phone]", need=_DIGIT,
          shape=re.compile(r"0[0 ().-]{6,}0")),
)
# Operational messages ("connect to 127.0.0.1 failed") keep their addresses: the phone pattern spares them too.
_KEEP_IPS: Final = tuple(
    rule._replace(replace=_unless_ipv4) if rule.label == "[phone]" else rule for rule in _RULES if rule.label != "[ip]"
)
# Some rule's condition: a text with none of the literals of the rules that need nothing else, no digit and none of
# `_ANY_NEED_LOWERED` in its lowered form (most short prompts) is returned as it is. (Substring tests: a regex
# alternation tries each at every position, twice as slow.) The other rules' needs are a digit, or those two words,
# or (IPv6) a colon, one of the literals.
_ANY_NEED: Final = tuple(dict.fromkeys(literal for rule in _RULES if rule.need is None for literal in rule.literals))
_ANY_NEED_LOWERED: Final = re.compile(rf"bearer|{_SAID_NEED}")


def _needs_no_rule(text: str, lowered: str) -> bool:
    for literal in _ANY_NEED:
        if literal in text:
            return False
    return _DIGIT.search(text) is None and _ANY_NEED_LOWERED.search(lowered) is None


def patterns_for(label: str) -> tuple[re.Pattern[str], ...]:
    """The redactor's patterns for one label ("[key]", "[token]", "[secret]", "[email]", "[iban]", "[card]", "[ssn]",
    "[address]", "[ip]", "[date]", "[phone]"), in the order it applies them: for detectors that narrow them
    (`safety/pii.py`) rather than copy them."""
    return tuple(rule.pattern for rule in _RULES if rule.label == label and rule.pattern not in _LOG_ONLY)


# How far past the prefix we redact before cutting: a secret straddling the cut is matched whole.
_LOOKAHEAD: Final = 128
_EXCEPTION_CHARS: Final = 300  # of an exception's message in a log line


class Redactor:
    """Masks PII and credentials; `literals` are exact secrets (the configured API key) masked anywhere."""

    def __init__(self, literals: Iterable[str] = ()) -> None:
        self._literals = tuple(s for s in literals if len(s) >= 8)
        self._named: dict[str, re.Pattern[str]] = {}  # label -> an operator's pattern

    def mask_also(self, named: Mapping[str, re.Pattern[str]]) -> None:
        """The data policy's own kinds (`patterns`), masked as `[name]` in every text from now on (and kept:
        a reload that drops one cannot unmask what it might still meet)."""
        self._named.update({f"[{name}]": pattern for name, pattern in named.items()})

    def redact(self, text: str, *, keep_ips: bool = False) -> str:
        """`text` with PII and credentials masked. User text (the default) loses its IP addresses too; an
        operational message (an exception's, a library's: `keep_ips`) keeps them, as it needs them to be read."""
        for secret in self._literals:
            if secret in text:
                text = text.replace(secret, "[key]")
        for label, pattern in self._named.items():
            text = pattern.sub(label, text)
        lowered = text.lower()
        if _needs_no_rule(text, lowered):
            return text
        shapes = marks(text) if text.isascii() else None
        found: dict[re.Pattern[str], bool] = {}
        for rule in _KEEP_IPS if keep_ips else _RULES:
            if rule.literals and not any(literal in text for literal in rule.literals):
                continue
            if rule.need is not None:
                hit = found.get(rule.need)
                if hit is None:
                    hit = found[rule.need] = rule.need.search(lowered) is not None
                if not hit:
                    continue
            if shapes is not None and rule.shape is not None and rule.shape.search(shapes) is None:
                continue
            text = rule.pattern.sub(rule.replace, text)
        return text

    def exception(self, exc: BaseException) -> str:
        """EXC's message for a log line: an operational message (IP addresses kept), cut short, as it may quote
        what a client sent."""
        return self.redact(str(exc), keep_ips=True)[:_EXCEPTION_CHARS]

    def prefix(self, text: str, limit: int) -> str:
        """The first `limit` characters of `text`, redacted, on one line."""
        if limit <= 0 or not text:
            return ""
        cut = self.redact(text[: limit + _LOOKAHEAD]).replace("\n", " ").replace("\r", " ")
        return cut if len(cut) <= limit and len(text) <= limit else cut[: limit - 1] + "…"


def pseudonym(value: str, salt: bytes) -> str:
    """A stable, salted stand-in for an identifier (the `user` key), so logs can group without naming."""
    return hashlib.blake2b(value.encode(), key=salt, digest_size=8).hexdigest()
