"""Two sidecars spending one budget at once cannot pass its hard limit together beyond the documented bound
(sidecard/fleet/__init__.py): none while each request's estimate is its worst case, else the sum of what the
admitted requests cost beyond their estimates."""

from __future__ import annotations

import random

import pytest
import trio

from sidecard.fleet.scripts import Admit, Admitted, BudgetCheck, BudgetRefused, RequestPath, Settle

T0 = 1_773_480_000.0
HARD = 1.0


async def spend_concurrently(paths, *, estimate, cost_of, rounds=3, per_sidecar=32, seed=19):
    """Requests on every sidecar at once, each settling after the others had their turn; returns
    (admitted, the sum of cost beyond estimate over the admitted, the store's final spend)."""
    budget = BudgetCheck("global", "day", HARD)
    rng = random.Random(seed)
    admitted, excess = [], []

    async def request(path, rid):
        result = await path.admit(Admit(T0, budgets=[budget], estimate_usd=estimate, reservation_id=rid, reservation_ttl_s=600))
        if isinstance(result, BudgetRefused):
            return
        assert isinstance(result, Admitted)
        await trio.sleep(rng.random() * 0.01)  # in flight while the others are admitted
        cost = cost_of(rng)
        admitted.append(cost)
        excess.append(max(0.0, cost - estimate))
        await path.settle(Settle(T0 + 1, rid, cost, budgets=[budget]))

    for r in range(rounds):
        async with trio.open_nursery() as nursery:
            for s, path in enumerate(paths):
                for i in range(per_sidecar):
                    nursery.start_soon(request, path, f"{r}-{s}-{i}")
    final = (await paths[0].admit(Admit(T0 + 2, budgets=[budget]))).usage[0]
    assert final.reserved_usd == pytest.approx(0.0, abs=1e-12)  # every reservation was given back
    return admitted, sum(excess), final.spent_usd


@pytest.fixture
async def two_sidecars(connect, keys):
    return [RequestPath(await connect(), keys), RequestPath(await connect(), keys)]


async def test_worst_case_estimates_never_overshoot(two_sidecars):
    admitted, excess, spent = await spend_concurrently(two_sidecars, estimate=0.07, cost_of=lambda rng: rng.uniform(0.0, 0.07))
    assert excess == 0 and spent <= HARD + 1e-9
    assert len(admitted) >= HARD // 0.07  # and the budget was used, not refused early for good


async def test_costs_beyond_the_estimate_overshoot_by_at_most_their_excess(two_sidecars):
    admitted, excess, spent = await spend_concurrently(two_sidecars, estimate=0.05, cost_of=lambda rng: rng.uniform(0.0, 0.1))
    assert excess > 0 and spent <= HARD + excess + 1e-9
