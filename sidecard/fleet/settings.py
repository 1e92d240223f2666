"""The `[fleet]` settings: where the shared store is, what this sidecar is called, and what happens when the
store cannot be reached.

Self-contained (msgspec Structs with defaults, stdlib only) so the config can hold it as an optional section:
no `[fleet]` section, no fleet mode.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Final, Literal, Union
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
# No braces: the namespace is the keys' hash tag (`{namespace}:...`), so a brace would split it.
Namespace = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
InstanceName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{0,128}$")]  # "" = hostname-pid

FailMode = Literal["local_share", "closed"]
SCHEMES: Final = {"redis": "tcp", "rediss": "tls", "unix": "unix"}
DEFAULT_PORT: Final = 6379


@dataclass(frozen=True, slots=True)
class StoreAddress:
    """Where the store listens. `str()` and `repr()` never show the password."""

    kind: Literal["tcp", "tls", "unix"]
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        if self.kind == "unix":
            return f"unix://{user}{self.path}" + (f"?db={self.db}" if self.db else "")
        scheme = "rediss" if self.kind == "tls" else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}/{self.db}"


def parse_url(url: str) -> StoreAddress:
    """`redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS), `unix://[user:password@]/path[?db=N]`."""
    parts = urlsplit(url)
    kind = SCHEMES.get(parts.scheme)
    if kind is None:
        raise ValueError(f"fleet url: use redis://, rediss:// or unix://, not {parts.scheme or 'no scheme'}://")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    query = parse_qs(parts.query)
    if kind == "unix":
        if not parts.path:
            raise ValueError("fleet url: unix:// needs a socket path, e.g. unix:///run/redis/redis.sock")
        return StoreAddress(kind, path=unquote(parts.path), db=_db(query.get("db", ["0"])[0]), username=username, password=password)
    if not parts.hostname:
        raise ValueError("fleet url: no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("fleet url: the port is not a number from 1 to 65535") from None
    return StoreAddress(kind, host=parts.hostname, port=port, db=_db(parts.path.strip("/") or "0"), username=username, password=password)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"fleet url: the database must be a number, not {text!r}")
    return int(text)


class StoreSecretError(Exception):
    """The store's password cannot be had (`password_env` not set, `password_file` unreadable): one line naming the
    setting and the variable or file, never a secret."""


class BreakerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The store's own breaker: a slow or dead store is skipped at once instead of costing every request a timeout."""

    consecutive_failures: PositiveInt = 3
    failure_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    min_volume: PositiveInt = 20
    window_s: Positive = 10.0
    cooldown_s: Positive = 1.0


class CacheSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    l2: bool = True  # the store as a second cache level behind the in-memory (or SQLite) one
    max_entry_bytes: PositiveInt = 256 << 10  # larger answers stay in the local cache only
    # A coalescing leader renews its lease while its upstream call runs; a follower takes over this long after
    # the leader stopped renewing (it died).
    lease_ms: Annotated[int, msgspec.Meta(ge=100)] = 3000


class QualitySettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    bucket_s: Annotated[int, msgspec.Meta(ge=1)] = 60  # the fleet-wide windows are made of buckets this long
    retention_s: Annotated[int, msgspec.Meta(ge=60)] = 86_400  # buckets older than this expire
    flush_interval_s: Positive = 1.0  # how often a sidecar adds its counts to the store


class FleetSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    namespace: Namespace = "sidecard"
    instance: InstanceName = ""  # empty: hostname-pid
    # The password can come from the environment, or a file (systemd's LoadCredential), instead of the url (which
    # lives in a config file).
    password_env: Union[str, None] = None
    # Read at start, its trailing newline stripped. A relative path names a systemd credential: in
    # $CREDENTIALS_DIRECTORY when systemd gives one, else next to the config file (the credential's source).
    password_file: Union[str, None] = None
    tls_ca_file: Union[str, None] = None  # rediss:// only; default: the system's CAs
    # The most the store may add to a request; past it the request goes on with local state.
    op_timeout_ms: Positive = 5.0
    connect_timeout_ms: Positive = 1000.0
    # When the store cannot be reached, a scope in `local_share` mode lets each sidecar through
    # limit / expected_instances on its own; `closed` refuses. Per scope ("global", "user", "feature:search"...)
    # in `on_failure`, else the kind's default.
    expected_instances: PositiveInt = 1
    budgets_on_failure: FailMode = "local_share"
    rate_limits_on_failure: FailMode = "local_share"
    on_failure: dict[str, FailMode] = {}
    resync_interval_s: Positive = 30.0  # a full read of operator state heals a missed change message
    heartbeat_interval_s: Positive = 5.0
    heartbeat_ttl_s: Positive = 15.0  # an instance that stopped beating leaves the listing after this
    # A budget reservation outlives its request's deadline by this much, then lapses (its sidecar died).
    reservation_margin_s: Positive = 30.0
    breaker: BreakerSettings = msgspec.field(default_factory=BreakerSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)
    quality: QualitySettings = msgspec.field(default_factory=QualitySettings)

    def __post_init__(self) -> None:
        parse_url(self.url)  # check-config catches what serve would
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("set password_env or password_file, not both")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must be longer than heartbeat_interval_s, or live instances blink out")
        for scope in self.on_failure:
            kind, _, name = scope.partition(":")
            if not (scope in ("global", "user", "feature", "route") or (kind in ("feature", "route") and name)):
                raise ValueError(f'fleet on_failure scope {scope!r}: use "global", "user", "feature", "feature:NAME", "route:NAME"')

    def address(self, environ: Mapping[str, str] | None = None, *, config_dir: str = "") -> StoreAddress:
        """The parsed url, with the password from `password_env` or `password_file` when one is set; raises
        `StoreSecretError` when it cannot be had."""
        address = parse_url(self.url)
        password = self._password(os.environ if environ is None else environ, config_dir)
        if password is not None:
            address = StoreAddress(address.kind, address.host, address.port, address.path, address.db, address.username, password)
        return address

    def _password(self, environ: Mapping[str, str], config_dir: str) -> str | None:
        if self.password_env is not None:
            password = environ.get(self.password_env)
            if password is None:
                raise StoreSecretError(f"[fleet] password_env: the environment variable {self.password_env} is not set")
            return password
        if self.password_file is None:
            return None
        path = os.path.join(environ.get("CREDENTIALS_DIRECTORY") or config_dir, self.password_file)  # (an absolute one as is)
        try:
            with open(path, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise StoreSecretError(f"[fleet] password_file: {path} cannot be read: {reason}") from None
        if not password:
            raise StoreSecretError(f"[fleet] password_file: {path} is empty")
        return password

    def instance_name(self) -> str:
        return self.instance or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def op_timeout_s(self) -> float:
        return self.op_timeout_ms / 1000

    def fail_mode(self, kind: Literal["budget", "rate_limit"], scope: str) -> FailMode:
        """What a scope does while the store is unreachable: its own setting, its kind's ("feature" for
        "feature:x"), else the default for budgets or rate limits."""
        mode = self.on_failure.get(scope) or self.on_failure.get(scope.partition(":")[0])
        if mode is not None:
            return mode
        return self.budgets_on_failure if kind == "budget" else self.rate_limits_on_failure

    def local_share(self, limit: float) -> float:
        """A sidecar's part of a fleet-wide limit while it cannot see the others."""
        return limit / self.expected_instances
