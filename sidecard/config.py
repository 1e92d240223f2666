"""Daemon configuration: a TOML file decoded into msgspec Structs.

Every field has a default, so `sidecard serve` runs with no file at all. Unknown keys are errors, not
silently ignored: a typo in an operator's config must not fall back to a default unnoticed.

Every section's settings live here (and nothing is built here): a little over 500 lines, in the order of
docs/configuration.md, so a key is found in one place.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple, Union
from urllib.parse import urlsplit

import msgspec

from .errors import describe_validation_error
from .jobs.settings import JobsSettings
from .fleet.settings import FleetSettings
from .protocol import MaxTokens

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
OptionalName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{0,64}$")]  # "" = unset


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def default_socket_path() -> str:
    """`$SIDECARD_SOCKET`, else a per-user runtime directory (the clients use the same rule)."""
    if env := os.environ.get("SIDECARD_SOCKET"):
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "sidecard" if runtime else Path(f"/tmp/sidecard-{os.getuid()}")
    return str(base / "app.sock")


class ServerConfig(_Section):
    socket: str = ""  # empty: default_socket_path()
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660
    socket_group: Union[str, None] = None
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1 << 20
    # The most a connection may raise its own limit to with a `hello` frame (images, PDFs).
    max_frame_bytes_ceiling: Annotated[int, msgspec.Meta(ge=1024)] = 32 << 20
    max_inflight_per_connection: PositiveInt = 1024
    max_connections: PositiveInt = 4096
    drain_grace_s: NonNegative = 20.0
    # A client that reads nothing for this long is disconnected, so it cannot pin the daemon's memory.
    client_write_timeout_s: Positive = 10.0
    # Bytes of requests not yet fully received (partial frames, HTTP bodies) held at once, over all connections
    # of the app socket and the HTTP face; the connection that would go over is refused (docs/security.md).
    max_incomplete_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 128 << 20

    def __post_init__(self) -> None:
        if self.max_incomplete_bytes < self.max_frame_bytes:
            raise ValueError("server.max_incomplete_bytes is smaller than server.max_frame_bytes")


class AdminConfig(_Section):
    socket: str = ""  # empty: admin.sock beside the app socket
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o600
    socket_group: Union[str, None] = None
    # Callers allowed besides the daemon's own uid and root (checked with SO_PEERCRED).
    allow_uids: list[int] = []
    allow_gids: list[int] = []


class HttpConfig(_Section):
    """The Anthropic-compatible HTTP face (POST /v1/messages) for apps that keep the official SDK."""

    enabled: bool = True
    socket: str = ""  # empty: http.sock beside the app socket
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660
    socket_group: Union[str, None] = None
    address: Union[str, None] = None  # also on a loopback TCP port, e.g. "127.0.0.1:8788"
    # Connections served at once (more wait in the listen backlog); at most a quarter of the open-file limit.
    max_connections: PositiveInt = 1024
    # A connection that takes longer than this to send a whole request (idle keep-alive included) is closed.
    idle_timeout_s: Positive = 30.0
    # Browser pages that may call the face ("https://app.example.com"): a request with an Origin header (or a
    # Sec-Fetch-Site other than none or same-origin) from any other is refused, so that a web page cannot spend.
    allowed_origins: list[str] = []
    # Host names the TCP port's requests may carry besides loopback ones (DNS rebinding: docs/security.md).
    allowed_hosts: list[str] = []

    def __post_init__(self) -> None:
        if self.address is not None:
            host, _ = parse_address(self.address)
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(f"address {self.address!r}: the HTTP face has no authentication, so it listens on loopback only")
        # Lowercased, as browsers send them (scheme and host are case-insensitive; the face compares bytes).
        self.allowed_origins = [each.lower() for each in self.allowed_origins]
        self.allowed_hosts = [each.lower() for each in self.allowed_hosts]
        for origin in self.allowed_origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"allowed_origins: {origin!r} is not an origin: scheme://host[:port], no path, as a browser "
                                 'sends it in Origin (e.g. "https://app.example.com"; "null" is any sandboxed or file:// page\'s)')
        for name in self.allowed_hosts:
            if not _HOST_NAME.fullmatch(name):
                raise ValueError(f"allowed_hosts: {name!r} is not a host name: a name or address as Host gives it, without "
                                 'the port (e.g. "sidecard.internal", "[fd00::1]")')


_ORIGIN: Final = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:[0-9]{1,5})?")
_HOST_NAME: Final = re.compile(r"\[[0-9a-f:.]+\]|[a-z0-9_.-]+")


class StateConfig(_Section):
    # Kill switches and route and prompt overrides, kept across restarts; relative to the config file.
    path: str = "sidecard-state.json"
    # A state file that cannot be read: "refuse" to start (it may hold kill switches that must stay on), or
    # "open": move it aside and start without it.
    on_corrupt: Literal["refuse", "open"] = "refuse"


class UpstreamConfig(_Section):
    base_url: Union[str, None] = None  # None: ANTHROPIC_BASE_URL, else the SDK's default
    api_key_file: Union[str, None] = None  # else $ANTHROPIC_API_KEY
    anthropic_version: Union[str, None] = None  # None: the version the installed SDK speaks
    # Send first-party requests as pre-encoded bytes over the pool instead of through the SDK's
    # request builder (same wire format; the SDK still serves Bedrock, Vertex and token auth).
    fast_path: bool = True
    connect_timeout_s: Positive = 10.0
    max_connections: PositiveInt = 4096
    # Kept alive per origin; None: every connection opened is kept (until idle_timeout_s), so a burst's
    # connections serve the next burst instead of being closed and opened again.
    max_idle_connections: Union[PositiveInt, None] = None
    idle_timeout_s: Positive = 30.0


class Target(_Section):
    model: str
    provider: Literal["anthropic", "bedrock", "vertex"] = "anthropic"
    timeout_s: Positive = 60.0  # per attempt
    # More than four attempts on one target masks a systemic problem rather than riding out a blip.
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=4)] = 3
    hedge_after_ms: Union[PositiveInt, None] = None
    max_concurrency: Union[PositiveInt, None] = None  # calls in flight to this target; None: [queue] max_concurrency
    # Streams: the first token must arrive within this (else the attempt fails over); None: timeout_s.
    ttft_timeout_s: Union[Positive, None] = None
    # Streams: after a first-token timeout, retry this target (up to max_attempts) instead of moving on at once.
    ttft_retry: bool = False
    base_url: Union[str, None] = None
    region: Union[str, None] = None  # bedrock: AWS region; vertex: Google Cloud region
    project_id: Union[str, None] = None  # vertex


def target_problem(target: Target) -> str | None:
    """Why `target` cannot work whatever the traffic, or None. Checked at load, reload and route overrides; the
    region and project come from the config alone, never the environment, which differs between the shell that
    checks a config and the service that runs it."""
    if target.provider == "bedrock" and not target.region:
        return f"bedrock:{target.model}: a bedrock target needs region (the AWS region of its Bedrock endpoint)"
    if target.provider == "vertex" and not target.project_id:
        return f"vertex:{target.model}: a vertex target needs project_id (its Google Cloud project)"
    return None


class Route(_Section):
    targets: list[Target]
    # Text answered with `degraded: true` when every target has failed.
    static_fallback: Union[str, None] = None
    cache_ttl_s: Union[NonNegative, None] = None  # None: [cache] ttl_s; 0: never cache this route
    # Cache answers to requests with a temperature above 0 (or none, which means the API's default of 1).
    cache_any_temperature: bool = False
    # Streams: after a failure mid-stream, continue on the next target instead of ending with a partial error.
    resume: bool = False
    # A request that names a model may be answered by the route's other targets when that model fails (false: only
    # by that model). A request's own `model_fallback` wins.
    model_fallback: bool = True

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("a route needs at least one target")
        for target in self.targets:
            if problem := target_problem(target):
                raise ValueError(problem)


def _default_routes() -> dict[str, Route]:
    return {
        "default": Route(
            targets=[
                Target(model="claude-sonnet-4-6"),
                Target(model="claude-haiku-4-5-20251001", timeout_s=30.0),
            ]
        ),
        # The quality judge: a cheap model on its own route, so its traffic never competes with answers.
        "judge": Route(targets=[Target(model="claude-haiku-4-5-20251001", timeout_s=30.0)]),
    }


class Feature(_Section):
    """Per-feature settings; a request's `feature` label selects them."""

    static_fallback: Union[str, None] = None  # wins over the route's
    cache_ttl_s: Union[NonNegative, None] = None  # wins over the route's
    cache_any_temperature: bool = False


