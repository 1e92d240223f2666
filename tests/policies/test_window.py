import pytest

from sidecard.policies.window import Window


def test_counts_stay_in_the_window_then_leave_it_a_bucket_at_a_time():
    w = Window(10.0, 10)
    w.add(0.5, 1, 0)
    w.add(3.2, 1, 1)
    w.add(3.9, 0, 2)
    assert w.totals(3.9) == (2, 3)
    assert w.totals(10.4) == (1, 3)  # the bucket of t=0.5 has left the window
    assert w.totals(12.9) == (1, 3)
    assert w.totals(13.0) == (0, 0)


def test_a_reused_bucket_starts_from_zero():
    w = Window(1.0, 2)
    w.add(0.1, 5, 5)
    w.add(1.1, 1, 0)  # the same slot as t=0.1, one lap later
    assert w.totals(1.1) == (1, 0)


def test_clear_and_equality():
    a, b = Window(5.0, 5), Window(5.0, 5)
    a.add(1.0, 1, 1)
    assert a != b
    b.add(1.0, 1, 1)
    assert a == b
    a.clear()
    assert a.totals(1.0) == (0, 0)


def test_parameters_are_checked():
    with pytest.raises(ValueError):
        Window(0.0, 10)
