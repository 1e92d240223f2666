import pytest

from sidecard.policies.budget import RetryBudget


def test_floor_allows_a_few_retries_with_no_traffic():
    b = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0)
    assert sum(b.try_withdraw(0.0) for _ in range(100)) == 10


def test_ratio_of_request_volume():
    b = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10.0)
    for _ in range(1000):
        b.deposit(1.0)
    assert sum(b.try_withdraw(1.0) for _ in range(1000)) == 200


def test_window_forgets_old_traffic_and_old_withdrawals():
    b = RetryBudget(ratio=0.5, min_per_s=0.0, window_s=10.0, buckets=10)
    for _ in range(100):
        b.deposit(0.5)
    assert sum(b.try_withdraw(0.5) for _ in range(100)) == 50
    assert not b.try_withdraw(5.0)
    # eleven seconds later the deposits and withdrawals of t=0.5 have left the window
    assert b.balance(11.0) == 0
    for _ in range(10):
        b.deposit(11.0)
    assert b.balance(11.0) == pytest.approx(5.0)


def test_parameters_are_checked():
    with pytest.raises(ValueError):
        RetryBudget(ratio=1.5)