class RetryConfig(_Section):
    base_delay_ms: Annotated[float, msgspec.Meta(gt=0)] = 250.0
    max_delay_ms: Annotated[float, msgspec.Meta(gt=0)] = 8_000.0
    # The longest wait the provider may ask of a request on one target (a 429's or 529's retry-after, its rate-limit
    # window's hold): while a later target can take the request, a longer one moves on to it at once (rate limits
    # are per model); on the last, a longer one ends the request at once with its retry-after, for the app to decide.
    failover_retry_after_ms: NonNegative = 1_000.0
    max_retry_after_ms: NonNegative = 8_000.0
    # Retries and hedges may add at most this fraction of request volume, plus a floor per second.
    budget_ratio: Fraction = 0.2
    budget_min_per_s: NonNegative = 1.0
    budget_window_s: Positive = 10.0


class BreakerConfig(_Section):
    failure_rate: Fraction = 0.5
    min_volume: PositiveInt = 20
    consecutive_failures: PositiveInt = 5
    window_s: Positive = 30.0
    cooldown_s: Positive = 15.0
    half_open_probes: PositiveInt = 1


class RequestsConfig(_Section):
    default_route: Name = "default"
    default_deadline_ms: PositiveInt = 60_000
    # The SDKs' own default timeout: a client that states its timeout (x-stainless-timeout) gets up to this.
    max_deadline_ms: PositiveInt = 600_000
    default_max_tokens: MaxTokens = 1024
    # A stream's deadline is for its first token; after it, a stream with no event for this long has stalled,
    # and no stream runs longer than stream_max_duration_s in all.
    stream_idle_timeout_s: Positive = 30.0
    stream_max_duration_s: Positive = 3600.0
    # Models requests may name that no route has: each gets breakers, queues and metric series of its own, so a
    # client naming a new model on every request must not grow them without end. Past it such a model is refused
    # (`bad_request`); one the upstream does not know (404) gives its slot back, and a reload gives back the slots
    # of those the upstream never answered.
    max_named_models: Annotated[int, msgspec.Meta(ge=0)] = 64
    # Features requests may name that the config does not: each gets metric series, usage rows and quality,
    # feedback, rate-limit and budget keys of its own. Past it a request is served as ever and counted under the
    # feature `_other`. 256 is far more than an app's real features, and keeps a flood of names to a few thousand
    # series.
    max_named_features: Annotated[int, msgspec.Meta(ge=0)] = 256


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    destination: str = "stderr"  # or a file path, opened for append
    prompt_prefix_chars: Annotated[int, msgspec.Meta(ge=0, le=80)] = 80


