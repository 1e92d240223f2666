"""The admin socket: the operator's controls, separate from the app socket.

Same NDJSON framing and typed errors as the app protocol. Callers are authorised by their kernel-reported
credentials (SO_PEERCRED); every call, allowed or not, writes one audit log line. Each operation answers
with the state before and after it, and every change is persisted before it is acknowledged. A bug met
while answering is an `internal` error and one log line; it never ends the admin socket.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Union, get_args

import msgspec
import trio

from .config import Target
from .errors import Code, SidecardError, describe_validation_error
from .killswitch import KillSwitch, Mode, validate_scope
from .framing import NEED_DATA, Frame, FrameDecoder
from .protocol import (
    UNDECODABLE,
    ErrorFrame,
    RequestId,
    encode_frame,
    error_frame,
    salvage_id,
)

if TYPE_CHECKING:
    from .daemon import Daemon

MAX_ADMIN_FRAME: Final = 256 * 1024


# ---------------------------------------------------------------- operations


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


class _PromptOp(_Op, kw_only=True):
    prompt: str
    force: bool = False  # give traffic to a version whose quality alert is firing


class PromptUse(_PromptOp, tag="prompt.use", kw_only=True):
    version: int


class PromptRollback(_PromptOp, tag="prompt.rollback"):
    pass


class PromptCanary(_PromptOp, tag="prompt.canary", kw_only=True):
    percent: float
    version: Union[int, None] = None


class PromptPromote(_PromptOp, tag="prompt.promote"):
    pass


class PromptClear(_PromptOp, tag="prompt.clear"):
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


AdminOp = Union[
    Status, Kill, Unkill, RouteSetPrimary, RouteOverride, RouteRollback, PromptUse, PromptRollback,
    PromptCanary, PromptPromote, PromptClear, CacheFlush, BudgetStatus, BudgetRaise, BudgetReset, LimitsStatus,
    QualityStatus, QualityUnswitch, Reload, Drain,
]
_op_decoder: Final = msgspec.json.Decoder(AdminOp)
_KNOWN_OPS: Final = frozenset(t.__struct_config__.tag for t in get_args(AdminOp))


class _AnyOp(msgspec.Struct):
    op: str = "unknown"


_any_op_decoder: Final = msgspec.json.Decoder(_AnyOp)


def _attempted_op(frame: bytes) -> str:
    """The op a refused peer asked for, for the audit line; only known names, so the metric label stays bounded."""
    try:
        op = _any_op_decoder.decode(frame).op
    except UNDECODABLE:
        return "unknown"
    return op if op in _KNOWN_OPS else "unknown"
_MUTATING: Final = (Kill, Unkill, RouteSetPrimary, RouteOverride, RouteRollback, PromptUse, PromptRollback, PromptCanary, PromptPromote, PromptClear)
_AUDITED: Final = (*_MUTATING, BudgetRaise, BudgetReset, QualityUnswitch)


class AdminReply(msgspec.Struct):
    id: RequestId
    op: str
    result: Any = None
    before: Any = None
    after: Any = None
    ok: bool = True


# ---------------------------------------------------------------- peers


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: trio.socket.SocketType) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return Peer(pid, uid, gid)


def authorised(peer: Peer, *, allow_uids: set[int], allow_gids: set[int]) -> bool:
    """The daemon's own uid and root always; then the configured uids and (primary) gids."""
    return peer.uid in allow_uids or peer.uid in (0, os.getuid()) or peer.gid in allow_gids


# ---------------------------------------------------------------- the server


