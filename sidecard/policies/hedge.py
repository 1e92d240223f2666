"""Hedging: when a slow attempt is raced against the next target of its route (pure).

A target with `hedge_after_ms` that is not the route's last is hedged: if its attempt has not finished after that
delay, the same request starts on the next target, and the first success wins. A hedge costs a second call, so it
draws on the retry budget like a retry, and a request's worst-case cost counts both targets at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Hedgeable(Protocol):
    @property
    def hedge_after_ms(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Hedge:
    partner: int  # the index of the target raced against the slow one
    after_s: float  # how long the slow one has before the partner starts


def hedge_for(targets: Sequence[Hedgeable], index: int) -> Hedge | None:
    """The hedge of the attempt on `targets[index]`, or None when it is not hedged."""
    delay_ms = targets[index].hedge_after_ms
    if not delay_ms or index + 1 >= len(targets):
        return None
    return Hedge(index + 1, delay_ms / 1000)