class MetricsConfig(_Section):
    enabled: bool = True
    address: str = "127.0.0.1:9464"

    def __post_init__(self) -> None:
        parse_address(self.address)


class Price(_Section):
    """USD per million tokens."""

    input: NonNegative
    output: NonNegative
    cache_write: Union[NonNegative, None] = None  # default 1.25 x input (5-minute cache writes)
    cache_read: Union[NonNegative, None] = None  # default 0.1 x input


def _default_prices() -> dict[str, Price]:
    # Matched by the longest prefix of the model id (provider prefixes such as "us.anthropic." stripped).
    return {
        "claude-opus-4-6": Price(input=5.0, output=25.0),
        "claude-opus-4-5": Price(input=5.0, output=25.0),
        "claude-opus-4-1": Price(input=15.0, output=75.0),
        "claude-opus-4": Price(input=15.0, output=75.0),
        "claude-sonnet-4": Price(input=3.0, output=15.0),
        "claude-3-7-sonnet": Price(input=3.0, output=15.0),
        "claude-haiku-4-5": Price(input=1.0, output=5.0),
        "claude-3-5-haiku": Price(input=0.8, output=4.0),
        "claude-3-haiku": Price(input=0.25, output=1.25),
    }


class CacheConfig(_Section):
    enabled: bool = True
    max_entries: PositiveInt = 10_000
    max_bytes: PositiveInt = 64 << 20
    max_entry_bytes: Union[PositiveInt, None] = None  # None: max_bytes / 16
    ttl_s: NonNegative = 300.0
    # How long past its TTL an answer is kept for stale-if-error, served only when every target fails.
    stale_ttl_s: NonNegative = 3600.0
    store: Literal["memory", "sqlite"] = "memory"
    path: str = "sidecard-cache.db"  # sqlite only; relative to the config file's directory


class RateLimit(_Section):
    """Requests and tokens per minute for a scope: "global", "user" (each user key), "feature" (each feature)
    or "feature:NAME". A request over any limit is refused at once with `rate_limited` and `retry_after_ms`."""

    scope: str
    requests_per_minute: Union[PositiveInt, None] = None
    tokens_per_minute: Union[PositiveInt, None] = None  # input estimate + max_tokens, corrected after the call
    burst_s: Positive = 10.0  # how many seconds' worth may arrive at once

    def __post_init__(self) -> None:
        kind, _, name = self.scope.partition(":")
        if not (self.scope in ("global", "user", "feature") or (kind in ("feature", "app") and name)):
            raise ValueError(f'scope {self.scope!r}: use "global", "user", "feature" or "feature:NAME"')
        if not (self.requests_per_minute or self.tokens_per_minute):
            raise ValueError("set requests_per_minute, tokens_per_minute or both")


class BudgetConfig(_Section):
    """Spend in USD per window ("hour" rolling; "day", "month" calendar UTC) for a scope: "global", "user",
    "feature:NAME", "feature:*", "route:NAME" or "route:*"."""

    scope: str
    window: Literal["hour", "day", "month"] = "day"
    soft_usd: Union[NonNegative, None] = None  # crossing it raises an alert (and may switch route)
    hard_usd: Union[NonNegative, None] = None  # reaching it refuses requests with `budget_exceeded`
    soft_route: Union[Name, None] = None  # while over the soft limit, requests in this scope use this route

    def __post_init__(self) -> None:
        check_budget_scope(self.scope)
        check_spend_limits(self.soft_usd, self.hard_usd)


def check_budget_scope(scope: str) -> None:
    """A budget's scope must be one the spend ledger counts (it checks the same)."""
    kind, _, name = scope.partition(":")
    # "app:NAME" comes from an app identity's own budget ([safety.access.apps.NAME] budget).
    if not (scope in ("global", "user") or (kind in ("feature", "route") and name) or (kind == "app" and name and name != "*")):
        raise ValueError(f'scope {scope!r}: use "global", "user", "feature:NAME", "feature:*", "route:NAME" or "route:*"')


def check_spend_limits(soft_usd: float | None, hard_usd: float | None) -> None:
    for limit in (soft_usd, hard_usd):
        if limit is not None and not 0 <= limit < math.inf:
            raise ValueError("a spend limit must be a finite, non-negative number of dollars")


class QueueConfig(_Section):
    max_concurrency: PositiveInt = 256  # upstream calls in flight per target
    adaptive: Literal["off", "aimd", "gradient"] = "off"  # adapt the limit to observed latency and drops
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 1000  # requests waiting per target
    shed: bool = True  # CoDel-style shedding when queueing delay stays high
    # LLM calls take seconds, so a slot frees only every (call time / limit): a queue delay of a second or
    # two is normal. Shedding starts when every request waited longer than the target for a whole interval.
    codel_target_ms: Positive = 2_000.0
    codel_interval_ms: Positive = 10_000.0


class ThrottleConfig(_Section):
    # Hold a target's traffic while its anthropic-ratelimit-* headers say the window is spent.
    enabled: bool = True
    min_requests_remaining: Annotated[int, msgspec.Meta(ge=0)] = 0
    min_tokens_remaining: Annotated[int, msgspec.Meta(ge=0)] = 0


