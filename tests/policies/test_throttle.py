import math

from sidecard.policies.throttle import ProviderWindow


def test_a_retry_after_holds_and_the_newest_one_stands_shorter_or_longer():
    w = ProviderWindow()
    assert w.delay(0.0) == 0 and w.holds == 0
    w.retry_after(0.0, 60)
    assert w.delay(1.0) == 59 and w.holds == 1
    w.retry_after(2.0, 4)  # newer news: four seconds, not the minute
    assert w.delay(2.0) == 4
    w.retry_after(3.0, 10)
    assert w.delay(3.0) == 10 and w.holds == 1  # one hold, moved


def test_after_a_hold_calls_are_paced_until_an_answer_shows_room():
    w = ProviderWindow()
    w.retry_after(0.0, 2)
    assert w.delay(2.0) == 0
    probe = w.start(2.0)
    assert probe and w.delay(2.0) == math.inf  # no advertised limit: the next waits for this one's end
    w.finish(probe)
    assert w.delay(2.5) == 0
    probe = w.start(2.5)
    w.answered(2.6, limit=60, remaining=40, reset=30.0)  # room: the pace is over
    assert not w.pacing and w.delay(2.6) == 0 and not w.start(2.6)


def test_pacing_follows_the_advertised_rate():
    w = ProviderWindow()
    w.answered(0.0, limit=30, remaining=10, reset=40.0)
    w.retry_after(0.0, 1)
    assert w.delay(1.0) == 0
    w.start(1.0)
    assert w.pace_s == 2 and w.delay(1.5) == 1.5  # 30 a minute: one every 2 s while the answer is awaited


def test_an_answer_to_a_call_sent_before_a_429_does_not_end_its_hold_or_pace():
    w = ProviderWindow()
    w.outstanding = 1
    w.retry_after(0.0, 5)
    w.answered(1.0, limit=50, remaining=30, reset=40.0)
    assert w.delay(1.0) == 4 and w.pacing


def test_a_spent_window_holds_until_its_reset_and_then_paces():
    w = ProviderWindow()
    w.start(0.0)
    w.answered(0.0, limit=10, remaining=0, reset=4.0)
    w.finish(False)
    assert w.delay(1.0) == 3 and w.holds == 1
    assert w.delay(4.0) == 0  # reset: whole again, its next reset unknown
    assert (w.remaining, w.reset) == (10, None)
    assert w.start(4.0) and w.delay(4.0) == 6  # a paced probe: 10 a minute
    w.answered(4.1, limit=10, remaining=9, reset=8.0)
    assert w.delay(4.1) == 0 and not w.pacing


def test_a_new_window_with_room_ends_a_hold_and_an_earlier_reset_shortens_it():
    w = ProviderWindow()
    w.answered(0.0, limit=10, remaining=0, reset=60.0)
    assert w.delay(0.0) == 60
    w.answered(1.0, limit=10, remaining=0, reset=5.0)  # the provider says its window ends sooner
    assert w.delay(1.0) == 4
    w.answered(2.0, limit=10, remaining=7, reset=30.0)  # a new window with room
    assert w.delay(2.0) == 0


def test_within_one_window_the_lowest_count_stands():
    w = ProviderWindow()
    for _ in range(3):
        w.start(0.0)
    w.answered(0.1, limit=5, remaining=1, reset=10.2)  # counted last by the provider, answered first
    w.finish(False)
    assert w.remaining == -1  # the other two in flight are counted as spent too
    w.answered(0.2, limit=5, remaining=3, reset=10.0)  # counted before it: stale (3 - 1 in flight)
    w.finish(False)
    assert w.remaining == -1 and w.delay(0.2) > 0
    w.answered(0.3, limit=5, remaining=4, reset=0.25)  # a window already over says nothing
    assert w.remaining == -1


def test_our_count_can_run_out_before_the_provider_has_spoken():
    w = ProviderWindow()
    w.answered(0.0, limit=2, remaining=2, reset=1.0)
    assert w.delay(1.0) == 0 and w.remaining == 2  # whole again, its reset unknown
    w.start(1.0), w.start(1.0)
    assert w.remaining == 0 and w.delay(1.0) == 0  # no reset to wait for: the advertised rate meters us
    assert w.start(1.0) and w.delay(1.0) == 30  # 2 a minute


def test_spent_tokens_hold_until_their_reset():
    w = ProviderWindow(min_tokens=100)
    w.answered(0.0, limit=50, remaining=40, reset=60.0, tokens_remaining=80, tokens_reset=7.0)
    assert w.delay(0.0) == 7
    assert w.delay(7.0) == 0 and w.tokens_remaining is None


def test_a_provider_that_advertises_nothing_ends_the_pace_with_a_success():
    w = ProviderWindow()
    w.retry_after(0.0, 1)
    paced = w.start(1.0)
    w.answered(1.5)
    w.finish(paced)
    assert not w.pacing and w.delay(1.5) == 0


def test_held_is_the_providers_hold_alone_not_the_pace_after_it():
    w = ProviderWindow()
    w.retry_after(0.0, 5)
    assert w.held(1.0) == w.delay(1.0) == 4
    w.start(5.0)  # the paced probe
    assert w.held(5.0) == 0 and w.delay(5.0) == math.inf
    w.answered(5.0, limit=10, remaining=0, reset=9.0)  # and a spent window
    assert w.held(6.0) == 3
