"""The usage sink: a finished request as a `UsageRecord`, handed to the background parts that want it (the
usage rollups' writer, the unusual-spend watch), each behind its own bounded channel: `submit` never blocks.

Outcome classes (`usage.store`): "ok" (an upstream answer), "cached" (the response cache's, or a share of
another request's upstream call), "degraded" (stale or static), "error". Token counts are what was paid for
(`Trace.bill`); a cached answer's savings are priced with the table in force. Per-user rows carry the salted
pseudonym, never the raw key. Token counts (`count_tokens`) cost nothing and are not recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..observe.redact import pseudonym
from ..pricing import PriceTable
from ..usage.store import Outcome, UsageRecord, cache_savings
from .types import Finished

Submit = Callable[[UsageRecord], None]


class UsageSink:
    def __init__(
        self, submit: Sequence[Submit], *, prices: Callable[[], PriceTable], user_salt: bytes, wall: Callable[[], float]
    ) -> None:
        """`prices`: the price table in force (it changes on reload); `wall`: unix time."""
        self.submit = list(submit)
        self.prices = prices
        self.user_salt = user_salt
        self._wall = wall

    def __call__(self, finished: Finished) -> None:
        if finished.counting:
            return
        trace, completion = finished.trace, finished.completion
        request, plan, bill = trace.request, trace.plan, trace.bill
        outcome: Outcome
        saved = 0.0
        model = finished.model or ""
        if completion is None:
            outcome = "error"
        elif completion.degraded or completion.stale:
            outcome = "degraded"
        elif trace.cache_result in ("hit", "coalesced"):
            outcome = "cached"
            saved = cache_savings(self.prices(), model, completion.usage, from_response_cache=True)
        else:
            outcome = "ok"
            if bill.usage.cache_read_input_tokens:
                saved = cache_savings(self.prices(), bill.spent_on or model, bill.usage, from_response_cache=False)
        version = plan.version if plan is not None else None
        usage = bill.usage
        record = UsageRecord(
            at=self._wall(),
            feature=trace.feature,
            user=pseudonym(request.user, self.user_salt) if request.user is not None else "",
            prompt=version.name if version is not None else "",
            version=str(version.version) if version is not None else "",
            model=model,
            route=plan.route_name if plan is not None else "",
            outcome=outcome,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_input_tokens,
            cache_write_tokens=usage.cache_creation_input_tokens,
            cost_usd=bill.cost_usd,
            saved_usd=saved,
        )
        for submit in self.submit:
            submit(record)
