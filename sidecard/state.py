"""Operator state that must survive a restart: kill switches, route overrides, prompt overrides.

Written atomically on every change (temp file, fsync, rename, fsync of the directory), mode 0600. A state
file that cannot be read is moved aside and reported loudly; the daemon then starts from its config alone.
Times on disk are wall-clock; in memory they are the daemon's monotonic clock.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final, Union

import msgspec

from .config import Target
from .killswitch import KillSwitch, Mode

FORMAT: Final = 1


class StoredKill(msgspec.Struct, kw_only=True):
    scope: str
    mode: Mode
    text: Union[str, None] = None
    reason: Union[str, None] = None
    expires_at: Union[float, None] = None  # unix time
    set_at: float = 0.0  # unix time


class StoredPrompt(msgspec.Struct, kw_only=True):
    stable: Union[int, None] = None
    canary: Union[int, None] = None
    canary_percent: Union[float, None] = None
    canary_cleared: bool = False
    history: list[int] = []


class State(msgspec.Struct, kw_only=True):
    format: int = FORMAT
    # Salt of the user-key pseudonyms: stable across restarts, so per-user spend and limits carry over.
    salt: str = ""
    kills: list[StoredKill] = []
    routes: dict[str, list[list[Target]]] = {}
    prompts: dict[str, StoredPrompt] = {}


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(State)


def kill_to_disk(kill: KillSwitch, shift: float) -> StoredKill:
    """`shift` = wall clock minus daemon clock."""
    return StoredKill(
        scope=kill.scope, mode=kill.mode, text=kill.text, reason=kill.reason,
        expires_at=None if kill.expires_at is None else kill.expires_at + shift, set_at=kill.set_at + shift,
    )


def kill_from_disk(stored: StoredKill, shift: float) -> KillSwitch:
    return KillSwitch(
        scope=stored.scope, mode=stored.mode, text=stored.text, reason=stored.reason,
        expires_at=None if stored.expires_at is None else stored.expires_at - shift, set_at=stored.set_at - shift,
    )


class CorruptState(Exception):
    def __init__(self, reason: str, moved_to: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.moved_to = moved_to


class StateFile:
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def load(self) -> State:
        """The saved state, an empty one if there is none; raises `CorruptState` after moving a bad file aside."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise CorruptState(f"unreadable: {exc.strerror}", self._move_aside()) from None
        try:
            state = _decoder.decode(data)
        except msgspec.MsgspecError as exc:
            raise CorruptState(str(exc), self._move_aside()) from None
        if state.format != FORMAT:
            raise CorruptState(f"unknown format {state.format}", self._move_aside())
        return state

    def save(self, state: State) -> None:
        """Atomically replace the file (call from a worker thread: it fsyncs)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                view = memoryview(_encoder.encode(state))
                while view:  # os.write may write less than asked
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _move_aside(self) -> str:
        moved = f"{self.path}.corrupt-{int(time.time())}"
        try:
            os.replace(self.path, moved)
        except OSError:
            return "(could not be moved)"
        return moved
