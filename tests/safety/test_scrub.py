"""Outbound scrubbing: placeholders round-trip, restore on streams, and report kinds, never values."""

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecard.safety.pii import KINDS
from sidecard.safety.scrub import Placeholders, Scrubber
from tests.safety import FAKE_API_KEY

SCRUB = Scrubber([*KINDS, "employee_id"], {"employee_id": r"EMP-[0-9]{6}"})

PII_PIECES = ["bob@example.com", "alice@example.org", "+44 20 7946 0958", "4111 1111 1111 1111", "123-45-6789",
              "AB123456C", "GB82WEST12345698765432", FAKE_API_KEY, "EMP-123456",
              "[EMAIL_1]", "[EMAIL_2]", "[CARD_7]", "[", "]", "_1", "EMAIL", "[EMAIL_", " ", "hello", "\n", "the", "ß"]
texts = st.lists(st.sampled_from(PII_PIECES) | st.text(max_size=5), max_size=25).map("".join)


def test_values_become_numbered_placeholders_and_the_same_value_the_same_one():
    (system, user), mapping = SCRUB.scrub(["Reply to bob@example.com.", "I am bob@example.com, card 4111 1111 1111 1111,"
                                           " colleague alice@example.org, employee EMP-123456."])
    assert system == "Reply to [EMAIL_1]."
    assert user == "I am [EMAIL_1], card [CARD_1], colleague [EMAIL_2], employee [EMPLOYEE_ID_1]."
    assert mapping.rules == ["card", "email", "employee_id"]
    assert dict(mapping.counts) == {"email": 3, "card": 1, "employee_id": 1}
    assert "bob" not in repr(mapping.rules) + repr(dict(mapping.counts))


def test_numbering_starts_above_placeholder_shaped_text_already_in_the_request():
    (first, second), mapping = SCRUB.scrub(["see [EMAIL_1]", "my mail is bob@example.com, also [EMAIL_4]"])
    assert second == "my mail is [EMAIL_5], also [EMAIL_4]"
    assert mapping.restore(first + " / " + second) == "see [EMAIL_1] / my mail is bob@example.com, also [EMAIL_4]"


def test_restore_puts_back_only_placeholders_this_request_issued():
    _, mapping = SCRUB.scrub(["card 4111 1111 1111 1111"])
    assert mapping.restore("Your card [CARD_1] ends in 1111; [CARD_2] and [card_1] are not ours.") == (
        "Your card 4111 1111 1111 1111 ends in 1111; [CARD_2] and [card_1] are not ours.")


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, min_size=1, max_size=3))
def test_scrubbing_round_trips(originals):
    scrubbed, mapping = SCRUB.scrub(originals)
    assert [mapping.restore(text) for text in scrubbed] == originals


@settings(max_examples=300, deadline=None)
@given(texts, texts, st.lists(st.integers(1, 9), min_size=1, max_size=10))
def test_a_stream_restores_exactly_what_the_whole_answer_would(request_text, answer_source, sizes):
    scrubbed, mapping = SCRUB.scrub([request_text])
    # The model's answer repeats some placeholders (and may break others) among other text.
    answer = answer_source + scrubbed[0] + answer_source
    restorer = mapping.restorer()
    out, i, k = [], 0, 0
    while i < len(answer):
        size = sizes[k % len(sizes)]
        out.append(restorer.feed(answer[i:i + size]))
        i, k = i + size, k + 1
    out.append(restorer.finish())
    assert "".join(out) == mapping.restore(answer)


def test_the_restorer_holds_back_no_more_than_a_placeholder():
    _, mapping = SCRUB.scrub(["bob@example.com"])
    restorer = mapping.restorer()
    assert restorer.feed("Write to [EMA") == "Write to "
    assert restorer.feed("IL_1] today [") == "bob@example.com today "
    assert restorer.feed("x") == "[x"  # not a placeholder's beginning: released at once
    assert restorer.feed(" [EMAIL_1 and more text") == " [EMAIL_1 and more text"  # longer than any placeholder
    assert restorer.finish() == ""
    empty = Placeholders().restorer()
    assert empty.feed("[EMA") == "[EMA"  # nothing was scrubbed: nothing to hold


def test_forbidden_names_the_kinds_present():
    refuse = Scrubber(["card", "us_ssn", "email"])
    assert refuse.forbidden(["ssn 123-45-6789", "card 4111 1111 1111 1111"]) == ["card", "us_ssn"]
    assert refuse.forbidden(["nothing here"]) == []