class SpendConfig(_Section):
    path: str = "sidecard-spend.json"  # relative to the config file
    flush_interval_s: Positive = 1.0  # at most this much recorded spend can be lost in a crash
    # Fleet mode: what this sidecar spent while the store did not count it, until it is carried in.
    fleet_outage_path: str = "sidecard-fleet-outage.json"  # relative to the config file


class MonitorSettings(_Section):
    """How the quality monitor judges a prompt's (or feature's) answers (see quality/monitor.py)."""

    window: PositiveInt = 50  # values per rolling window
    min_samples: PositiveInt = 10  # values in the window before anything fires
    baseline_samples: PositiveInt = 50  # scores the learned baseline is the mean of
    baseline: Union[Fraction, None] = None  # a configured baseline wins over the learned one
    threshold: Fraction = 0.6  # absolute floor for the window's mean score
    max_drop: Fraction = 0.05  # fire when the mean is this far below the baseline ("a 5-point drop")
    hysteresis: Fraction = 0.02
    check_rate_threshold: Fraction = 0.2  # fire when a check fails on more than this share of the window
    feedback_negative_threshold: Fraction = 0.5  # fire when more than this share of the window's feedback is negative

    def __post_init__(self) -> None:
        if self.min_samples > self.window:
            raise ValueError(f"min_samples ({self.min_samples}) must not exceed window ({self.window})")


class QualityScope(_Section):
    """Quality settings for one prompt or feature."""

    sample_rate: Union[Fraction, None] = None  # share of answers judged; None: [quality] sample_rate
    language: Union[str, None] = None  # expected answer language (ISO 639-1), checked on every answer
    monitor: Union[MonitorSettings, None] = None  # overrides [quality.monitor] for this prompt or feature
    # Prompts: switch to this route while a quality alert fires ("" = off), for at most fallback_hold_s.
    fallback_route_on_alert: Union[OptionalName, None] = None
    fallback_hold_s: Positive = 1800.0

    def __post_init__(self) -> None:
        self.fallback_route_on_alert = self.fallback_route_on_alert or None


class QualityConfig(_Section):
    enabled: bool = True
    sample_rate: Fraction = 0.05  # share of answers sent to the judge
    canary_sample_rate: Fraction = 0.5  # canary versions are judged more, to decide about them sooner
    judge_route: Name = "judge"
    judge_concurrency: PositiveInt = 2
    judge_queue: PositiveInt = 100  # samples waiting for the judge; more are dropped (and counted)
    judge_daily_budget_usd: NonNegative = 5.0  # the judge stops for the day when it has spent this
    check_queue: PositiveInt = 1000  # answers waiting for the cheap checks
    auto_rollback_canary: bool = True  # a canary whose quality alert fires is rolled back to stable
    review_log: Union[str, None] = None  # a sampled-review log of judged answers (redacted); off by default
    webhook_url: Union[str, None] = None
    webhook_retries: PositiveInt = 5
    command: Union[list[str], None] = None  # run with each alert event as JSON on stdin
    monitor: MonitorSettings = msgspec.field(default_factory=MonitorSettings)
    prompts: dict[Name, QualityScope] = msgspec.field(default_factory=dict)
    features: dict[Name, QualityScope] = msgspec.field(default_factory=dict)

    def scope_for(self, prompt: str | None, feature: str) -> QualityScope | None:
        """The settings of a prompt if it has its own, else of its feature."""
        if prompt is not None and prompt in self.prompts:
            return self.prompts[prompt]
        return self.features.get(feature)

    def monitor_for(self, key: tuple[str, str, str]) -> MonitorSettings:
        """The monitor settings of a monitored key (prompt or "feature:NAME", version, model)."""
        name = key[0]
        scope = self.features.get(name[len("feature:") :]) if name.startswith("feature:") else self.prompts.get(name)
        return scope.monitor if scope is not None and scope.monitor is not None else self.monitor

    def __post_init__(self) -> None:
        # "" and [] are how a config template says "off"; the daemon sees None.
        self.review_log = self.review_log or None
        self.webhook_url = self.webhook_url or None
        self.command = self.command or None
        if self.webhook_url is not None:
            try:
                parts = urlsplit(self.webhook_url)
                parts.port  # noqa: B018 (raises on a bad port)
            except ValueError:
                parts = None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                # Not quoted back: webhook URLs often carry their token in the path.
                raise ValueError("webhook_url: not an http:// or https:// URL with a host")
        if self.command is not None and not self.command[0]:
            raise ValueError("command: the first element must name the program to run")


class PromptsConfig(_Section):
    # Relative to the config file's directory (or the working directory without a config file).
    directory: str = "prompts"
    watch: bool = True


