"""Prometheus metrics on an injected `CollectorRegistry` (one per daemon, one per test).

The families are our own collectors keeping plain numbers: prometheus-client's own metric types take a lock and
check their state on every update (about 1 µs each, a dozen times per request), where an update here is an
attribute change. The daemon updates them on its one thread; the scrape reads them from another, and a snapshot
may see a histogram's sum one observation ahead of its buckets (its count is read from its buckets). Labelled
children are kept by their label values, found with one lookup.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .. import __version__

LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
)


class _CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class _GaugeValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # upper bounds, the last one +Inf
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Metric:
    """One family of series: its children by label values, collected at scrape time."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry) -> None:
        self._name, self._labelnames, self._documentation = name, tuple(labelnames), documentation  # (prometheus-client's names)
        self._children: dict[tuple[str, ...], _CounterValue | _GaugeValue | _HistogramValue] = {}
        if not labelnames:
            self._solo = self.labels()
        registry.register(self)

    def _new(self) -> _CounterValue | _GaugeValue | _HistogramValue:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Metric, labels: tuple[str, ...], child) -> None:  # noqa: ANN001
        family.add_metric(labels, child.value)  # type: ignore[call-arg]

    def labels(self, *values: str):  # -> its child
        child = self._children.get(values)  # (callers pass strings: found at once)
        if child is None:
            key = tuple(map(str, values))
            child = self._children.get(key)
            if child is None:
                if len(key) != len(self._labelnames):
                    raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
                child = self._children[key] = self._new()
        return child

    __call__ = labels  # `metrics.requests(outcome, model, feature).inc()`

    def remove(self, *values: str) -> None:
        """Stop exporting one child (a series that no longer means anything, e.g. a ratio to no limit)."""
        self._children.pop(tuple(map(str, values)), None)

    def remove_where(self, label: str, value: str) -> None:
        """Stop exporting every child whose LABEL is VALUE (none, if the family has no such label)."""
        if label in self._labelnames:
            index = self._labelnames.index(label)
            for key in [key for key in self._children if key[index] == value]:
                del self._children[key]

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for labels, child in list(self._children.items()):  # (a copy: the daemon may add a child meanwhile)
            self._add(family, labels, child)
        return [family]


class Counter(_Metric):
    def _new(self) -> _CounterValue:
        return _CounterValue()

    def _family(self) -> Metric:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def inc(self, amount: float = 1.0) -> None:
        self._solo.inc(amount)


class Gauge(_Metric):
    def _new(self) -> _GaugeValue:
        return _GaugeValue()

    def _family(self) -> Metric:
        return GaugeMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def inc(self, amount: float = 1.0) -> None:
        self._solo.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._solo.dec(amount)

    def set(self, value: float) -> None:
        self._solo.set(value)


