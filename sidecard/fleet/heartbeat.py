"""Which sidecars of the namespace are alive, and whether they agree.

Each sidecar writes its heartbeat every `heartbeat_interval_s` (`{ns}:hb:<instance>`, expiring after
`heartbeat_ttl_s`) and lists itself in `{ns}:instances` (a sorted set scored by when the heartbeat lapses, so a
listing drops the dead without scanning keys). `disagreements` flags the instances whose version, config hash,
operator state version or prompt releases differ from what most of the fleet runs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any, Final, Union

import msgspec
import trio

from .connection import ADMIN_TIMEOUT_S, Connection
from .errors import StoreDataError, StoreError
from .keys import Keys


class Release(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A prompt's releases as this sidecar serves them."""

    stable: Union[int, None] = None
    canary: Union[int, None] = None
    canary_percent: Union[float, None] = None


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    instance: str
    version: str  # sidecard's
    config_hash: str
    state_version: int = 0  # the operator state version it has applied
    prompts: dict[str, Release] = {}
    started_at: float = 0.0  # unix time
    sent_at: float = 0.0


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Heartbeat)


async def beat(connection: Connection, keys: Keys, heartbeat: Heartbeat, *, ttl_s: float, now: float) -> None:
    """One heartbeat, and the listing's dead dropped, in one round trip."""
    await connection.pipeline([
        ("SET", keys.heartbeat(heartbeat.instance), _encoder.encode(heartbeat), "PX", math.ceil(ttl_s * 1000)),
        ("ZADD", keys.instances, now + ttl_s, heartbeat.instance),
        ("ZREMRANGEBYSCORE", keys.instances, "-inf", now),
    ], op="heartbeat")


async def instances(connection: Connection, keys: Keys, *, now: float) -> list[Heartbeat]:
    """The live instances, by name; a heartbeat this sidecard cannot read is `StoreDataError`."""
    names = await connection.call("ZRANGEBYSCORE", keys.instances, now, "+inf", op="instances", timeout_s=ADMIN_TIMEOUT_S)
    if not names:
        return []
    beats = await connection.call("MGET", *(keys.heartbeat(n.decode(errors="replace")) for n in names), op="instances",
                                  timeout_s=ADMIN_TIMEOUT_S)
    out = []
    for name, data in zip(names, beats):
        if data is None:
            continue  # lapsed between the two reads
        try:
            out.append(_decoder.decode(data))
        except msgspec.MsgspecError as exc:
            raise StoreDataError(f"the heartbeat of {name.decode(errors='replace')!r} is not readable: {exc}") from None
    return sorted(out, key=lambda h: h.instance)


FIELDS: Final = ("version", "config_hash", "state_version", "prompts")


def disagreements(beats: list[Heartbeat]) -> dict[str, list[str]]:
    """Per instance, the fields on which it differs from the most common value in the fleet; with no single most
    common value (two sidecars, one each), every instance is flagged on that field: none is the odd one."""
    flagged: dict[str, list[str]] = {}
    for field in FIELDS:
        values = [_comparable(getattr(b, field)) for b in beats]
        common = Counter(values).most_common()
        if len(common) < 2:
            continue
        tied = common[0][1] == common[1][1]
        for beat_, value in zip(beats, values):
            if tied or value != common[0][0]:
                flagged.setdefault(beat_.instance, []).append(field)
    return flagged


def _comparable(value: Any) -> Any:
    return _encoder.encode(value) if isinstance(value, dict) else value


async def run_heartbeats(
    connection: Connection, keys: Keys, make: Callable[[float], Heartbeat], *, interval_s: float, ttl_s: float,
    wall: Callable[[], float], on_error: Callable[[str], object] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Beat every `interval_s` until cancelled; a failed beat is reported and the next one tried on time."""
    task_status.started()
    while True:
        now = wall()
        try:
            await beat(connection, keys, make(now), ttl_s=ttl_s, now=now)
        except StoreError as exc:
            if on_error is not None:
                on_error(str(exc))
        await trio.sleep(interval_s)