class SimConfig(_Section):
    """The built-in simulated upstream used by `serve --simulate`."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # 0: any free port
    latency_ms: NonNegative = 0.0


# The metrics experiments and rollouts compare (experiments/metric.py has their directions and kinds).
MetricName = Literal["judge_score", "feedback_score", "review_score", "pass_rate", "error_rate", "cost", "latency"]
Alpha = Annotated[float, msgspec.Meta(gt=0, lt=1)]


class GuardConfig(_Section):
    """A metric that must not get worse than the control's (or stable's) by `margin` or more (`relative`: a share
    of the control's mean)."""

    metric: MetricName
    margin: NonNegative
    relative: bool = False


class ArmConfig(_Section):
    """One arm of an experiment: a prompt version, or (for a feature) a model or a route."""

    name: Name
    version: Union[PositiveInt, None] = None
    model: Union[str, None] = None
    route: Union[Name, None] = None
    weight: NonNegative = 1.0


class ExperimentConfig(_Section):
    """An A/B(/n) test (docs/experiments.md): the arms split a prompt's (or a feature's) users, sticky by user."""

    name: Name
    prompt: Union[Name, None] = None  # arms are this prompt's versions
    feature: Union[Name, None] = None  # arms are models or routes for this feature's requests
    arms: list[ArmConfig] = msgspec.field(default_factory=list)  # the first is the control
    primary: MetricName = "judge_score"
    guardrails: list[GuardConfig] = msgspec.field(default_factory=list)
    alpha: Alpha = 0.05
    guard_alpha: Alpha = 0.05
    min_samples: PositiveInt = 100  # per arm and metric, before anything is decided
    max_samples: Union[PositiveInt, None] = None  # per arm: past it without a verdict, inconclusive
    equivalence: NonNegative = 0.0  # arms this close on the primary metric are equal (0: never)

    def __post_init__(self) -> None:
        where = f"experiment {self.name}"
        if (self.prompt is None) == (self.feature is None):
            raise ValueError(f"{where}: name either a prompt (arms are versions) or a feature (arms are models or routes)")
        names = [arm.name for arm in self.arms]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"{where}: needs two or more arms with distinct names")
        if not any(arm.weight > 0 for arm in self.arms):
            raise ValueError(f"{where}: at least one arm needs a weight above 0")
        for arm in self.arms:
            given = [field for field in ("version", "model", "route") if getattr(arm, field) is not None]
            wanted = ["version"] if self.prompt is not None else ["model"] if self.arms[0].model is not None else ["route"]
            if given != wanted:
                raise ValueError(f"{where}: arm {arm.name} needs {wanted[0]} alone "
                                 f"({'a prompt experiment splits versions' if self.prompt else 'every arm of a feature experiment names a model, or every one a route'})")
        if len({guard.metric for guard in self.guardrails}) != len(self.guardrails):
            raise ValueError(f"{where}: each metric takes one guardrail")


def _default_guards() -> list[GuardConfig]:
    # Quality at most 3 points lower, errors at most 1 point more often, latency and cost at most 10 % higher.
    return [GuardConfig(metric="judge_score", margin=0.03), GuardConfig(metric="error_rate", margin=0.01),
            GuardConfig(metric="latency", margin=0.10, relative=True), GuardConfig(metric="cost", margin=0.10, relative=True)]


class RolloutConfig(_Section):
    """Progressive rollouts (`sidecardctl prompt rollout`) and how often experiments and rollouts are evaluated."""

    steps: list[Annotated[float, msgspec.Meta(gt=0, le=100)]] = msgspec.field(default_factory=lambda: [1.0, 5.0, 25.0, 50.0, 100.0])
    guards: list[GuardConfig] = msgspec.field(default_factory=_default_guards)
    alpha: Alpha = 0.05
    min_samples: PositiveInt = 100  # per arm and guard at a step, before the step is judged
    min_hold_s: NonNegative = 0.0
    max_hold_s: Annotated[float, msgspec.Meta(gt=0)] = 6 * 3600.0
    on_timeout: Literal["rollback", "pause"] = "rollback"
    evaluate_every_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # experiments and rollouts alike

    def __post_init__(self) -> None:
        if any(a >= b for a, b in zip(self.steps, self.steps[1:])) or not self.steps or self.steps[0] >= 100:
            raise ValueError("rollout.steps: increasing shares in %, the first below 100")
        if self.max_hold_s <= self.min_hold_s:
            raise ValueError("rollout.max_hold_s must be above rollout.min_hold_s")


class ShadowConfig(_Section):
    """Shadow traffic (docs/experiments.md): a share of a prompt's (or a feature's) live answers is asked again of a
    candidate model or version, off the request path, within its own budget; the two are compared."""

    name: Name
    prompt: Union[Name, None] = None
    feature: Union[Name, None] = None
    model: Union[str, None] = None  # the candidate: a model ...
    version: Union[PositiveInt, None] = None  # ... or (for a prompt) a version
    share: Fraction = 0.05
    budget_usd: NonNegative = 1.0  # per window
    window_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    max_in_flight: PositiveInt = 4
    deadline_ms: PositiveInt = 60_000

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.feature is None):
            raise ValueError(f"shadow {self.name}: name either a prompt or a feature")
        if (self.model is None) == (self.version is None) or (self.version is not None and self.prompt is None):
            raise ValueError(f"shadow {self.name}: name the candidate: a model, or (for a prompt) a version")


class ReviewConfig(_Section):
    """The human review queue (docs/experiments.md): a sampled share of answers, redacted, in a SQLite file on
    this host; more weight on low judge scores, negative feedback and failed checks."""

    enabled: bool = False  # it keeps (redacted) questions and answers: off until an operator wants it
    path: str = "sidecard-review.db"  # relative to the config file
    rate: Fraction = 0.01  # the share of answers reviewed, before weights
    rates: dict[str, Fraction] = msgspec.field(default_factory=dict)  # per prompt name, or "feature:<name>"
    low_score: Fraction = 0.5
    low_score_weight: Annotated[float, msgspec.Meta(ge=1)] = 10.0
    negative_feedback_weight: Annotated[float, msgspec.Meta(ge=1)] = 10.0
    check_failure_weight: Annotated[float, msgspec.Meta(ge=1)] = 5.0
    retention_s: Annotated[float, msgspec.Meta(gt=0)] = 30 * 86400.0
    max_items: PositiveInt = 10_000
    recent: PositiveInt = 1000  # recent answers kept in memory (redacted) for negative feedback to queue
    labels: dict[Name, Union[Fraction, None]] = msgspec.field(default_factory=lambda: {"good": 1.0, "bad": 0.0, "unsure": None})


