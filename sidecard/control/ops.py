"""The operators' ops, as typed values: what `Control.execute` takes, whichever way they came (the admin socket).

Closed and tagged by `op`; unknown fields are refused, so a typo is an error rather than a default.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, Union, get_args

import msgspec

from ..config import ExperimentConfig, Target
from ..killswitch import Mode
from ..protocol import RequestId


class _Op(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    id: RequestId


class Status(_Op, tag="status"):
    pass


# A kill switch for longer than this is one without an expiry (null): a number past it is a mistake (1e308 was taken).
KILL_MAX_S: Final = 366 * 86_400


class Kill(_Op, tag="kill"):
    scope: str = "global"
    mode: Mode = "error"
    text: Union[str, None] = None
    reason: Union[str, None] = None
    expires_in_s: Union[Annotated[float, msgspec.Meta(le=KILL_MAX_S)], None] = None


class Unkill(_Op, tag="unkill"):
    scope: str = "global"


class RouteSetPrimary(_Op, tag="route.set_primary"):
    route: str
    model: str
    provider: Union[Literal["anthropic", "bedrock", "vertex"], None] = None
    force: bool = False  # a model the price table does not know (new, or a typo)


class RouteOverride(_Op, tag="route.override"):
    route: str
    targets: list[Target]
    force: bool = False


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
    # Absent: the limit in force stays; null: no limit.
    soft_usd: Union[float, None, msgspec.UnsetType] = msgspec.UNSET
    hard_usd: Union[float, None, msgspec.UnsetType] = msgspec.UNSET


class BudgetReset(_Op, tag="budget.reset"):
    scope: str
    window: Literal["hour", "day", "month"] = "day"


class LimitsStatus(_Op, tag="limits"):
    pass


class QualityStatus(_Op, tag="quality"):
    pass


class QualityUnswitch(_Op, tag="quality.unswitch"):
    prompt: str


class ExperimentStart(_Op, tag="experiment.start"):
    experiment: ExperimentConfig
    force: bool = False  # an arm's model the price table does not know (new, or a typo)


class ExperimentStatus(_Op, tag="experiment.status"):
    name: Union[str, None] = None


class ExperimentStop(_Op, tag="experiment.stop"):
    name: str


class ExperimentPromote(_Op, tag="experiment.promote"):
    name: str
    arm: Union[str, None] = None  # default: the winner


class PromptRollout(_Op, tag="prompt.rollout"):
    prompt: str
    version: int
    steps: Union[list[float], None] = None  # default: [rollout] steps


class RouteRollout(_Op, tag="route.rollout"):
    route: str
    model: str
    steps: Union[list[float], None] = None  # default: [rollout] steps
    force: bool = False  # a model the price table does not know (new, or a typo)


class RolloutStatus(_Op, tag="rollout.status"):
    prompt: Union[str, None] = None


class RolloutControl(_Op, tag="rollout.control"):
    prompt: str
    action: Literal["pause", "resume", "abort"]


class ShadowStatus(_Op, tag="shadow.status"):
    pass


class ReviewList(_Op, tag="review.list"):
    state: Literal["pending", "labelled", "all"] = "pending"
    prompt: Union[str, None] = None
    after: int = 0  # the last id seen: the next page
    limit: int = 20


class ReviewShow(_Op, tag="review.show"):
    item: int


class ReviewLabel(_Op, tag="review.label"):
    item: int
    label: str
    note: Union[str, None] = None


class Reload(_Op, tag="reload"):
    pass


class Drain(_Op, tag="drain"):
    pass


class JobsStatus(_Op, tag="jobs"):
    pass


class JobCancel(_Op, tag="jobs.cancel"):
    job: str


class BatchCancel(_Op, tag="jobs.cancel_batch"):
    batch: str  # sidecard's id of the batch (bat_...), as `jobs` lists it


class AppsStatus(_Op, tag="apps"):
    pass


class FleetStatus(_Op, tag="fleet"):
    pass


class UsageReport(_Op, tag="usage"):
    """Usage from the rollups: per `by` key per `window` period, over the last `last_s` seconds (default: a day
    of hours, a week of days, a year of months)."""

    by: Literal["feature", "user", "prompt", "model", "route"] = "feature"
    window: Literal["hour", "day", "month"] = "day"
    last_s: Union[Annotated[float, msgspec.Meta(gt=0, le=5 * 366 * 86400)], None] = None


class Anomalies(_Op, tag="anomalies"):
    """The unusual-spend alerts firing now."""


class QualityRollback(_Op, tag="quality.rollback"):
    """The fleet's quality monitor stops a canary release that failed (not an operator's op: never decoded from
    the admin socket). Marked in the prompt's override: `prompt clear` keeps it stopped."""

    prompt: str
    version: int


AdminOp = Union[
    Status, Kill, Unkill, RouteSetPrimary, RouteOverride, RouteRollback, PromptUse, PromptRollback,
    PromptCanary, PromptPromote, PromptClear, CacheFlush, BudgetStatus, BudgetRaise, BudgetReset, LimitsStatus,
    QualityStatus, QualityUnswitch, Reload, Drain, AppsStatus, ExperimentStart, ExperimentStatus, ExperimentStop, ExperimentPromote,
    PromptRollout, RolloutStatus, RolloutControl, ShadowStatus, RouteRollout, ReviewList, ReviewShow, ReviewLabel,
    JobsStatus, JobCancel, BatchCancel,
    FleetStatus,
    UsageReport, Anomalies,
]
KNOWN_OPS: Final = frozenset(t.__struct_config__.tag for t in get_args(AdminOp))
# Changes to operator state: kept by the backend before they are acknowledged. (A quality switch is not: a restart
# ends every switch anyway.)
PERSISTED: Final = (Kill, Unkill, RouteSetPrimary, RouteOverride, RouteRollback, PromptUse, PromptRollback, PromptCanary,
                    PromptPromote, PromptClear, ExperimentStart, ExperimentStop, ExperimentPromote, PromptRollout,
                    RolloutControl, RouteRollout, QualityRollback)

# Kept in the spend file, but in fleet mode operator state: the fleet's.
FLEET_PERSISTED: Final = (BudgetRaise,)

# Kept in the state file but each sidecar's own in fleet mode: experiments split and tally one sidecar's traffic.
SIDECAR_OWN: Final = (ExperimentStart, ExperimentStop)


def tag(op: AdminOp) -> str:
    return type(op).__struct_config__.tag  # type: ignore[no-any-return]
