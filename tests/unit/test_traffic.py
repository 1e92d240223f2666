"""Traffic control on its own: admission (rate limits, budgets and their reservations), settlement, the
per-target queues and the provider's word, with virtual time and an injected wall clock (no daemon)."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest
import trio
from prometheus_client import CollectorRegistry

from sidecard.config import from_mapping
from sidecard.errors import Code, SidecardError
from sidecard.limits.queue import Overloaded
from sidecard.limits.spend import Budget, SpendLedger
from sidecard.observe.log import JsonLog
from sidecard.observe.metrics import Metrics
from sidecard.traffic import Traffic

NOON = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc).timestamp()


class Setup:
    def __init__(self, **sections) -> None:
        self.config = from_mapping(sections)
        self.metrics = Metrics(CollectorRegistry())
        self.lines: list[bytes] = []
        self.alerts: list[dict] = []
        self.wall = NOON
        ledger = SpendLedger([Budget.of(b) for b in self.config.budgets])
        self.traffic = Traffic(self.config, ledger, metrics=self.metrics, log=JsonLog(self.lines.append),
                               wall=lambda: self.wall + trio.current_time(), on_alert=self.alerts.append)
        self.target = self.config.routes["default"].targets[0]

    def admit(self, *, tokens: float = 100.0, usd: float = 0.01, feature: str = "chat", user: str | None = None):
        return self.traffic.admit(feature=feature, route="default", user_key=user, estimated_tokens=tokens, estimate_usd=lambda: usd)

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def refused(fn, *args, **kwargs) -> SidecardError:
    with pytest.raises(SidecardError) as info:
        fn(*args, **kwargs)
    return info.value


async def test_a_rate_limit_lets_its_burst_through_then_refuses_with_the_wait(mock_clock):
    s = Setup(rate_limits=[{"scope": "user", "requests_per_minute": 60, "burst_s": 2}])
    s.admit(user="alice")
    s.admit(user="alice")
    over = refused(s.admit, user="alice")
    assert over.code == Code.RATE_LIMITED and over.retryable and over.retry_after_ms == 1000
    s.admit(user="bob")  # each user has a bucket of their own
    mock_clock.jump(1.0)
    s.admit(user="alice")
    assert s.count("sidecard_refusals_total", reason="rate_limited") == 1


async def test_a_token_limit_is_corrected_from_the_estimate_to_what_was_used(mock_clock):
    s = Setup(rate_limits=[{"scope": "global", "tokens_per_minute": 600, "burst_s": 1}])  # 10 tokens, 10 a second
    admission = s.admit(tokens=10)
    assert refused(s.admit, tokens=1).code == Code.RATE_LIMITED
    s.traffic.settle(admission, cost_usd=0.0, tokens_used=4)  # six of the ten estimated come back
    s.admit(tokens=6)


async def test_a_hard_budget_counts_what_requests_in_flight_reserved(mock_clock):
    s = Setup(budgets=[{"scope": "global", "window": "day", "hard_usd": 1.0}])
    first = s.admit(usd=0.6)
    over = refused(s.admit, usd=0.6)  # 0.6 spent-or-reserved plus 0.6 would pass the limit: refused before any call
    assert over.code == Code.BUDGET_EXCEEDED and not over.retryable
    assert over.retry_after_ms == math.ceil((NOON - NOON % 86_400 + 86_400 - NOON) * 1000)  # midnight UTC
    s.traffic.settle(first, cost_usd=0.1, tokens_used=0)  # it cost less than its worst case
    s.admit(usd=0.6)
    assert s.traffic.budget_status()[0]["spent_usd"] == 0.1


async def test_a_soft_limit_alerts_once_spend_reaches_it_and_moves_the_scope_to_its_cheaper_route(mock_clock):
    s = Setup(routes={"cheap": {"targets": [{"model": "claude-haiku-4-5"}]}},
              budgets=[{"scope": "feature:chat", "window": "day", "soft_usd": 0.5, "soft_route": "cheap"}])
    admission = s.admit()
    assert admission.route is None
    s.traffic.settle(admission, cost_usd=0.5, tokens_used=0)
    (alert,) = s.alerts
    assert alert["alert"] == "budget_soft_limit" and alert["scope"] == "feature:chat" and alert["switched_to_route"] == "cheap"
    assert s.admit().route == "cheap" and s.admit(feature="search").route is None
    assert s.count("sidecard_budget_alerts_total", scope="feature:chat", window="day") == 1


async def test_a_request_that_failed_unbilled_gives_its_reservation_back(mock_clock):
    s = Setup(budgets=[{"scope": "global", "window": "day", "hard_usd": 1.0}])
    s.traffic.settle(s.admit(usd=0.9), cost_usd=0.0, tokens_used=0)
    s.traffic.settle(s.admit(usd=0.9), cost_usd=0.0, tokens_used=0)
    assert s.traffic.budget_status()[0]["reserved_usd"] == 0.0


async def test_a_target_gives_as_many_slots_as_its_limit_and_queues_the_rest(autojump_clock):
    s = Setup(queue={"max_concurrency": 1, "shed": False})
    first = await s.traffic.acquire(s.target, priority="interactive", deadline=trio.current_time() + 60)
    got: list[float] = []

    async def second() -> None:
        slot = await s.traffic.acquire(s.target, priority="batch", deadline=trio.current_time() + 60)
        got.append(trio.current_time())
        slot.release(rtt_s=1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.sleep(2)
        assert got == [] and s.traffic.limits_status()["targets"][f"anthropic:{s.target.model}"]["queued"] == 1
        first.release(rtt_s=2.0)
    assert got == [2.0] and s.traffic.queue(s.target).stats()["in_flight"] == 0


async def test_a_429_with_retry_after_holds_the_target_until_it_has_passed(autojump_clock):
    s = Setup()
    s.traffic.observe(s.target, None, retry_after_s=5.0, status=429)
    with pytest.raises(Overloaded) as paused:  # cannot start before its deadline: refused at once, not queued
        await s.traffic.acquire(s.target, priority="interactive", deadline=trio.current_time() + 1)
    assert paused.value.reason == "paused"
    slot = await s.traffic.acquire(s.target, priority="interactive", deadline=trio.current_time() + 60)
    assert trio.current_time() == pytest.approx(5.0)
    slot.release(rtt_s=0.1)
    assert s.count("sidecard_throttled_total", provider="anthropic", model=s.target.model) == 1


async def test_the_rate_limit_headers_of_an_answer_hold_the_target_until_the_window_resets(autojump_clock):
    s = Setup()
    reset = datetime.fromtimestamp(NOON + 10, timezone.utc)
    headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0",
               "anthropic-ratelimit-requests-reset": reset.isoformat().replace("+00:00", "Z")}
    s.traffic.observe(s.target, headers, retry_after_s=None, status=200)
    slot = await s.traffic.acquire(s.target, priority="interactive", deadline=trio.current_time() + 60)
    assert trio.current_time() == pytest.approx(11.0)  # the reset, and a second for its rounding
    slot.release(rtt_s=0.1)


async def test_a_reload_keeps_spend_and_rebuilds_only_the_limits_that_changed(mock_clock):
    s = Setup(rate_limits=[{"scope": "global", "requests_per_minute": 60, "burst_s": 1}])
    s.admit()
    assert refused(s.admit).code == Code.RATE_LIMITED
    s.traffic.configure(from_mapping({"rate_limits": [{"scope": "global", "requests_per_minute": 60, "burst_s": 1}]}))
    assert refused(s.admit).code == Code.RATE_LIMITED  # the same limit: its bucket is kept, not refilled
    s.traffic.configure(from_mapping({"rate_limits": [{"scope": "global", "requests_per_minute": 120, "burst_s": 1}]}))
    s.admit()  # a new limit starts full
