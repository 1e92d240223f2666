"""Usage reports: per-request records rolled up by the hour in SQLite, queried by feature, user, prompt, model
or route per hour, day or month, and rendered as a table, JSON, CSV or a PNG."""

from ..config import UsageSettings
from .store import UsageRecord, UsageRow, UsageStore, UsageWriter, cache_savings, open_store

__all__ = ["UsageRecord", "UsageRow", "UsageSettings", "UsageStore", "UsageWriter", "cache_savings", "open_store"]