class Histogram(_Metric):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self._bounds = (*sorted(float(b) for b in buckets if b != float("inf")), float("inf"))
        self._les = [floatToGoString(b) for b in self._bounds]
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new(self) -> _HistogramValue:
        return _HistogramValue(self._bounds)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, labels: tuple[str, ...], child) -> None:  # noqa: ANN001
        total, buckets = 0, []
        for le, count in zip(self._les, list(child.counts)):
            total += count
            buckets.append((le, total))
        family.add_metric(labels, buckets, child.sum)  # type: ignore[call-arg]

    def observe(self, value: float) -> None:
        self._solo.observe(value)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("sidecard_build_info", "sidecard version", ["version"], registry=r).labels(__version__).set(1)
        self.requests = Counter(
            "sidecard_requests", "Requests answered, by outcome (ok or error code)", ["outcome", "model", "feature"], registry=r
        )
        self.request_seconds = Histogram(
            "sidecard_request_duration_seconds", "End-to-end time in the daemon", ["feature"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.upstream_seconds = Histogram(
            "sidecard_upstream_duration_seconds", "Time of one upstream attempt", ["provider", "model"],
            buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter(
            "sidecard_tokens", "Tokens by kind (input, output, cache_read, cache_write)", ["feature", "model", "kind"], registry=r
        )
        self.cost = Counter("sidecard_cost_usd", "Cost in USD from the price table", ["feature", "model"], registry=r)
        self.in_flight = Gauge("sidecard_requests_in_flight", "Requests being answered now", registry=r)
        self.connections = Gauge("sidecard_connections", "Open client connections", registry=r)
        self.connections_evicted = Counter(
            "sidecard_connections_evicted", "App connections closed at the cap, idle longest, for a new one", registry=r
        )
        self.frames_rejected = Counter(
            "sidecard_frames_rejected", "Frames answered with an error before reaching the engine", ["code"], registry=r
        )
        self.clients_cut = Counter(
            "sidecard_client_disconnects", "Connections closed by sidecard, by reason", ["reason"], registry=r
        )
        # resilience
        self.attempts = Counter(
            "sidecard_upstream_attempts", "Upstream attempts by outcome", ["provider", "model", "outcome"], registry=r
        )
        self.retries = Counter(
            "sidecard_retries", "Attempts that were retries of the same target", ["provider", "model"], registry=r
        )
        self.fallbacks = Counter(
            "sidecard_fallbacks", "Requests answered by a target after the first, by the target that answered",
            ["route", "provider", "model"], registry=r
        )
        self.hedges = Counter(
            "sidecard_hedges", "Hedged attempts, by result (won, lost)", ["provider", "model", "result"], registry=r
        )
        self.budget_refusals = Counter(
            "sidecard_retry_budget_refusals", "Retries or hedges refused by the retry budget, by the target refused",
            ["provider", "model"], registry=r
        )
        self.breaker_state = Gauge(
            "sidecard_breaker_state", "Circuit breaker state (0 closed, 1 half-open, 2 open)", ["provider", "model"], registry=r
        )
        self.breaker_transitions = Counter(
            "sidecard_breaker_transitions", "Circuit breaker transitions", ["provider", "model", "to"], registry=r
        )
        # streams
        self.ttft = Histogram(
            "sidecard_ttft_seconds", "Time to the first token of streamed answers", ["provider", "model"],
            buckets=LATENCY_BUCKETS, registry=r
        )
        self.stream_failures = Counter(
            "sidecard_stream_failures", "Streams that failed after their first token, by reason", ["reason"], registry=r
        )
        self.stream_resumes = Counter(
            "sidecard_stream_resumes", "Broken streams continued on another target", ["provider", "model"], registry=r
        )
        # prompts
        self.prompt_requests = Counter(
            "sidecard_prompt_requests", "Prompt requests by version and outcome", ["prompt", "version", "outcome"], registry=r
        )
        self.prompt_seconds = Histogram(
            "sidecard_prompt_duration_seconds", "End-to-end time of prompt requests", ["prompt", "version"],
            buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_bad_outputs = Counter(
            "sidecard_prompt_bad_outputs", "Answers that broke the prompt's output format", ["prompt", "version"], registry=r
        )
        self.prompt_reloads = Counter(
            "sidecard_prompt_reloads", "Prompt directory reloads, by result (ok, errors)", ["result"], registry=r
        )
        self.prompt_load_errors = Gauge(
            "sidecard_prompt_load_errors", "Prompt files currently refused (see status or the log)", registry=r
        )
        self.killed = Counter("sidecard_killed_requests", "Requests answered by a kill switch", ["scope", "mode"], registry=r)
        self.kill_switches = Gauge("sidecard_kill_switches", "Kill switches in force", registry=r)
        self.state_discarded = Gauge(
            "sidecard_state_discarded",
            "1 when the state file could not be read and was set aside ([state] on_corrupt = open)", registry=r
        )
        self.accept_exhausted = Counter(
            "sidecard_accept_exhausted", "Episodes of a listener finding no descriptors (or memory) to accept with, by listener",
            ["listener"], registry=r,
        )
        self.admin_ops = Counter("sidecard_admin_ops", "Admin operations by op and result", ["op", "result"], registry=r)
        # traffic control
        self.refusals = Counter(
            "sidecard_refusals", "Requests refused before reaching the upstream, by reason", ["reason"], registry=r
        )
        self.shed = Counter("sidecard_shed", "Queued requests shed under overload, by priority", ["priority"], registry=r)
        self.queue_depth = Gauge(
            "sidecard_queue_depth", "Requests waiting for an upstream slot", ["provider", "model"], registry=r
        )
        self.queue_wait = Histogram("sidecard_queue_wait_seconds", "Time waited for an upstream slot", ["provider", "model"],
                      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.concurrency_limit = Gauge(
            "sidecard_concurrency_limit", "Current limit on calls in flight per target", ["provider", "model"], registry=r
        )
        self.throttled = Counter(
            "sidecard_throttled", "Times a target was paused on the provider's rate-limit signals", ["provider", "model"],
            registry=r
        )
        # Per configured budget (scope as configured: "user", "feature:*", ...), never per key: bounded labels.
        # Per-key budgets report their most-spent key. Refreshed every few seconds, so resets, raises and
        # window rollovers show without new spend.
        self.budget_spent = Gauge(
            "sidecard_budget_spent_usd", "Spend in the current window (per-key budgets: the most-spent key)",
            ["scope", "window"], registry=r
        )
        self.budget_ratio = Gauge(
            "sidecard_budget_spend_ratio", "Spend over the hard limit (per-key budgets: the most-spent key)",
            ["scope", "window"], registry=r
        )
        self.budget_remaining = Gauge(
            "sidecard_budget_remaining_usd", "Hard limit minus spend (per-key budgets: the most-spent key)",
            ["scope", "window"], registry=r
        )
        self.budget_alerts = Counter("sidecard_budget_alerts", "Soft budget limits crossed", ["scope", "window"], registry=r)
        # quality
        q = ["prompt", "version", "model"]
        self.quality_answers = Counter("sidecard_quality_answers", "Answers run through the quality checks", q, registry=r)
        self.quality_checks = Counter(
            "sidecard_quality_check_failures", "Answers failing a heuristic check", [*q, "check"], registry=r
        )
        self.quality_score = Gauge("sidecard_quality_score", "Mean judge score over the rolling window (0-1)", q, registry=r)
        self.quality_baseline = Gauge("sidecard_quality_baseline", "Baseline judge score (0-1)", q, registry=r)
        self.quality_alert_firing = Gauge(
            "sidecard_quality_alert_firing", "1 while a quality alert fires for this prompt, version and model", q, registry=r
        )
        self.quality_judged = Counter(
            "sidecard_quality_judged", "Judge calls by result (ok, error, skipped_budget)", ["result"], registry=r
        )
        self.quality_dropped = Counter(
            "sidecard_quality_dropped", "Samples dropped because a quality queue was full", ["queue"], registry=r
        )
        self.quality_route_switched = Gauge(
            "sidecard_quality_route_switched", "1 while a quality alert holds the prompt on its fallback route",
            ["prompt"], registry=r
        )
        self.quality_rollbacks = Counter(
            "sidecard_quality_rollbacks", "Canaries rolled back automatically on a quality alert", ["prompt"], registry=r
        )
        # cache
        self.cache_requests = Counter(
            "sidecard_cache_requests", "Cache outcomes (hit, miss, coalesced, stale, refresh, bypass)", ["result"], registry=r
        )
        self.cache_evictions = Counter("sidecard_cache_evictions", "Entries evicted to stay within the cache bounds", registry=r)
        self.cache_undecodable = Counter(
            "sidecard_cache_undecodable", "Cached entries that could not be decoded: dropped and answered as misses", registry=r
        )
        self.cache_entries = Gauge("sidecard_cache_entries", "Entries in the response cache", registry=r)
        self.cache_bytes = Gauge("sidecard_cache_bytes", "Bytes accounted to the response cache", registry=r)
        self.degraded = Counter("sidecard_degraded", "Degraded answers by kind (static, stale)", ["route", "kind"], registry=r)
        # fleet mode (docs/fleet.md); absent without a [fleet] section
        self.fleet_up = Gauge(
            "sidecard_fleet_up", "1 while the fleet store answers, 0 while this sidecar runs on local state", registry=r
        )
        self.fleet_store_seconds = Histogram(
            "sidecard_fleet_store_duration_seconds", "Time of one store operation that was answered", ["op"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0), registry=r,
        )
        self.fleet_store_errors = Counter(
            "sidecard_fleet_store_errors", "Store operations that failed, by op and kind (timeout, unavailable, data)",
            ["op", "kind"], registry=r
        )
        self.fleet_fallbacks = Counter(
            "sidecard_fleet_fallbacks",
            "Decisions taken on local state because the store did not answer (limits, cache, state...)", ["what"],
            registry=r
        )
        self.fleet_dropped_writes = Counter(
            "sidecard_fleet_dropped_writes",
            "Background store writes (settles, shared cache entries) dropped: 1024 were already sent and unanswered",
            registry=r
        )
        self.fleet_state_version = Gauge(
            "sidecard_fleet_state_version", "The fleet operator state version this sidecar applies", registry=r
        )
        self.fleet_state_synced = Gauge(
            "sidecard_fleet_state_synced_timestamp_seconds",
            "Unix time of the last full read of the fleet operator state", registry=r
        )
        self.fleet_members = Gauge("sidecard_fleet_members", "Live sidecars of the namespace (heartbeats)", registry=r)
        self.fleet_disagreeing = Gauge(
            "sidecard_fleet_disagreeing_members",
            "Live sidecars whose version, config hash, state version or releases differ from most", registry=r
        )
        # unusual spend (issue 22)
        self.spend_anomaly_firing = Gauge(
            "sidecard_spend_anomaly_firing", "1 while a scope (feature or user pseudonym) spends far above its normal rate",
            ["kind", "scope"], registry=r,
        )
        self.spend_anomaly_rate = Gauge(
            "sidecard_spend_anomaly_rate_usd_per_hour", "A firing scope's spend rate over the detection window",
            ["kind", "scope"], registry=r,
        )
        self.spend_anomalies = Counter("sidecard_spend_anomalies", "Unusual-spend alerts fired", ["kind"], registry=r)

        # Counted by background parts in plain integers and read at scrape time (nothing on the request path);
        # without their part (tracing, usage off) the families have no samples.
        self.tracing_spans = _Counts(
            "sidecard_tracing_spans", "Spans by fate: recorded, dropped (the queue was full), exported, failed (the "
            "collector refused them or stayed unreachable)", "result", registry=r,
        )
        self.usage_records = _Counts(
            "sidecard_usage_records", "Usage records by fate: dropped (a queue was full, or too many waited for a failing "
            "disk)", "result", registry=r,
        )
        self.spend_write_failures = _Count(
            "sidecard_spend_write_failures", "Writes of the spend file that failed (a full disk, permissions lost), each "
            "retried at the next flush: a restart before one succeeds loses the spend since the last", registry=r,
        )

        self._safety(r)
        self._experiment_metrics(r)
        self._jobs(r)

    def forget(self, label: str, value: str) -> None:
        """Stop exporting every series whose LABEL is VALUE, in every family that has the label (a name that no
        longer holds anything: a model the upstream does not know)."""
        for family in vars(self).values():
            if isinstance(family, _Metric):
                family.remove_where(label, value)

    def _safety(self, r: CollectorRegistry) -> None:
        """Guardrails, injection defences, data policies, access control and the audit trail (docs/safety.md)."""
        self.guardrail_outcomes = Counter(
            "sidecard_guardrail_outcomes", "Answers run through guardrails, by outcome (pass, flag, redact, retry, block)",
            ["outcome"], registry=r)
        self.guardrail_findings = Counter(
            "sidecard_guardrail_findings", "Guardrail findings by check name and action", ["check", "action"], registry=r)
        self.guardrail_check_errors = Counter(
            "sidecard_guardrail_check_errors", "Guardrail checks that failed to run (a typed outcome, never a crash)",
            ["check"], registry=r)
        self.injection_detections = Counter(
            "sidecard_injection_detections", "Inputs scored at or over the injection threshold, by action (flag, block, route)",
            ["action"], registry=r)
        self.injection_rules = Counter(
            "sidecard_injection_rules", "Detector rules that fired on inputs over the threshold", ["rule"], registry=r)
        self.policy_actions = Counter(
            "sidecard_policy_actions", "Data-policy actions (scrub, refuse, pin) by data kind or pin", ["action", "kind"],
            registry=r
        )
        self.access_denied = Counter(
            "sidecard_access_denied", "Requests refused by access control, by face and the limit refused",
            ["face", "key"], registry=r
        )
        self.app_requests = Counter(
            "sidecard_app_requests", "Requests by app identity and outcome", ["app", "outcome"], registry=r)
        self.audit_records = Counter(
            "sidecard_audit_records", "Audit records by result (queued, dropped: the queue was full)", ["result"], registry=r)
        self.audit_failed = _Count(
            "sidecard_audit_write_failures", "Audit records lost to write errors (a full disk)", registry=r)

    def _experiment_metrics(self, r: CollectorRegistry) -> None:
        """Feedback and experiments (docs/experiments.md)."""
        scope = ["feature", "prompt", "version"]
        self.feedback = Counter("sidecard_feedback", "Feedback accepted, by kind (score, thumbs, retry, abandoned)",
                                        [*scope, "kind"], registry=r)
        self.feedback_negative = Counter("sidecard_feedback_negative", "Feedback accepted that was negative (value below 0.5)",
                                                 scope, registry=r)
        self.feedback_value = Counter("sidecard_feedback_value", "Sum of accepted feedback values (0-1): divided by "
                                              "sidecard_feedback_total, the mean", scope, registry=r)
        self.feedback_refused = Counter("sidecard_feedback_refused", "Feedback refused, by reason", ["reason"], registry=r)
        self.feedback_dropped = Counter(
            "sidecard_feedback_dropped", "Feedback not passed on to the quality monitor: its queue was full", registry=r
        )
        self.feedback_tracked = Gauge("sidecard_feedback_tracked_requests", "Answers that can take feedback now", registry=r)
        self.experiment_state = Gauge("sidecard_experiment_state", "1 for an experiment's state (running, decided, failed, "
                                              "inconclusive, stopped), 0 for the others", ["experiment", "state"], registry=r)
        self.experiment_samples = Gauge("sidecard_experiment_samples", "Values of the primary metric per arm",
                                                ["experiment", "arm"], registry=r)
        self.experiment_effect = Gauge("sidecard_experiment_effect", "Arm's mean minus the control's on the primary metric",
                                               ["experiment", "arm"], registry=r)
        self.experiment_p_value = Gauge("sidecard_experiment_p_value", "Always-valid p-value of arm against the control "
                                                "on the primary metric", ["experiment", "arm"], registry=r)
        self.rollout_percent = Gauge("sidecard_rollout_percent", "A rollout's candidate share of traffic, in %",
                                             ["prompt"], registry=r)
        self.rollout_actions = Counter("sidecard_rollout_actions", "Rollout steps by action (start, promote, complete, "
                                               "rollback, pause, resume, abort)", ["prompt", "action"], registry=r)
        self.shadow_requests = Counter("sidecard_shadow_requests", "Live answers considered for a shadow call, by result "
                                               "(answered, failed, skipped_budget, dropped)", ["shadow", "result"], registry=r)
        self.shadow_cost = Counter("sidecard_shadow_cost_usd", "Spent on shadow calls", ["shadow"], registry=r)
        self.review_items = Counter("sidecard_review_items", "Answers offered to the review queue, by result "
                                            "(queued, duplicate, dropped)", ["result"], registry=r)
        self.review_labels = Counter("sidecard_review_labels", "Review items labelled, by label", ["label"], registry=r)
        self.review_pending = Gauge("sidecard_review_pending", "Review items waiting for a label", registry=r)

    def _jobs(self, r: CollectorRegistry) -> None:
        """Async jobs (docs/jobs.md): the gauges are refreshed from the job store every few seconds."""
        self.jobs = Gauge("sidecard_jobs", "Jobs in the store by state", ["state"], registry=r)
        self.jobs_at_risk = Gauge(
            "sidecard_jobs_at_risk", "Unfinished jobs within jobs.min_slack_s of their deadline", registry=r
        )
        self.jobs_oldest_pending_seconds = Gauge(
            "sidecard_jobs_oldest_pending_seconds", "Age of the oldest unfinished job (0: none)", registry=r
        )
        self.job_batches_in_flight = Gauge(
            "sidecard_job_batches_in_flight", "Message Batches submitted and not yet read", registry=r
        )
        self.jobs_savings_usd = Gauge(
            "sidecard_jobs_savings_usd", "Batch-served jobs' interactive price less what they cost (jobs kept)", registry=r
        )
        self.jobs_finished = Counter(
            "sidecard_jobs_finished", "Jobs finished, by how they were served (batch, engine, cache) and outcome",
            ["served", "outcome"], registry=r
        )


class _Counts:
    """A counter family whose values a background part keeps: `source` returns {label value: count}."""

    def __init__(self, name: str, help: str, label: str, *, registry: CollectorRegistry) -> None:
        self._name, self._labelnames, self.help = name, (label,), help  # (the names prometheus_client's own use)
        self.source: Callable[[], Mapping[str, float]] = dict
        registry.register(self)

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self.help, labels=self._labelnames)]

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self.help, labels=self._labelnames)
        for value, count in self.source().items():
            family.add_metric([value], count)
        return [family]


class _Count:
    """A counter a background part keeps (`source` returns it); no sample until the part is running."""

    def __init__(self, name: str, help: str, *, registry: CollectorRegistry) -> None:
        self._name, self._labelnames, self.help = name, (), help
        self.source: Callable[[], float] | None = None
        registry.register(self)

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self.help)]

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self.help)
        if self.source is not None:
            family.add_metric([], self.source())
        return [family]
