import os
import random
import sqlite3
import stat

import pytest

from sidecard.experiments.feedback import Issued
from sidecard.experiments.review import (
    LabelRefused,
    NewItem,
    ReviewSettings,
    ReviewStore,
    Served,
    Signals,
    probability,
    reasons,
    sample,
)

SETTINGS = ReviewSettings(rate=0.01, rates={"support-reply": 0.05, "feature:chat": 0.02})


def item(n: int, prompt: str = "support-reply", **fields) -> NewItem:
    served = Issued(feature="chat", model="claude-sonnet-4-6", prompt=prompt, version=2, experiment="tone", arm="b")
    return NewItem(**{"request_id": f"r-{n}", "served": served, "question": "where is my order [email]",
                      "answer": "It ships today.", **fields})


@pytest.fixture
def store(tmp_path):
    opened = ReviewStore(tmp_path / "review.sqlite3", ReviewSettings(max_items=5, retention_s=1000, max_text_chars=40))
    yield opened
    opened.close()


# ---------------------------------------------------------------- sampling


def test_the_base_rate_is_per_prompt_then_per_feature_then_the_default():
    assert probability(SETTINGS, "support-reply", "chat", Signals()) == 0.05
    assert probability(SETTINGS, "other", "chat", Signals()) == 0.02
    assert probability(SETTINGS, None, "chat", Signals()) == 0.02
    assert probability(SETTINGS, None, "search", Signals()) == 0.01


def test_low_scores_negative_feedback_and_check_failures_weigh_more():
    assert probability(SETTINGS, None, "search", Signals(judge_score=0.49)) == pytest.approx(0.1)
    assert probability(SETTINGS, None, "search", Signals(judge_score=0.5)) == pytest.approx(0.01)
    assert probability(SETTINGS, None, "search", Signals(negative_feedback=True)) == pytest.approx(0.1)
    assert probability(SETTINGS, None, "search", Signals(failed_checks=("refusal",))) == pytest.approx(0.05)
    everything = Signals(judge_score=0.1, negative_feedback=True, failed_checks=("empty",))
    assert probability(SETTINGS, None, "search", everything) == 1.0
    assert reasons(SETTINGS, everything) == ["low_score", "negative_feedback", "check_failure"]


def test_sampling_draws_from_the_injected_rng():
    rng = random.Random(5)
    picked = sum(sample(SETTINGS, "support-reply", "chat", Signals(), rng) for _ in range(10_000))
    assert picked == pytest.approx(500, abs=70)
    assert all(sample(SETTINGS, None, "x", Signals(judge_score=0.0, negative_feedback=True), rng) for _ in range(100))


# ---------------------------------------------------------------- the store


def test_the_store_file_and_its_journal_are_private_whatever_the_umask(tmp_path):
    path = tmp_path / "review.sqlite3"
    old = os.umask(0)
    try:
        opened = ReviewStore(path, SETTINGS)
        opened._db.execute("BEGIN")
        opened._db.execute("INSERT INTO items (request_id, created_at, feature, model, question, answer,"
                           " negative_feedback, failed_checks, reasons) VALUES ('x', 0, 'f', 'm', '', '', 0, '[]', '[]')")
        journal = tmp_path / "review.sqlite3-journal"
        assert journal.exists() and stat.S_IMODE(journal.stat().st_mode) == 0o600
        opened._db.execute("COMMIT")
        opened.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)  # loosened by hand: tightened again on open
    ReviewStore(path, SETTINGS).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_items_are_queued_once_per_request_with_why_they_were_sampled(store):
    first = store.add(item(1, signals=Signals(judge_score=0.2, failed_checks=("refusal",))), 10.0)
    assert first == 1 and store.add(item(1), 11.0) is None
    got = store.get(1)
    assert (got.request_id, got.created_at) == ("r-1", 10.0)
    # What the queue keeps of what served it: no canary bit nor issue time, which read as false and 0 (a trial).
    assert got.served == Served(feature="chat", model="claude-sonnet-4-6", prompt="support-reply", version=2,
                                experiment="tone", arm="b")
    assert (got.judge_score, got.negative_feedback, got.failed_checks) == (0.2, False, ["refusal"])
    assert got.reasons == ["low_score", "check_failure"] and got.label is None
    assert store.get(99) is None


def test_long_texts_are_cut(store):
    store.add(item(1, answer="x" * 100), 10.0)
    assert store.get(1).answer == "x" * 40 + "\n[... 60 characters cut ...]"


def test_pages_run_oldest_first_by_state_and_prompt(store):
    for n in range(1, 6):
        store.add(item(n, prompt="support-reply" if n % 2 else "faq"), float(n))
    first = store.page(limit=2)
    assert [i.id for i in first] == [1, 2]
    assert [i.id for i in store.page(after=first[-1].id, limit=2)] == [3, 4]
    assert [i.id for i in store.page(prompt="faq")] == [2, 4]
    store.label(3, "bad", None, 20.0)
    assert [i.id for i in store.page(state="labelled")] == [3]
    assert [i.id for i in store.page()] == [1, 2, 4, 5]
    assert len(store.page(state="all", limit=10_000)) == 5
    assert store.counts() == {"pending": 4, "labelled": 1}


def test_a_label_records_the_note_and_turns_into_a_score(store):
    store.add(item(1), 10.0)
    labelled = store.label(1, "bad", "made up a tracking number", 30.0)
    assert (labelled.label, labelled.note, labelled.labelled_at, labelled.score) == ("bad", "made up a tracking number", 30.0, 0.0)
    store.add(item(2), 10.0)
    assert store.label(2, "unsure", None, 31.0).score is None


def test_labels_are_refused_with_a_typed_reason(store):
    store.add(item(1), 10.0)
    assert store.label(1, "meh", None, 20.0) == LabelRefused("unknown_label", "label must be one of: good, bad, unsure")
    assert store.label(1, "good", "x" * 2001, 20.0).reason == "note_too_long"
    assert store.label(7, "good", None, 20.0).reason == "unknown_item"
    store.label(1, "good", None, 20.0)
    assert store.label(1, "bad", None, 21.0) == LabelRefused("already_labelled", "item 1 is already labelled 'good'")
    assert store.get(1).label == "good"


def test_retention_and_the_size_bound_delete_the_oldest(store):
    for n in range(1, 8):
        store.add(item(n), float(n))
    assert [i.id for i in store.page(state="all")] == [3, 4, 5, 6, 7]  # at most 5
    assert store.prune(1004.5) == 2  # 3 and 4: created before 4.5, with a retention of 1000 s
    assert [i.id for i in store.page(state="all")] == [5, 6, 7]
    store.add(item(8), 1006.5)  # adding prunes too
    assert [i.id for i in store.page(state="all")] == [7, 8]


def test_deleted_text_is_overwritten_and_the_store_survives_a_reopen(tmp_path):
    path = tmp_path / "review.sqlite3"
    first = ReviewStore(path, ReviewSettings(retention_s=10))
    first.add(item(1, answer="SECRET-ANSWER"), 0.0)
    first.add(item(2), 5.0)
    first.label(2, "good", "fine", 6.0)
    first.close()
    again = ReviewStore(path, ReviewSettings(retention_s=10))
    assert again.get(2).label == "good" and again.get(1).answer == "SECRET-ANSWER"
    assert again.prune(10.5) == 1
    again.close()
    assert b"SECRET-ANSWER" not in path.read_bytes()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,)
