"""Where everything lives in the store: every key and channel of a namespace starts with `{namespace}:`.

The braces make the namespace a hash tag, so a namespace's keys share one Cluster slot and one script may
touch them all. `{ns}:schema` names the layout below; a sidecard refuses a namespace holding another one.
"""

from __future__ import annotations

from typing import Final, Literal

SCHEMA: Final = "sidecard-fleet/1"


class Keys:
    __slots__ = ("cache_channel", "cache_flushes", "carried", "flush_channel", "instances", "namespace", "prefix", "reservation_specs",
                 "reservations", "schema", "state", "state_channel")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        p = self.prefix = f"{{{namespace}}}:"
        self.schema = f"{p}schema"  # string: SCHEMA
        self.reservations = f"{p}res"  # zset: reservation id -> unix time it lapses
        self.reservation_specs = f"{p}resv"  # hash: reservation id -> "estimate\tbudget key\t..."
        self.carried = f"{p}carried"  # zset: id of an outage's spend carried in -> unix time the id is forgotten
        self.state = f"{p}state"  # hash: v (version), doc (operator state, JSON)
        self.instances = f"{p}instances"  # zset: instance -> unix time its heartbeat lapses
        self.state_channel = f"{p}state"  # pub/sub: a new operator state version
        self.cache_channel = f"{p}cache"  # pub/sub: a cache key whose leader landed or gave up
        self.cache_flushes = f"{p}cf"  # hash: "feature\tprompt" ("" = any) -> unix time of its last flush
        self.flush_channel = f"{p}flush"  # pub/sub: the cache was flushed (a field of cache_flushes)

    def rate(self, kind: Literal["requests", "tokens"], scope_key: str) -> str:
        """string: GCRA's theoretical arrival time, unix seconds."""
        return f"{self.prefix}rl:{kind[0]}:{scope_key}"

    def budget(self, window: str, scope_key: str) -> str:
        """hash: reserved, and per window kind: start + spent (day, month), or unix minute -> usd (hour)."""
        return f"{self.prefix}b:{window}:{scope_key}"

    def cache(self, cache_key: str) -> str:
        """hash: p (answer), s (stored at), e (expires at), x (stale until)."""
        return f"{self.prefix}c:{cache_key}"

    def lease(self, cache_key: str) -> str:
        """string: the coalescing leader's token."""
        return f"{self.prefix}l:{cache_key}"

    def heartbeat(self, instance: str) -> str:
        """string: the instance's heartbeat (JSON), expiring."""
        return f"{self.prefix}hb:{instance}"

    def quality(self, bucket_start: int) -> str:
        """hash: `prompt\\tversion\\tmodel\\tcounter` -> count, for one time bucket."""
        return f"{self.prefix}q:{bucket_start}"

    def decision(self, name: str) -> str:
        """string: the instance that took a once-only decision (a canary rollback), expiring."""
        return f"{self.prefix}d:{name}"