class FeedbackConfig(_Section):
    """User feedback on answers (`op: feedback`, `POST /v1/feedback`; docs/experiments.md)."""

    retention_s: Annotated[float, msgspec.Meta(gt=0)] = 24 * 3600.0  # how long an answer takes feedback
    max_entries: PositiveInt = 100_000  # answers remembered for feedback (about 200 bytes each)
    score_min: float = 0.0
    score_max: float = 1.0
    labels: list[Name] = msgspec.field(default_factory=list)  # the labels allowed; empty: any short label
    max_comment_chars: Annotated[int, msgspec.Meta(ge=0)] = 2000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.score_min) and math.isfinite(self.score_max) and self.score_min < self.score_max):
            raise ValueError("feedback: score_min must be below score_max")

# ---------------------------------------------------------------- tracing, usage, unusual spend (issue 22)

_HEADER_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_HEADER_UNSAFE: Final = re.compile(r"[\r\n\0]")


class TracingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Spans (`tracing/`) to an OTLP/HTTP collector: off by default, and then free."""

    enabled: bool = False
    # The collector's OTLP/HTTP traces URL (its default port is 4318).
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    # Sent with every export, e.g. {authorization = "Bearer ..."}: treated as secrets, never logged.
    headers: dict[str, str] = {}
    service_name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "sidecard"
    # Share of new traces recorded; a request that arrives with a traceparent follows its sampled flag.
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # Ended spans waiting for export (about 3 KB each); beyond it the oldest are dropped, so a collector outage
    # costs at most this much memory.
    max_queue_spans: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 4096
    max_batch_spans: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 512
    # How often the exporter thread sends what has queued (sooner when a full batch is waiting).
    schedule_delay_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    # One export, its retries included.
    export_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"tracing.endpoint {self.endpoint!r}: use an http(s) URL, e.g. http://127.0.0.1:4318/v1/traces")
        for name, value in self.headers.items():
            if not _HEADER_TOKEN.fullmatch(name) or _HEADER_UNSAFE.search(value):
                raise ValueError(f"tracing.headers: {name!r} is not a valid header (name a token, value without CR, LF or NUL)")
        if self.max_batch_spans > self.max_queue_spans:
            raise ValueError("tracing.max_batch_spans is larger than tracing.max_queue_spans")


class UsageSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Usage rollups (`usage/`) for `sidecardctl usage`: off by default, as it keeps a file."""

    enabled: bool = False
    # The SQLite file, relative to the config file like [state] path.
    path: str = "sidecard-usage.sqlite3"
    # Hourly rollups older than this are deleted (400 days: a year of months to compare).
    retention_days: Annotated[float, msgspec.Meta(gt=0)] = 400.0
    # One transaction per interval; a crash loses at most this much usage.
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    # Records waiting for the writer; beyond it they are dropped (counted). At least the peak requests per
    # second times flush_interval_s.
    queue_size: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 50_000


