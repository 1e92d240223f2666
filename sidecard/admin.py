"""The admin socket: the operator's controls, separate from the app socket.

Same NDJSON framing and typed errors as the app protocol. Callers are authorised by their kernel-reported
credentials (SO_PEERCRED); every call, allowed or not, writes one audit log line. An authorised frame is decoded
into a typed op and handed to the control layer (`control/`), which answers with the state before and after it
and keeps every change before it is acknowledged. A bug met while answering is an `internal` error and one log
line; it never ends the admin socket.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import trio

from .config import AdminConfig
from .control import Change, Control, ops
from .control.ops import KNOWN_OPS, PERSISTED, AdminOp, tag
from .errors import Code, SidecardError, describe_validation_error
from .framing import NEED_DATA, Frame, FrameDecoder
from .observe.log import JsonLog
from .observe.metrics import Metrics
from .protocol import UNDECODABLE, ErrorFrame, RequestId, encode_frame, error_frame, salvage_id

MAX_ADMIN_FRAME: Final = 256 * 1024


_op_decoder: Final = msgspec.json.Decoder(AdminOp)


class _AnyOp(msgspec.Struct):
    op: str = "unknown"


_any_op_decoder: Final = msgspec.json.Decoder(_AnyOp)


def _attempted_op(frame: bytes) -> str:
    """The op a refused peer asked for, for the audit line; only known names, so the metric label stays bounded."""
    try:
        op = _any_op_decoder.decode(frame).op
    except UNDECODABLE:
        return "unknown"
    return op if op in KNOWN_OPS else "unknown"


# Audited at info level (the rest, read-only calls that monitoring scripts poll, at debug).
_AUDITED: Final = (*PERSISTED, ops.BudgetRaise, ops.BudgetReset, ops.QualityUnswitch, ops.Reload, ops.Drain, ops.CacheFlush, ops.ReviewLabel,
            ops.JobCancel, ops.BatchCancel)


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
    def __init__(
        self, control: Control, *, config: AdminConfig, metrics: Metrics, log: JsonLog,
        peer_check: Callable[[trio.socket.SocketType], Peer] = peer_of,
    ) -> None:
        self.control = control
        self.config = config
        self.metrics = metrics
        self.log = log
        self._peer_of = peer_check

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._serve(stream)
            except Exception as exc:  # a bug costs this connection, never the admin socket
                self.log.internal_error("admin_connection", exc)

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
            self.log.internal_error("admin", exc, request_id, peer_uid=peer.uid)
            return error_frame(request_id, SidecardError(Code.INTERNAL, "internal error"))

    async def _call(self, frame: bytes, peer: Peer) -> AdminReply | ErrorFrame:
        log, config = self.log, self.config
        # Authorise before decoding: a refused peer learns nothing about the op set from parse errors.
        if not authorised(peer, allow_uids=set(config.allow_uids), allow_gids=set(config.allow_gids)):
            name = _attempted_op(frame)
            log.warning("admin", op=name, peer_uid=peer.uid, peer_pid=peer.pid, result="forbidden")
            self.metrics.admin_ops(name, "forbidden").inc()
            return error_frame(salvage_id(frame), SidecardError(Code.FORBIDDEN, f"uid {peer.uid} may not use the admin socket"))
        try:
            op = _op_decoder.decode(frame)
        except UNDECODABLE as exc:
            return error_frame(salvage_id(frame), SidecardError(Code.BAD_REQUEST, _describe(exc)))
        name = tag(op)
        args = {k: v for k, v in msgspec.structs.asdict(op).items() if k != "id" and v is not msgspec.UNSET}
        try:
            change = await self.control.execute(op)  # a change the backend refused is not acknowledged
        except SidecardError as err:
            log.warning("admin", op=name, args=args, peer_uid=peer.uid, peer_pid=peer.pid, result=err.code, message=err.message)
            self.metrics.admin_ops(name, err.code).inc()
            return error_frame(op.id, err)
        log.event(
            "admin", "info" if isinstance(op, _AUDITED) else "debug",
            op=name, args=args, peer_uid=peer.uid, peer_pid=peer.pid, result="ok", before=change.before, after=change.after,
            **_fleet_audit(self.control, change),
        )
        self.metrics.admin_ops(name, "ok").inc()
        return AdminReply(op.id, name, result=change.result, before=change.before, after=change.after)


def _fleet_audit(control: Control, change: Change) -> dict[str, Any]:
    """Fleet mode: the audit line names the instance that took the command, and where the change went."""
    if control.fleet is None or not (isinstance(change.result, dict) and "kept" in change.result):
        return {}
    return {"instance": control.fleet[0].instance, "kept": change.result["kept"]}


def _describe(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "frame is nested too deeply"
    text = str(exc).replace("`", "")
    if text.startswith("Invalid value") and text.endswith("$.op"):
        return "unknown admin op " + text.split(" - ")[0].removeprefix("Invalid value ")
    return describe_validation_error(exc)
