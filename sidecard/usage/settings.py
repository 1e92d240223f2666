"""The `[usage]` settings: where the usage rollups live and for how long."""

from __future__ import annotations

from typing import Annotated

import msgspec


class UsageSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    enabled: bool = True
    # The SQLite file, relative to the config file like [state] path.
    path: str = "sidecard-usage.sqlite3"
    # Hourly rollups older than this are deleted (400 days: a year of months to compare).
    retention_days: Annotated[float, msgspec.Meta(gt=0)] = 400.0
    # One transaction per interval; a crash loses at most this much usage.
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    # Records waiting for the writer; beyond it they are dropped (counted). At least the peak requests per
    # second times flush_interval_s.
    queue_size: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 50_000
