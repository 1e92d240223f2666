"""The operators' ops, as typed values: what `Control.execute` takes, whichever way they came (the admin socket).

Closed and tagged by `op`; unknown fields are refused, so a typo is an error rather than a default.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, Union, get_args

import msgspec

from ..config import Target
from ..killswitch import Mode
from ..protocol import RequestId


class _Op(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    id: RequestId


class Status(_Op, tag="status"):
    pass


class Kill(_Op, tag="kill"):
    scope: str = "global"
    mode: Mode = "error"
    text: Union[str, None] = None
    reason: Union[str, None] = None
    expires_in_s: Union[float, None] = None


class Unkill(_Op, tag="unkill"):
    scope: str = "global"


class RouteSetPrimary(_Op, tag="route.set_primary"):
    route: str
    model: str
    provider: Union[Literal["anthropic", "bedrock", "vertex"], None] = None


class RouteOverride(_Op, tag="route.override"):
    route: str
    targets: list[Target]


class RouteRollback(_Op, tag="route.rollback"):
    route: str


class PromptOp(_Op, kw_only=True):
    prompt: str
    force: bool = False  # give traffic to a version whose quality alert is firing


class PromptUse(PromptOp, tag="prompt.use", kw_only=True):
    version: int


class PromptRollback(PromptOp, tag="prompt.rollback"):
    pass


class PromptCanary(PromptOp, tag="prompt.canary", kw_only=True):
    percent: float
    version: Union[int, None] = None


class PromptPromote(PromptOp, tag="prompt.promote"):
    pass


class PromptClear(PromptOp, tag="prompt.clear"):
    pass


class CacheFlush(_Op, tag="cache.flush"):
    feature: Union[str, None] = None
    prompt: Union[str, None] = None


class BudgetStatus(_Op, tag="budget"):
    pass


class BudgetRaise(_Op, tag="budget.raise"):
    scope: str  # a scope key: "global", "feature:chat", "user:<pseudonym>", "route:default"
    window: Literal["hour", "day", "month"] = "day"
    soft_usd: Union[float, None] = None
    hard_usd: Union[float, None] = None


class BudgetReset(_Op, tag="budget.reset"):
    scope: str
    window: Literal["hour", "day", "month"] = "day"


class LimitsStatus(_Op, tag="limits"):
    pass


class QualityStatus(_Op, tag="quality"):
    pass


class QualityUnswitch(_Op, tag="quality.unswitch"):
    prompt: str


class Reload(_Op, tag="reload"):
    pass


class Drain(_Op, tag="drain"):
    pass


class UsageReport(_Op, tag="usage"):
    """Usage from the rollups: per `by` key per `window` period, over the last `last_s` seconds (default: a day
    of hours, a week of days, a year of months)."""

    by: Literal["feature", "user", "prompt", "model", "route"] = "feature"
    window: Literal["hour", "day", "month"] = "day"
    last_s: Union[Annotated[float, msgspec.Meta(gt=0, le=5 * 366 * 86400)], None] = None


class Anomalies(_Op, tag="anomalies"):
    """The unusual-spend alerts firing now."""


AdminOp = Union[
    Status, Kill, Unkill, RouteSetPrimary, RouteOverride, RouteRollback, PromptUse, PromptRollback,
    PromptCanary, PromptPromote, PromptClear, CacheFlush, BudgetStatus, BudgetRaise, BudgetReset, LimitsStatus,
    QualityStatus, QualityUnswitch, Reload, Drain, UsageReport, Anomalies,
]
KNOWN_OPS: Final = frozenset(t.__struct_config__.tag for t in get_args(AdminOp))
# Changes to operator state: kept by the backend before they are acknowledged. (A quality switch is not: a restart
# ends every switch anyway.)
PERSISTED: Final = (Kill, Unkill, RouteSetPrimary, RouteOverride, RouteRollback, PromptUse, PromptRollback, PromptCanary,
                    PromptPromote, PromptClear)


def tag(op: AdminOp) -> str:
    return type(op).__struct_config__.tag  # type: ignore[no-any-return]