class AnomalyConfig(_Section):
    """Unusual spend (`policies.anomaly`): a feature or user spending far above its own normal pattern."""

    enabled: bool = False
    # What a baseline is kept for: each feature, each user (by pseudonym), or both.
    scopes: list[Literal["feature", "user"]] = msgspec.field(default_factory=lambda: ["feature", "user"])
    # The sensitivity: fire above this many times the scope's normal rate ...
    factor: Annotated[float, msgspec.Meta(gt=1)] = 4.0
    # ... and this many standard deviations of its noise above it.
    z: Annotated[float, msgspec.Meta(ge=0)] = 3.0
    # The rate is judged over this much recent time (whole minutes).
    window_s: Annotated[int, msgspec.Meta(ge=60, multiple_of=60)] = 300
    min_usd_per_hour: NonNegative = 1.0  # below this rate nothing fires
    min_requests: Annotated[int, msgspec.Meta(ge=0)] = 10  # requests in the window before anything fires
    warmup_s: NonNegative = 3600.0  # history a scope needs before it can fire
    # A rate that lasts this long is taken as the scope's new normal.
    accept_after_s: Positive = 6 * 3600.0
    max_scopes: PositiveInt = 10_000
    # The baselines, kept across restarts (relative to the config file; "" keeps them in memory only: a restart
    # then starts every scope's warm-up again).
    path: str = "sidecard-anomaly.json"


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    requests: RequestsConfig = msgspec.field(default_factory=RequestsConfig)
    routes: dict[Name, Route] = msgspec.field(default_factory=_default_routes)
    features: dict[Name, Feature] = msgspec.field(default_factory=dict)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    prices: dict[str, Price] = msgspec.field(default_factory=dict)
    prompts: PromptsConfig = msgspec.field(default_factory=PromptsConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    rate_limits: list[RateLimit] = msgspec.field(default_factory=list)
    budgets: list[BudgetConfig] = msgspec.field(default_factory=list)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    throttle: ThrottleConfig = msgspec.field(default_factory=ThrottleConfig)
    spend: SpendConfig = msgspec.field(default_factory=SpendConfig)
    quality: QualityConfig = msgspec.field(default_factory=QualityConfig)
    sim: SimConfig = msgspec.field(default_factory=SimConfig)
    # The [safety] table, kept raw here: its settings Structs live with the safety parts (`safety/settings.py`,
    # above this layer), which check it at start, at reload and in check-config (`safety.rules.check`).
    safety: dict[str, Any] = msgspec.field(default_factory=dict)
    feedback: FeedbackConfig = msgspec.field(default_factory=FeedbackConfig)
    experiments: list[ExperimentConfig] = msgspec.field(default_factory=list)
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    shadows: list[ShadowConfig] = msgspec.field(default_factory=list)
    review: ReviewConfig = msgspec.field(default_factory=ReviewConfig)
    jobs: JobsSettings = msgspec.field(default_factory=JobsSettings)  # async jobs and Message Batches (docs/jobs.md)
    fleet: Union[FleetSettings, None] = None  # no [fleet]: everything stays local (docs/fleet.md)
    tracing: TracingSettings = msgspec.field(default_factory=TracingSettings)
    usage: UsageSettings = msgspec.field(default_factory=UsageSettings)
    anomaly: AnomalyConfig = msgspec.field(default_factory=AnomalyConfig)

    def __post_init__(self) -> None:
        # Routes an operator defines add to the built-in ones (as prices do); one of the same name replaces it. The
        # built-in default is kept only while it is the default route: a config that routes elsewhere (Bedrock
        # alone, say) must not gain an Anthropic target, and with it the need for an Anthropic API key.
        built_in = _default_routes()
        if self.requests.default_route == "default" and "default" not in self.routes:
            self.routes = {"default": built_in["default"], **self.routes}
        if self.quality.judge_route == "judge" and "judge" not in self.routes:
            self.routes["judge"] = built_in["judge"]  # the built-in judge unless an operator defines one
        if self.requests.default_route not in self.routes:
            raise ValueError(
                f"requests.default_route {self.requests.default_route!r} is not a configured route: add "
                f"[routes.{self.requests.default_route}] or name one of {', '.join(sorted(self.routes))}"
            )
        if self.quality.enabled and self.quality.judge_route not in self.routes:
            raise ValueError(f"quality.judge_route {self.quality.judge_route!r} is not a configured route")
        for scope in (*self.quality.prompts.values(), *self.quality.features.values()):
            if scope.fallback_route_on_alert is not None and scope.fallback_route_on_alert not in self.routes:
                raise ValueError(f"quality: fallback_route_on_alert {scope.fallback_route_on_alert!r} is not a configured route")
        scopes = [(budget.scope, budget.window) for budget in self.budgets]
        for scope, window in {s for s in scopes if scopes.count(s) > 1}:
            raise ValueError(f"two budgets for {scope} per {window}")
        for budget in self.budgets:
            if budget.soft_route is not None and budget.soft_route not in self.routes:
                raise ValueError(f"budgets: soft_route {budget.soft_route!r} is not a configured route")
        if self.requests.default_deadline_ms > self.requests.max_deadline_ms:
            raise ValueError("requests.default_deadline_ms is larger than requests.max_deadline_ms")
        if self.retry.failover_retry_after_ms > self.retry.max_retry_after_ms:
            # (else a request would sit out, with a fallback to go to, a wait it would refuse on its last target)
            raise ValueError("retry.failover_retry_after_ms is larger than retry.max_retry_after_ms")
        # An operator's price entries add to, and override, the built-in table.
        self.prices = {**_default_prices(), **self.prices}
        if not self.server.socket:
            self.server.socket = default_socket_path()
        if not self.admin.socket:
            self.admin.socket = str(Path(self.server.socket).with_name("admin.sock"))
        if not self.http.socket:
            self.http.socket = str(Path(self.server.socket).with_name("http.sock"))
        if not self.http.socket_group:
            self.http.socket_group = self.server.socket_group  # the same apps use both faces
        self._check_experiments()

    def _check_experiments(self) -> None:
        names = [experiment.name for experiment in self.experiments]
        for name in {n for n in names if names.count(n) > 1}:
            raise ValueError(f"two experiments named {name}")
        shadows = [shadow.name for shadow in self.shadows]
        for name in {n for n in shadows if shadows.count(n) > 1}:
            raise ValueError(f"two shadows named {name}")
        for experiment in self.experiments:
            for arm in experiment.arms:
                if arm.route is not None and arm.route not in self.routes:
                    raise ValueError(f"experiment {experiment.name}: arm {arm.name}'s route {arm.route!r} is not a configured route")

    def targets(self) -> list[Target]:
        """Every route's targets, in order (a target on several routes more than once)."""
        return [t for route in self.routes.values() for t in route.targets]


def with_overrides(config: Config, overrides: Mapping[str, Mapping[str, Any]]) -> Config:
    """CONFIG with some sections' keys replaced (the command line's flags); raises `msgspec.ValidationError`."""
    if not overrides:
        return config
    merged = msgspec.to_builtins(config)
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return msgspec.convert(merged, Config)


class ConfigError(Exception):
    """A config problem, as one line naming the file and the key."""


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def config_relative(path: str, config_path: str | None) -> Path:
    """Paths in a config file are relative to that file's directory."""
    resolved = Path(path)
    if not resolved.is_absolute() and config_path:
        resolved = Path(config_path).parent / resolved
    return resolved


def jobs_path(config: Config, config_path: str | None) -> Path:
    """The async jobs' store: `[jobs] path`, else beside the state file."""
    jobs = config.jobs
    return config_relative(jobs.path, config_path) if jobs.path else config_relative(config.state.path, config_path).parent / "jobs.sqlite"


# The files a corrupt or unreadable copy of which is moved aside (so each must be a regular file).
_SET_ASIDE: Final = frozenset({"[state] path", "[spend] path", "[spend] fleet_outage_path", "[cache] path"})


def kept_files(config: Config, config_path: str | None) -> list[tuple[Path, str]]:
    """The files the daemon replaces or sets aside (so they must be regular files), with the setting that names each."""
    return [(written.path, written.setting) for written in written_paths(config, config_path) if written.setting in _SET_ASIDE]


class Written(NamedTuple):
    """A file or directory the daemon writes, the setting that names it, and how it is written: "replaced" (a
    temp file renamed over it: its directory must be writable), "database" (SQLite: the file, and its directory for
    the journal), "appended" (the file, or its directory to create it) or "directory" (files created in it)."""

    path: Path
    setting: str
    how: Literal["replaced", "database", "appended", "directory"]
    needed: bool = True  # False: the daemon serves without it (the cache, then in memory alone), so never refuses for it


def written_paths(config: Config, config_path: str | None, *, audit_directory: str | None = None,
                  every: bool = False) -> list[Written]:
    """What the daemon writes with CONFIG: the files of the parts it turns on (EVERY: of every part, as if each
    were on: what a deployment must leave writable). AUDIT_DIRECTORY: `[safety.audit] directory` when audit is on
    (the `[safety]` table is checked above this layer). Log file and review log: as given, relative to the working
    directory (they are opened as given)."""

    def at(path: str) -> Path:
        return config_relative(path, config_path)

    cache, usage, anomaly = config.cache, config.usage, config.anomaly
    written = [Written(at(config.state.path), "[state] path", "replaced")]
    if every or config.budgets:
        written.append(Written(at(config.spend.path), "[spend] path", "replaced"))
    if every or (config.budgets and config.fleet is not None):
        written.append(Written(at(config.spend.fleet_outage_path), "[spend] fleet_outage_path", "replaced"))
    if every or (cache.enabled and cache.store == "sqlite"):
        written.append(Written(at(cache.path), "[cache] path", "database", needed=False))
    if every or config.jobs.enabled:
        written.append(Written(jobs_path(config, config_path), "[jobs] path", "database"))
    if every or config.review.enabled:
        written.append(Written(at(config.review.path), "[review] path", "database"))
    if every or usage.enabled:
        written.append(Written(at(usage.path), "[usage] path", "database"))
    if (every or anomaly.enabled) and anomaly.path:
        written.append(Written(at(anomaly.path), "[anomaly] path", "replaced"))
    if config.log.destination != "stderr":
        written.append(Written(Path(config.log.destination), "[log] destination", "appended"))
    if (every or config.quality.enabled) and config.quality.review_log:
        written.append(Written(Path(config.quality.review_log), "[quality] review_log", "appended"))
    if audit_directory is not None:
        written.append(Written(at(audit_directory), "[safety.audit] directory", "directory"))
    return written


def read_toml(path: str) -> dict[str, Any]:
    """A TOML file's tables: UTF-8, with or without the byte-order mark some editors write. Raises `OSError`,
    `UnicodeDecodeError` or `tomllib.TOMLDecodeError`."""
    with open(path, "rb") as f:
        return tomllib.loads(f.read().decode("utf-8-sig"))


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load and validate a config file; `None` gives the defaults. Raises `ConfigError`."""
    if path is None:
        return msgspec.convert({}, Config)
    where = os.fspath(path)
    try:
        raw = read_toml(where)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config error in {where}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error in {where}: invalid TOML: {exc}") from None
    return from_mapping(raw, where)


# Tables keyed by operator-chosen names; msgspec reports a bad entry as `routes[...]`, so we find the name.
_NAMED_TABLES: Final = {"routes": Route, "features": Feature, "prices": Price}


def from_mapping(raw: dict[str, object], where: str = "<config>") -> Config:
    if (found := _non_finite(raw, "")) is not None:
        key, value = found
        raise ConfigError(f"config error in {where}: {key}: expected a finite number, got {value}")
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config error in {where}: {_name_entry(raw, describe_validation_error(exc))}") from None


def _non_finite(value: object, key: str) -> tuple[str, float] | None:
    """The first inf or nan in a TOML value, with its key. TOML and msgspec take both as floats, and a bound such as
    `ge=0` lets inf through: `ttl_s = inf` would keep answers forever, a timeout never fire, a limit never bind. One
    walk over the file refuses them all, whatever the field (the raw `[safety]` table's too)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    if isinstance(value, dict):
        entries = ((f"{key}.{name}" if key else str(name), each) for name, each in value.items())
    elif isinstance(value, list):
        entries = ((f"{key}[{i}]", each) for i, each in enumerate(value))
    else:
        return None
    return next((found for where, each in entries if (found := _non_finite(each, where)) is not None), None)


def _name_entry(raw: dict[str, object], described: str) -> str:
    table, sep, rest = described.partition("[...]")
    entries = raw.get(table)
    if not sep or table not in _NAMED_TABLES or not isinstance(entries, dict):
        return described
    for name, entry in entries.items():
        try:
            msgspec.convert(entry, _NAMED_TABLES[table])
        except msgspec.ValidationError:
            return f"{table}.{name}{rest}"
    return described