class AdminServer:
    def __init__(self, daemon: Daemon, *, peer_check: Callable[[trio.socket.SocketType], Peer] = peer_of) -> None:
        self.daemon = daemon
        self._peer_of = peer_check
        self._lock = trio.Lock()  # one change at a time: before/after and the saved state stay consistent

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._serve(stream)
            except Exception as exc:  # a bug costs this connection, never the admin socket
                self.daemon.log.internal_error("admin_connection", exc)

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            peer = self._peer_of(stream.socket)
        except OSError:
            return
        decoder = FrameDecoder(MAX_ADMIN_FRAME)
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            decoder.receive_data(data)
            while (event := decoder.next_event()) is not NEED_DATA:
                if isinstance(event, Frame):
                    reply = await self._answer(event.data, peer)
                else:
                    reply = error_frame(None, SidecardError(Code.FRAME_TOO_LARGE, "admin frame too large"))
                try:
                    await stream.send_all(encode_frame(reply))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if not data:
                return

    async def _answer(self, frame: bytes, peer: Peer) -> AdminReply | ErrorFrame:
        try:
            return await self._call(frame, peer)
        except Exception as exc:
            request_id = salvage_id(frame)
            self.daemon.log.internal_error("admin", exc, request_id, peer_uid=peer.uid)
            return error_frame(request_id, SidecardError(Code.INTERNAL, "internal error"))

    async def _call(self, frame: bytes, peer: Peer) -> AdminReply | ErrorFrame:
        log = self.daemon.log
        config = self.daemon.config.admin
        # Authorise before decoding: a refused peer learns nothing about the op set from parse errors.
        if not authorised(peer, allow_uids=set(config.allow_uids), allow_gids=set(config.allow_gids)):
            name = _attempted_op(frame)
            log.warning("admin", op=name, peer_uid=peer.uid, peer_pid=peer.pid, result="forbidden")
            self.daemon.metrics.admin_ops(name, "forbidden").inc()
            return error_frame(salvage_id(frame), SidecardError(Code.FORBIDDEN, f"uid {peer.uid} may not use the admin socket"))
        try:
            op = _op_decoder.decode(frame)
        except UNDECODABLE as exc:
            return error_frame(salvage_id(frame), SidecardError(Code.BAD_REQUEST, _describe(exc)))
        name = type(op).__struct_config__.tag
        args = {k: v for k, v in msgspec.structs.asdict(op).items() if k != "id"}
        async with self._lock:
            try:
                reply = await self._execute(op)
                if isinstance(op, _MUTATING):
                    await self.daemon.save_state()  # a change the disk refused is not acknowledged
            except SidecardError as err:
                log.warning("admin", op=name, args=args, peer_uid=peer.uid, peer_pid=peer.pid, result=err.code, message=err.message)
                self.daemon.metrics.admin_ops(name, err.code).inc()
                return error_frame(op.id, err)
        # Read-only calls (monitoring scripts poll status) are audited at debug level, changes at info.
        log.event(
            "admin", "info" if isinstance(op, (*_AUDITED, Reload, Drain, CacheFlush)) else "debug",
            op=name, args=args, peer_uid=peer.uid, peer_pid=peer.pid, result="ok", before=reply.before, after=reply.after,
        )
        self.daemon.metrics.admin_ops(name, "ok").inc()
        return reply

    async def _execute(self, op: AdminOp) -> AdminReply:
        d = self.daemon
        engine = d.engine
        assert engine is not None
        tag = type(op).__struct_config__.tag
        if isinstance(op, Status):
            return AdminReply(op.id, tag, result=d.status())
        if isinstance(op, Kill):
            return self._kill(op)
        if isinstance(op, Unkill):
            before = engine.kills.clear(_scope(op.scope))
            if before is None:
                raise SidecardError(Code.BAD_REQUEST, f"no kill switch on {op.scope}")
            d.metrics.kill_switches.set(len(engine.kills.active(engine.now())))
            return AdminReply(op.id, tag, before=d.describe_kill(before), after=None)
        if isinstance(op, (RouteSetPrimary, RouteOverride, RouteRollback)):
            if isinstance(op, RouteSetPrimary):
                before, after = engine.routes.set_primary(op.route, op.model, op.provider)
            elif isinstance(op, RouteOverride):
                before, after = engine.routes.override(op.route, op.targets)
            else:
                before, after = engine.routes.rollback(op.route)
            for target in after:
                engine.health(target)
            return AdminReply(op.id, tag, before=target_names(before), after=target_names(after))
        if isinstance(op, _PromptOp):
            store = engine.prompts
            with store.change():  # a refused op leaves the overrides as they were
                if isinstance(op, PromptUse):
                    before, after = store.use(op.prompt, op.version)
                elif isinstance(op, PromptRollback):
                    before, after = store.rollback(op.prompt)
                elif isinstance(op, PromptCanary):
                    before, after = store.set_canary(op.prompt, op.version, op.percent)
                elif isinstance(op, PromptPromote):
                    before, after = store.promote(op.prompt)
                else:
                    before, after = store.clear(op.prompt)
                note = d.guard_prompt_traffic(op.prompt, before, after, force=op.force, clearing=isinstance(op, PromptClear))
            d.count_prompt_errors()
            after = store.effective(op.prompt)
            return AdminReply(op.id, tag, result=None if note is None else {"note": note},
                              before=before.describe(), after=after.describe())
        if isinstance(op, (BudgetStatus, LimitsStatus, BudgetRaise, BudgetReset)):
            return self._traffic(op)
        if isinstance(op, QualityStatus):
            pipeline = d.quality
            return AdminReply(op.id, tag, result=None if pipeline is None else pipeline.status())
        if isinstance(op, QualityUnswitch):  # not persisted: a restart ends every switch anyway
            before = d.end_quality_switch(op.prompt)
            if before is None:
                raise SidecardError(Code.BAD_REQUEST, f"prompt {op.prompt!r} is not switched to a fallback route")
            return AdminReply(op.id, tag, before=before, after=None)
        if isinstance(op, CacheFlush):
            return AdminReply(op.id, tag, result={"flushed": d.flush_cache(feature=op.feature, prompt=op.prompt)})
        if isinstance(op, Reload):
            return AdminReply(op.id, tag, result=await d.reload())
        if isinstance(op, Drain):
            d.shutdown()
            return AdminReply(op.id, tag, result={"in_flight": engine.in_flight})
        raise SidecardError(Code.UNKNOWN_OP, f"unknown op {tag}")  # pragma: no cover (the union is closed)

    def _traffic(self, op: AdminOp) -> AdminReply:
        traffic = self.daemon.traffic
        assert traffic is not None
        tag = type(op).__struct_config__.tag
        if isinstance(op, BudgetStatus):
            return AdminReply(op.id, tag, result={"budgets": traffic.budget_status(), "spend_error": self.daemon.spend_error})
        if isinstance(op, LimitsStatus):
            return AdminReply(op.id, tag, result=traffic.limits_status())
        ledger = traffic.ledger
        wall_now = self.daemon.wall_now()
        if isinstance(op, BudgetRaise):
            before = _budget_view(ledger, op.scope, op.window, wall_now)
            try:
                ledger.raise_limit(op.scope, op.window, soft_usd=op.soft_usd, hard_usd=op.hard_usd, wall_now=wall_now)
            except ValueError as exc:
                raise SidecardError(Code.BAD_REQUEST, str(exc)) from None
            traffic.refresh_budget_gauges(wall_now)
            return AdminReply(op.id, tag, before=before, after=_budget_view(ledger, op.scope, op.window, wall_now))
        assert isinstance(op, BudgetReset)
        before = _budget_view(ledger, op.scope, op.window, wall_now)
        try:
            ledger.reset(op.scope, op.window, wall_now)
        except ValueError as exc:
            raise SidecardError(Code.BAD_REQUEST, str(exc)) from None
        traffic.refresh_budget_gauges(wall_now)
        return AdminReply(op.id, tag, before=before, after=_budget_view(ledger, op.scope, op.window, wall_now))

    def _kill(self, op: Kill) -> AdminReply:
        d = self.daemon
        engine = d.engine
        assert engine is not None
        if op.mode == "static" and not op.text:
            raise SidecardError(Code.BAD_REQUEST, "text: mode static needs the text to answer with")
        if op.expires_in_s is not None and op.expires_in_s <= 0:
            raise SidecardError(Code.BAD_REQUEST, "expires_in_s: must be positive")
        now = engine.now()
        switch = KillSwitch(
            scope=_scope(op.scope), mode=op.mode, text=op.text, reason=op.reason,
            expires_at=None if op.expires_in_s is None else now + op.expires_in_s, set_at=now,
        )
        before = engine.kills.set(switch)
        d.metrics.kill_switches.set(len(engine.kills.active(now)))
        return AdminReply(op.id, "kill", before=d.describe_kill(before), after=d.describe_kill(switch))


def _budget_view(ledger: Any, scope: str, window: str, wall_now: float) -> dict[str, Any] | None:
    view = ledger.describe(scope, window, wall_now)
    return None if view is None else {k: (round(v, 6) if isinstance(v, float) else v) for k, v in view.items()}


def _scope(scope: str) -> str:
    try:
        return validate_scope(scope)
    except ValueError as exc:
        raise SidecardError(Code.BAD_REQUEST, str(exc)) from None


def target_names(targets: list[Target]) -> list[str]:
    return [f"{t.provider}:{t.model}" for t in targets]


def _describe(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "frame is nested too deeply"
    text = str(exc).replace("`", "")
    if text.startswith("Invalid value") and text.endswith("$.op"):
        return "unknown admin op " + text.split(" - ")[0].removeprefix("Invalid value ")
    return describe_validation_error(exc)
