import pytest

from sidecard.policies.buffers import BufferBudget


def test_take_refuses_rather_than_exceed_the_limit():
    budget = BufferBudget(10)
    assert budget.take(6) and not budget.take(5) and budget.used == 6
    assert budget.take(4) and budget.used == 10
    budget.give(10)
    assert budget.used == 0 and budget.take(10)


def test_giving_back_more_than_was_taken_is_a_bug():
    budget = BufferBudget(10)
    budget.take(3)
    with pytest.raises(ValueError):
        budget.give(4)
    with pytest.raises(ValueError):
        BufferBudget(0)
