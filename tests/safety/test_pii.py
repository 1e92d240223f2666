"""The PII kinds: each exactly, their precedence, and the cheap conditions that guard their patterns."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecard.safety import pii
from sidecard.safety.pii import KEY_LITERALS, KINDS, PiiMatcher, iban_valid, luhn_valid, marks
from tests.safety import FAKE_API_KEY

ALL = PiiMatcher(KINDS)


def found(text, matcher=ALL):
    return [(text[s.start:s.end], s.kind) for s in matcher.find(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail bob.smith+tag@example.co.uk now", [("bob.smith+tag@example.co.uk", "email")]),
        ("card 4111 1111 1111 1111.", [("4111 1111 1111 1111", "card")]),
        ("card 4111-1111-1111-1111", [("4111-1111-1111-1111", "card")]),
        ("amex 378282246310005", [("378282246310005", "card")]),
        ("ssn 123-45-6789", [("123-45-6789", "us_ssn")]),
        ("NI number AB123456C", [("AB123456C", "uk_nino")]),
        ("NI number JG 12 34 56 D", [("JG 12 34 56 D", "uk_nino")]),
        ("iban GB82 WEST 1234 5698 7654 32", [("GB82 WEST 1234 5698 7654 32", "iban")]),
        ("iban DE89370400440532013000", [("DE89370400440532013000", "iban")]),
        ("call +44 20 7946 0958 today", [("+44 20 7946 0958", "phone")]),
        ("call (555) 123-4567", [("555) 123-4567", "phone")]),
        ("call me on +44 20 7946 0958.", [("+44 20 7946 0958", "phone")]),  # at a sentence's end too
        (f"key {FAKE_API_KEY}", [(FAKE_API_KEY, "key")]),
        ("aws AKIAIOSFODNN7EXAMPLE", [("AKIAIOSFODNN7EXAMPLE", "key")]),
        ("Authorization: Bearer abc.def-123456", [("Bearer abc.def-123456", "key")]),
        ("password = hunter2!", [("password = hunter2!", "key")]),
    ],
)
def test_each_kind_is_found(text, expected):
    assert found(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # fails Luhn
        "order 1234567",  # seven digits: not a phone
        "on 2024-01-15 and 15/01/2024",  # dates
        "server 10.20.30.40",  # IPv4
        "server 10.20.30.40.",
        "NI number DA123456C, QQ123456C, BG123456A, AB123456E",  # D or Q first, BG prefix, suffix E
        "iban GB82WEST12345698765433",  # bad check digits
        "the 30 days return policy, version 4.2, step 1 of 3",
        "email at example dot com, or user@localhost",
        "sk- is a prefix; AKIA alone is nothing",
    ],
)
def test_lookalikes_are_not_found(text):
    assert found(text) == []


def test_invalid_ssn_parts_are_not_ssns():
    assert found("000-12-3456, 666-12-3456, 900-12-3456, 123-00-4567, 123-45-0000", PiiMatcher(["us_ssn"])) == []


def test_overlaps_go_to_the_kind_listed_first():
    # A card number is also a run of digits the phone pattern takes; the card wins, and only once.
    assert found("pay with 4111 1111 1111 1111 please") == [("4111 1111 1111 1111", "card")]
    # An SSN is also a phone-shaped run of 9 digits; with SSNs not asked for, the phone rule still needs 8+ digits.
    assert found("id 123-45-6789", PiiMatcher(["phone"])) == [("123-45-6789", "phone")]
    assert found("id 123-45-6789", PiiMatcher(["phone", "us_ssn"])) == [("123-45-6789", "us_ssn")]


def test_only_the_asked_kinds_and_named_patterns_are_found():
    matcher = PiiMatcher(["email", "employee_id"], {"employee_id": r"EMP-[0-9]{6}", "unused": "x"})
    assert matcher.kinds == ("email", "employee_id")
    assert found("EMP-123456 wrote to a@b.io from +44 20 7946 0958", matcher) == [
        ("EMP-123456", "employee_id"), ("a@b.io", "email")]
    assert matcher.kinds_in("EMP-000001 and EMP-000002") == ["employee_id"]
    with pytest.raises(ValueError, match="unknown data kind 'dna'"):
        PiiMatcher(["dna"])


def test_luhn_and_mod97():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert iban_valid("GB82WEST12345698765432") and not iban_valid("GB82WEST12345698765431")
    assert not iban_valid("GB82WEST")  # too short


def test_marks_keep_the_shape_of_digits_and_capitals():
    assert marks("AB 12-3x_é") == "AA 00-0aaé"


@pytest.mark.parametrize("kind", ["card", "us_ssn", "uk_nino", "iban", "phone"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_each_shape_gate_is_necessary_for_its_kind(kind, data):
    # On ASCII text a kind's regex is skipped when its gate is absent from the marks: that must never hide a match.
    (finder,) = pii._FINDERS[kind]
    (pattern,) = finder.patterns
    text = data.draw(st.from_regex(pattern, alphabet=st.characters(codec="ascii")))
    match = pattern.search(text)
    if match is not None and (finder.valid is None or finder.valid(match.group())):
        assert finder.gate.search(marks(text)), text


def test_find_from_a_position_sees_the_character_before_it():
    text = "xbob@example.com"
    assert [s.start for s in PiiMatcher(["email"]).find(text, 1)] == [1]
    assert PiiMatcher(["uk_nino"]).find("XAB123456C", 1) == []  # \b before the prefix needs a non-word char


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_each_credential_pattern_cannot_match_without_its_literal(data):
    # The literal guards skip a pattern when none of its literals is present: that must never hide a match.
    for pattern, literals, folded in zip(pii._KEY_PATTERNS, KEY_LITERALS, pii._FOLDED_KEYS, strict=True):
        text = data.draw(st.from_regex(pattern, fullmatch=False))
        assert pattern.search(text)
        haystack = text.casefold() if folded else text
        assert any(lit in haystack for lit in literals), (pattern.pattern, text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789 -+().@abcXYZ_kK"), max_size=60))
def test_no_span_overlaps_another_and_each_is_valid(text):
    spans = ALL.find(text)
    for a, b in zip(spans, spans[1:]):
        assert a.end <= b.start
    for span in spans:
        assert span.kind in KINDS and span.end > span.start
        assert re.search(r"\S", text[span.start:span.end])


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab.-_+%@ c1é\n"), max_size=40), st.integers(0, 5))
def test_the_email_scan_finds_what_the_redactors_pattern_finds(text, pos):
    (pattern,) = pii._FINDERS["email"][0].patterns
    assert [m.span() for m in pii._scan_emails(pattern, text, pos)] == [m.span() for m in pattern.finditer(text, pos)]
