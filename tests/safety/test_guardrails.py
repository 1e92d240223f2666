"""Output guardrails: each check, the decision an answer gets, and the streaming checker."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecard.prompts.files import OutputSpec
from sidecard.safety.guardrails import CHECK_ERROR, Guard, Guardrails, compile_scope
from sidecard.safety.settings import parse


def guard(*checks, output=None, **scope):
    settings_ = parse({"guardrails": {"prompts": {"p": {"checks": list(checks), **scope}}}})
    return Guard([compile_scope(settings_.guardrails.prompts["p"])], output)


REGEX = {"kind": "regex", "name": "ids", "pattern": r"INTERNAL-[0-9]+", "action": "redact"}
BLOCK = {"kind": "blocklist", "name": "rivals", "words": ["Competitor Corp", "xyzzy"], "action": "block"}
PII = {"kind": "pii", "name": "pii", "kinds": ["email", "card"], "action": "redact"}


def test_an_answer_no_check_fires_on_passes_unchanged():
    decision = guard(REGEX, BLOCK, PII).check("All good here.")
    assert decision.outcome == "pass" and decision.text == "All good here." and decision.findings == ()


def test_redact_masks_every_match_and_names_the_checks():
    decision = guard(REGEX, PII).check("Ask bob@example.com about INTERNAL-42 or INTERNAL-7.")
    assert decision.outcome == "redact"
    assert decision.text == "Ask [email] about [redacted] or [redacted]."
    assert decision.rules == ["ids:redact", "pii:redact"]


def test_findings_never_carry_the_matched_text_for_logs():
    decision = guard({**REGEX, "action": "flag"}).check("INTERNAL-42")
    assert decision.outcome == "flag" and decision.text == "INTERNAL-42"
    assert decision.findings[0].spans == () and "INTERNAL" not in repr(decision.rules)


@pytest.mark.parametrize(
    ("text", "blocked"),
    [
        ("We beat Competitor Corp.", True),
        ("we beat COMPETITOR\n  corp easily", True),  # any case, any whitespace inside a phrase
        ("Competitor Corporation is another firm", False),  # whole words only
        ("the word xyzzyx", False),
        ("(xyzzy)", True),
    ],
)
def test_blocklist_matches_whole_words_in_any_case(text, blocked):
    assert (guard(BLOCK).check(text).outcome == "block") is blocked


def test_the_strongest_action_wins():
    g = guard({**REGEX, "action": "flag"}, PII, BLOCK)
    assert g.check("INTERNAL-1").outcome == "flag"
    assert g.check("INTERNAL-1 a@b.io").outcome == "redact"
    decision = g.check("INTERNAL-1 a@b.io xyzzy")
    assert decision.outcome == "block" and decision.rules == ["ids:flag", "pii:redact", "rivals:block"]


def test_json_schema_uses_the_prompts_declared_output_and_asks_once_more():
    spec = OutputSpec(format="json", schema={"type": "object", "required": ["category"]})
    g = guard({"kind": "json_schema", "action": "retry"}, output=spec)
    assert g.check('{"category": "billing"}').outcome == "pass"
    assert g.check('```json\n{"category": "billing"}\n```').outcome == "pass"  # the fence is stripped, as for bad_output
    first = g.check('{"urgency": "low"}')
    assert first.outcome == "retry"
    assert first.retry_instruction.startswith("Your previous answer could not be used: $: missing 'category'.")
    # The corrective retry's answer failing again is blocked, never retried a second time.
    assert g.check('{"urgency": "low"}', retried=True).outcome == "block"


def test_json_schema_with_its_own_schema_and_invalid_json():
    g = guard({"kind": "json_schema", "schema": {"type": "array"}, "action": "block"})
    assert g.check("[1, 2]").outcome == "pass"
    decision = g.check("not json")
    assert decision.outcome == "block" and decision.findings[0].problem == "the answer is not valid JSON"


def test_length_bounds():
    g = guard({"kind": "length", "min_chars": 3, "max_chars": 10, "action": "retry"})
    assert g.check("ab").retry_instruction == (
        "Your previous answer could not be used: it had 2 characters, fewer than 3. Answer again within that length.")
    assert g.check("abc").outcome == "pass"
    assert g.check("x" * 11).findings[0].problem == "it had 11 characters, more than 10"


def test_a_check_that_raises_is_a_typed_finding_with_the_scopes_on_error_action():
    # A json_schema check without a schema on a prompt that declares no JSON output cannot run.
    check = {"kind": "json_schema", "name": "shape", "action": "block"}
    decision = guard(check).check("{}")
    assert decision.outcome == "flag"
    assert decision.findings[0][:3] == ("shape", CHECK_ERROR, "flag") and decision.findings[0].problem == "LookupError"
    assert guard(check, on_error="block").check("{}").outcome == "block"


def test_judges_are_sampled_at_their_rate_and_their_verdict_is_a_finding():
    g = guard({"kind": "judge", "name": "medical", "policy": "No medical advice.", "sample_rate": 0.25,
               "min_score": 0.6, "action": "block"})
    rng = random.Random(7)
    sampled = sum(bool(g.sample_judges(rng)) for _ in range(4000))
    assert 900 < sampled < 1100
    task = g.judges[0]
    assert g.judge_finding(task, 0.6) is None
    low = g.judge_finding(task, 0.2)
    assert g.check("answer", judged=[low]).outcome == "block"
    assert g.judge_finding(task, None)[1:3] == (CHECK_ERROR, "flag")


def test_requests_get_their_prompts_features_and_routes_checks():
    settings_ = parse({"guardrails": {
        "prompts": {"p": {"checks": [REGEX], "on_block": "fallback"}},
        "features": {"f": {"checks": [BLOCK], "on_error": "block"}},
        "routes": {"r": {"checks": [], "stream_hold_chars": 999}},
    }})
    guardrails = Guardrails(settings_.guardrails)
    assert guardrails.for_request(prompt=None, feature="other", route="r") is None  # an empty scope adds nothing
    g = guardrails.for_request(prompt="p", feature="f", route="r")
    assert [c.name for c in g.checks] == ["ids", "rivals"]
    assert (g.on_block, g.on_error) == ("fallback", "block")


# ---------------------------------------------------------------- streams


def run_stream(g, pieces):
    stream = g.stream()
    sent = []
    for piece in pieces:
        step = stream.feed(piece)
        sent.append(step.text)
        if step.blocked is not None:
            return "".join(sent), step.blocked
    rest, decision = stream.finish()
    return "".join(sent) + rest, decision


def chunks(text, size):
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_a_blocked_stream_stops_before_any_of_the_match_is_sent():
    text = "Sure. " + "Some words. " * 20 + "We partner with Competitor Corp. " + "More. " * 20
    sent, decision = run_stream(guard(BLOCK), chunks(text, 5))
    assert decision.outcome == "block" and decision.rules == ["rivals:block"]
    assert "Competitor" not in sent and "Compet" not in sent
    assert sent.startswith("Sure. Some words.") and decision.text == sent


def test_a_stream_redacts_matches_split_across_deltas():
    text = "Write to bob.smith@example.com or see INTERNAL-12345 for details. " * 3
    sent, decision = run_stream(guard(REGEX, PII), chunks(text, 3))
    assert sent == guard(REGEX, PII).check(text).text
    assert decision.outcome == "redact" and decision.text == sent


FRAGMENTS = ["hello", "world", "\n", "bob@example.com", "INTERNAL-42", "Competitor", "Corp", "4111 1111 1111 1111",
             ".", "x", "@", "-", "INTERNAL-", "99"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.lists(st.integers(1, 12), min_size=1, max_size=20),
       st.sampled_from([0, 16, 64, 128]))
def test_what_a_stream_sends_does_not_depend_on_how_it_was_cut(fragments, sizes, hold):
    # Exact for matches (and runs of overlapping matches) no longer than the hold; spaces keep runs short here.
    g = guard(REGEX, PII, {**BLOCK, "action": "redact"}, stream_hold_chars=max(hold, 40))
    text = " ".join(fragments)
    pieces, i = [], 0
    while i < len(text):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(text[i:i + size])
        i += size
    sent, decision = run_stream(g, pieces)
    assert sent == g.check(text).text
    assert decision.outcome == g.check(text).outcome


def test_a_match_longer_than_the_hold_that_went_out_unmasked_blocks_at_the_end():
    g = guard(PII, stream_hold_chars=8)
    sent, decision = run_stream(g, chunks("Contact bob.smith.longname@example.com today.", 1))
    assert "bob.smith" in sent  # it went out before the whole address was seen
    assert decision.outcome == "block" and decision.findings[0].action == "block"


def test_with_no_hold_text_goes_out_at_once_and_matches_are_found_after():
    g = guard(BLOCK, stream_hold_chars=0)
    stream = g.stream()
    assert stream.feed("hello ").text == "hello "
    step = stream.feed("xyzzy")
    assert step.blocked is not None and step.text == ""


def test_a_stream_without_text_checks_is_not_held_back():
    g = guard({"kind": "length", "max_chars": 12, "action": "block"}, {"kind": "json_schema", "schema": {"type": "object"},
                                                                       "action": "flag"})
    stream = g.stream()
    assert stream.feed("{\"a\": ").text == "{\"a\": "
    assert stream.feed("1}").text == "1}"
    step = stream.feed("     more")  # 16 characters: over the ceiling
    assert step.blocked.rules == ["length.0:block"] and step.text == ""
    assert stream.feed("ignored") == (("", step.blocked))


def test_checks_that_need_the_whole_answer_run_at_the_end_and_a_stream_cannot_retry():
    g = guard({"kind": "json_schema", "schema": {"type": "object"}, "action": "retry"})
    sent, decision = run_stream(g, ["not ", "json"])
    assert sent == "not json" and decision.outcome == "block" and decision.rules == ["json_schema.0:block"]
    _, flagged = run_stream(guard({**REGEX, "action": "flag"}), ["INTERNAL", "-1"])
    assert flagged.outcome == "flag"


def test_a_stream_check_that_raises_does_not_end_the_stream_unless_told_to(monkeypatch):
    for on_error, expected in (("flag", "flag"), ("block", "block")):
        g = guard(REGEX, on_error=on_error, stream_hold_chars=0)
        check = g.streamed[0]

        def broken(text, pos):
            raise RuntimeError("boom")

        monkeypatch.setattr(type(check), "spans", broken)
        sent, decision = run_stream(g, ["INTERNAL-1 ", "ok"])
        assert decision.outcome == expected
        assert decision.findings[0][:2] == ("ids", CHECK_ERROR)
        if on_error == "flag":
            assert sent == "INTERNAL-1 ok"
