"""The human review queue through the real daemon: answers that fail a check or get negative feedback are queued,
redacted; sidecardctl's ops list, show and label them; a label comes back as a score to the experiment arm."""

import os
import stat

import trio

from sidecard import ctl
from tests.harness import admin, connect

REFUSAL = "[[sim:say:I'm sorry, but I can't help with that request.]]"
QUALITY = {"enabled": True, "sample_rate": 0.0, "canary_sample_rate": 0.0}
SPLIT = {"name": "models", "feature": "chat", "primary": "review_score", "min_samples": 50,
         "arms": [{"name": "sonnet", "model": "claude-sonnet-4-6"}, {"name": "haiku", "model": "claude-haiku-4-5-20251001"}]}


async def until(predicate):
    """The store is written from a thread: wait (real time, briefly) for it."""
    with trio.fail_after(10):
        while not await predicate():
            await trio.sleep(0.01)


async def test_flagged_answers_are_queued_redacted_and_a_label_scores_the_arm(daemon_factory, short_tmp, capture_log):
    path = os.path.join(short_tmp, "review.db")
    review = {"enabled": True, "path": path, "rate": 0.0, "rates": {"feature:chat": 0.05},
              "check_failure_weight": 20.0, "negative_feedback_weight": 20.0}
    d = await daemon_factory(quality=QUALITY, review=review, experiments=[SPLIT])
    client = await connect(d)
    refused = await client.complete(f"{REFUSAL} mail me at jane@example.com", feature="chat", user="u1")
    disliked = await client.complete("[[sim:say:Paris is in Spain.]] where is Paris?", feature="chat", user="u2")
    elsewhere = await client.complete(REFUSAL, feature="other")  # rate 0 outside feature chat
    assert refused["ok"] and disliked["ok"] and elsewhere["ok"]
    assert (await client.call({"op": "feedback", "request_id": disliked["request_id"], "thumbs": "down"}))["ok"]

    async def both_queued():
        page = (await admin(d, {"op": "review.list"}))["result"]
        return len(page["items"]) >= 2 and page

    await until(both_queued)
    page = (await admin(d, {"op": "review.list"}))["result"]
    assert {i["request_id"]: i["reasons"] for i in page["items"]} == {
        refused["request_id"]: ["check_failure"], disliked["request_id"]: ["negative_feedback"]}
    assert page["counts"] == {"pending": 2, "labelled": 0}
    first = page["items"][0]["id"]
    shown = (await admin(d, {"op": "review.show", "item": first}))["result"]
    assert "jane@example.com" not in shown["question"] and "[email]" in shown["question"]
    assert "refusal" in shown["failed_checks"] and shown["served"]["experiment"] == "models"
    assert "QUESTION (redacted)" in ctl.render({"op": "review.show", "ok": True, "result": shown})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    labelled = await admin(d, {"op": "review.label", "item": first, "label": "bad", "note": "refused a fair question"})
    assert labelled["ok"] and labelled["after"]["score"] == 0.0 and labelled["after"]["label"] == "bad"
    # The audit line had the item whole: its question and answer (a second fresh-clone trial).
    (audit,) = [e for e in capture_log.events("admin") if e["op"] == "review.label" and e["result"] == "ok"]
    assert "question" not in audit["before"] and "answer" not in audit["after"] and "[email]" not in str(audit)
    again = await admin(d, {"op": "review.label", "item": first, "label": "good"})
    assert again["error"]["code"] == "bad_request" and "already labelled" in again["error"]["message"]
    (view,) = (await admin(d, {"op": "experiment.status"}))["result"]["experiments"]
    arm = next(a for a in view["arms"] if a["name"] == shown["served"]["arm"])
    assert arm["samples"]["review_score"] == 1 and arm["means"]["review_score"] == 0.0
    assert "review queue: 1 pending, 1 labelled" in ctl.render(
        {"op": "review.list", "ok": True, "result": (await admin(d, {"op": "review.list", "state": "all"}))["result"]})


async def test_an_answer_a_guardrail_flags_is_always_queued_for_review(daemon_factory, short_tmp):
    review = {"enabled": True, "path": os.path.join(short_tmp, "review.db"), "rate": 0.0}
    flag = {"checks": [{"kind": "regex", "pattern": "flag+me", "action": "flag", "name": "odd"}]}
    d = await daemon_factory(review=review, safety={"guardrails": {"features": {"chat": flag}}})
    client = await connect(d)
    flagged = await client.complete("[[sim:say:please flaggme, jane@example.com]]", feature="chat")
    plain = await client.complete("[[sim:say:nothing odd here]]", feature="chat")
    assert flagged["guardrails"] == ["odd:flag"] and plain["ok"]

    async def queued():
        return (await admin(d, {"op": "review.list"}))["result"]["items"]

    await until(queued)
    (item,) = await queued()
    assert item["request_id"] == flagged["request_id"] and item["reasons"] == ["guardrail_flag"]
    shown = (await admin(d, {"op": "review.show", "item": item["id"]}))["result"]
    assert "jane@example.com" not in shown["answer"] and "flaggme" in shown["answer"]
