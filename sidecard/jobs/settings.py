"""The `[jobs]` settings: async jobs, the Message Batches they ride in, their durable store and their webhooks.

Self-contained (msgspec and the standard library) so `config.py` can adopt the Struct as it is. Times are seconds.
"""

from __future__ import annotations

from typing import Literal

import msgspec

MAX_BATCH_REQUESTS = 100_000  # the API's limits per batch
MAX_BATCH_BYTES = 256 * 1024 * 1024


class WebhookSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # A job may name a webhook only under one of these URL prefixes ("https://app.internal/hooks/"); none: no webhooks.
    allowed_prefixes: list[str] = []
    secret_file: str = ""  # the HMAC-SHA256 key, read at start; required when allowed_prefixes is set
    timeout_s: float = 10.0  # per delivery attempt
    max_attempts: int = 8
    retry_initial_s: float = 5.0  # then doubling, up to retry_max_s
    retry_max_s: float = 600.0
    concurrency: int = 4  # deliveries in flight at once

    def __post_init__(self) -> None:
        _positive(self, "timeout_s", "retry_initial_s", "retry_max_s")
        _at_least_one(self, "max_attempts", "concurrency")
        for prefix in self.allowed_prefixes:
            if not prefix.startswith(("http://", "https://")) or "/" not in prefix.split("://", 1)[1]:
                raise ValueError(f"webhook.allowed_prefixes: {prefix!r} must be an http(s) URL with a path, e.g. https://host/hooks/")
        if self.allowed_prefixes and not self.secret_file:
            raise ValueError("webhook.secret_file is required when webhook.allowed_prefixes is set (deliveries are signed)")


class JobsSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = False
    path: str = ""  # the job store (SQLite); "" puts jobs.sqlite in the state directory
    # "full": every commit is fsynced (an accepted job survives a power cut); "normal": the WAL is fsynced at
    # checkpoints (an accepted job survives a crash of sidecard, not of the machine).
    synchronous: Literal["full", "normal"] = "full"
    max_pending: int = 100_000  # jobs accepted and not finished; a submit beyond is refused (overloaded)
    max_submit: int = 1000  # jobs in one submit
    max_deadline_s: float = 7 * 86_400.0  # the furthest deadline a job may have
    # Batches: one per target, submitted when it holds batch_max_requests or batch_max_bytes, or when its oldest
    # job has waited batch_max_age_s (or a job in it could wait no longer and still make its deadline).
    batch_max_requests: int = 10_000
    batch_max_bytes: int = 32 * 1024 * 1024
    batch_max_age_s: float = 60.0
    expected_turnaround_s: float = 3600.0  # how long a batch is expected to take, submitted to ended
    # A job goes into a batch only if the batch is expected back this long before its deadline; a job still
    # waiting on a batch this long before its deadline leaves it and runs through the engine.
    min_slack_s: float = 600.0
    poll_initial_s: float = 10.0  # the first poll of a batch; then poll_multiplier times longer, up to poll_max_s
    poll_max_s: float = 300.0
    poll_multiplier: float = 2.0
    price_multiplier: float = 0.5  # a batch's price against the interactive one
    engine_concurrency: int = 8  # jobs running through the engine at once
    max_attempts: int = 5  # runs of one job (a batch, an engine run) before it fails
    retry_initial_s: float = 5.0  # an engine run that failed and may be retried waits this, doubling, up to retry_max_s
    retry_max_s: float = 300.0
    retention_s: float = 7 * 86_400.0  # finished jobs are kept this long for polling
    webhook: WebhookSettings = msgspec.field(default_factory=WebhookSettings)

    def __post_init__(self) -> None:
        _positive(
            self,
            "max_deadline_s",
            "batch_max_age_s",
            "expected_turnaround_s",
            "poll_initial_s",
            "poll_max_s",
            "retry_initial_s",
            "retry_max_s",
            "retention_s",
        )
        _at_least_one(self, "max_pending", "max_submit", "batch_max_requests", "engine_concurrency", "max_attempts")
        if self.min_slack_s < 0:
            raise ValueError("min_slack_s must not be negative")
        if self.batch_max_requests > MAX_BATCH_REQUESTS:
            raise ValueError(f"batch_max_requests must be at most {MAX_BATCH_REQUESTS} (the API's limit)")
        if not 1024 <= self.batch_max_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"batch_max_bytes must be within [1024, {MAX_BATCH_BYTES}] (the API's limit)")
        if self.poll_multiplier < 1:
            raise ValueError("poll_multiplier must be at least 1")
        if not 0 < self.price_multiplier <= 1:
            raise ValueError("price_multiplier must be within (0, 1]")


def _positive(settings: msgspec.Struct, *names: str) -> None:
    for name in names:
        if not getattr(settings, name) > 0:
            raise ValueError(f"{name} must be positive")


def _at_least_one(settings: msgspec.Struct, *names: str) -> None:
    for name in names:
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1")
