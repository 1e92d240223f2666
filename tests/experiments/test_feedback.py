import msgspec
import pytest

from sidecard.experiments.feedback import Feedback, FeedbackItem, FeedbackLedger, FeedbackSettings, Issued, Reason, Refused

SERVED = Issued(feature="chat", model="claude-sonnet-4-6", route="default", prompt="support-reply", version=3,
                experiment="tone", arm="candidate")


def ledger(**settings) -> FeedbackLedger:
    book = FeedbackLedger(FeedbackSettings(**settings))
    book.issue("r-1", SERVED, 100.0)
    return book


def reason(result) -> Reason:
    assert isinstance(result, Refused), result
    return result.reason


def test_feedback_is_kept_with_what_served_the_request():
    result = ledger().accept(FeedbackItem(request_id="r-1", score=0.25, label="too long", comment="meh"), 160.0)
    assert result == Feedback(request_id="r-1", request=msgspec.structs.replace(SERVED, issued_at=100.0), kind="score",
                              value=0.25, label="too long", comment="meh", at=160.0)
    assert result.negative


@pytest.mark.parametrize("item, kind, value", [
    ({"thumbs": "up"}, "thumbs", 1.0),
    ({"thumbs": "down"}, "thumbs", 0.0),
    ({"signal": "retry"}, "retry", 0.0),
    ({"signal": "abandoned"}, "abandoned", 0.0),
    ({"score": 4}, "score", 0.75),  # 1-5 stars scaled to 0-1
])
def test_thumbs_scores_and_implicit_signals_become_values_from_0_to_1(item, kind, value):
    result = ledger(score_min=1, score_max=5).accept(FeedbackItem(request_id="r-1", **item), 101.0)
    assert isinstance(result, Feedback) and (result.kind, result.value) == (kind, value)
    assert result.negative == (value < 0.5)


def test_a_request_takes_one_score_and_each_signal_once():
    book = ledger()
    assert isinstance(book.accept(FeedbackItem(request_id="r-1", thumbs="up"), 101.0), Feedback)
    refused = book.accept(FeedbackItem(request_id="r-1", score=0.9), 102.0)
    assert refused == Refused(Reason.DUPLICATE, "request r-1 already has a score")
    assert isinstance(book.accept(FeedbackItem(request_id="r-1", signal="retry"), 103.0), Feedback)
    assert book.accept(FeedbackItem(request_id="r-1", signal="retry"), 104.0) == \
        Refused(Reason.DUPLICATE, "request r-1 already has a retry signal")
    assert isinstance(book.accept(FeedbackItem(request_id="r-1", signal="abandoned"), 105.0), Feedback)


@pytest.mark.parametrize("item, expected", [
    ({"request_id": "", "score": 1.0}, Reason.BAD_REQUEST_ID),
    ({"request_id": "r\n1", "score": 1.0}, Reason.BAD_REQUEST_ID),
    ({"request_id": " r-1", "score": 1.0}, Reason.BAD_REQUEST_ID),
    ({"request_id": "r" * 129, "score": 1.0}, Reason.BAD_REQUEST_ID),
    ({"request_id": "r-1"}, Reason.NO_SCORE),
    ({"request_id": "r-1", "score": 1.0, "thumbs": "up"}, Reason.SEVERAL_SCORES),
    ({"request_id": "r-1", "thumbs": "up", "signal": "retry"}, Reason.SEVERAL_SCORES),
    ({"request_id": "r-1", "score": 1.01}, Reason.SCORE_OUT_OF_RANGE),
    ({"request_id": "r-1", "score": -0.01}, Reason.SCORE_OUT_OF_RANGE),
    ({"request_id": "r-1", "score": float("nan")}, Reason.SCORE_OUT_OF_RANGE),
    ({"request_id": "r-1", "score": float("inf")}, Reason.SCORE_OUT_OF_RANGE),
    ({"request_id": "r-1", "score": 1.0, "label": ""}, Reason.BAD_LABEL),
    ({"request_id": "r-1", "score": 1.0, "label": "x" * 65}, Reason.BAD_LABEL),
    ({"request_id": "r-1", "score": 1.0, "label": "a\tb"}, Reason.BAD_LABEL),
    ({"request_id": "r-1", "score": 1.0, "comment": "x" * 2001}, Reason.COMMENT_TOO_LONG),
    ({"request_id": "r-2", "score": 1.0}, Reason.UNKNOWN_REQUEST),
])
def test_bad_feedback_is_refused_with_a_typed_reason_and_nothing_recorded(item, expected):
    book = ledger()
    assert reason(book.accept(FeedbackItem(**item), 101.0)) is expected
    assert isinstance(book.accept(FeedbackItem(request_id="r-1", score=0.5), 102.0), Feedback)


def test_refusals_say_what_is_allowed():
    book = ledger(labels=("helpful", "wrong", "a-label-longer-than-the-free-label-limit-is-fine-when-configured"))
    assert book.accept(FeedbackItem(request_id="r-1", score=2.0), 101.0).message == "score must be from 0 to 1"
    assert book.accept(FeedbackItem(request_id="r-1", score=1.0, label="great"), 101.0).message == \
        "label must be one of: helpful, wrong, a-label-longer-than-the-free-label-limit-is-fine-when-configured"
    assert book.accept(FeedbackItem(request_id="nope", score=1.0), 101.0).message == "no request nope was answered here"
    long_label = FeedbackItem(request_id="r-1", score=1.0, label="a-label-longer-than-the-free-label-limit-is-fine-when-configured")
    assert isinstance(book.accept(long_label, 101.0), Feedback)


def test_ids_expire_after_the_retention_and_say_so():
    book = ledger(retention_s=3600)
    assert book.lookup("r-1", 3699.0) is not None
    assert book.lookup("r-1", 3700.0) is None and len(book) == 0
    assert book.accept(FeedbackItem(request_id="r-1", score=1.0), 3700.0) == Refused(
        Reason.EXPIRED_REQUEST, "request r-1 is too old for feedback (kept for 1 h, at most 100000 requests)")


def test_the_oldest_ids_are_forgotten_beyond_max_entries_and_so_are_their_tombstones():
    book = ledger(max_entries=2)
    book.issue("r-2", SERVED, 101.0)
    book.issue("r-3", SERVED, 102.0)
    assert len(book) == 2 and book.lookup("r-1", 103.0) is None and book.lookup("r-2", 103.0) is not None
    assert reason(book.accept(FeedbackItem(request_id="r-1", score=1.0), 103.0)) is Reason.EXPIRED_REQUEST
    for i in range(4, 7):
        book.issue(f"r-{i}", SERVED, 100.0 + i)
    # r-1's tombstone made room for newer ones: it is unknown now, r-4 (expired recently) is still known as expired.
    assert reason(book.accept(FeedbackItem(request_id="r-1", score=1.0), 107.0)) is Reason.UNKNOWN_REQUEST
    assert reason(book.accept(FeedbackItem(request_id="r-4", score=1.0), 107.0)) is Reason.EXPIRED_REQUEST


def test_settings_are_checked():
    with pytest.raises(ValueError, match="score_min"):
        FeedbackSettings(score_min=1, score_max=1)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"retention_s": 0}, FeedbackSettings)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"request_id": "r-1", "thumbs": "sideways"}', type=FeedbackItem)
