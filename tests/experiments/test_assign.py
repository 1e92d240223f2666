import random
from collections import Counter

import pytest

from sidecard.experiments.assign import assign, sticky, unsticky

USERS = [f"user-{i}" for i in range(20_000)]


def split(arms, salt="exp"):
    return {user: sticky(salt, user, arms) for user in USERS}


def test_assignment_is_pinned_so_a_release_does_not_reshuffle_users():
    arms = [("a", 1), ("b", 1), ("c", 2)]
    assert [sticky("exp", f"user-{i}", arms) for i in range(8)] == ["b", "b", "a", "b", "b", "b", "a", "c"]


def test_arms_get_shares_proportional_to_their_weights():
    counts = Counter(split([("a", 1), ("b", 3)]).values())
    assert counts["b"] / len(USERS) == pytest.approx(0.75, abs=0.01)


def test_raising_a_weight_only_moves_users_to_that_arm():
    before, after = split([("a", 95), ("b", 5)]), split([("a", 75), ("b", 25)])
    moved = {user for user in USERS if before[user] != after[user]}
    assert moved and all(before[u] == "a" and after[u] == "b" for u in moved)


def test_lowering_a_weight_only_moves_users_away_from_it():
    before, after = split([("a", 1), ("b", 1), ("c", 1)]), split([("a", 1), ("b", 1), ("c", 0.2)])
    moved = [user for user in USERS if before[user] != after[user]]
    assert moved and all(before[u] == "c" for u in moved)
    assert "c" not in split([("a", 1), ("b", 1), ("c", 0)]).values()


def test_adding_an_arm_only_takes_users_to_it_and_removing_one_only_moves_its_users():
    two, three = split([("a", 1), ("b", 1)]), split([("a", 1), ("b", 1), ("c", 1)])
    assert all(three[u] in (two[u], "c") for u in USERS)
    assert Counter(three.values())["c"] / len(USERS) == pytest.approx(1 / 3, abs=0.01)
    without_a = split([("b", 1), ("c", 1)])
    assert all(without_a[u] == three[u] for u in USERS if three[u] != "a")


def test_each_experiment_splits_users_independently():
    first, second = split([("a", 1), ("b", 1)], "exp-1"), split([("a", 1), ("b", 1)], "exp-2")
    same = sum(first[u] == second[u] for u in USERS) / len(USERS)
    assert same == pytest.approx(0.5, abs=0.02)


def test_a_request_without_a_user_gets_a_random_arm_by_weight():
    rng = random.Random(7)
    counts = Counter(assign("exp", None, [("a", 1), ("b", 3)], rng) for _ in range(4000))
    assert counts["b"] / 4000 == pytest.approx(0.75, abs=0.03)
    assert assign("exp", "user-2", [("a", 1), ("b", 1), ("c", 2)], random.Random(0)) == "a"
    rng = random.Random(3)
    assert [unsticky([("a", 1), ("b", 1)], rng) for _ in range(6)] == ["a", "b", "a", "b", "b", "a"]


@pytest.mark.parametrize("arms", [[], [("a", 0)], [("a", -1), ("b", 2)], [("a", float("inf"))]])
def test_bad_weights_are_refused(arms):
    with pytest.raises(ValueError):
        sticky("exp", "user", arms)
