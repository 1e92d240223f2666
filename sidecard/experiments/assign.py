"""Sticky assignment of users to an experiment's arms, by weight.

Weighted rendezvous hashing: each (arm, user) pair hashes to a uniform u in (0, 1), and the user goes to the
arm with the smallest -ln(u) / weight. That is a race of exponential clocks, so an arm wins a share of users
exactly proportional to its weight, and it needs no state:

- raising an arm's weight only moves users to it, lowering it only moves users away from it (every other
  user stays where they were), as with `policies/canary.py`'s growing slices;
- adding an arm only takes users from the others; removing one only moves its own users.

The experiment's name salts the hash, so each experiment splits users independently of the others. A request
without a user cannot be sticky: it gets an arm from the injected random source, by the same weights.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

_BITS = 53  # a double's mantissa: (k + 0.5) / 2**53 is exact, and never 0 or 1


def assign(salt: str, key: str | None, arms: Sequence[tuple[str, float]], rng: random.Random) -> str:
    """The arm for KEY (a user), or a random one by weight when there is no key."""
    if key is None:
        return unsticky(arms, rng)
    return sticky(salt, key, arms)


def sticky(salt: str, key: str, arms: Sequence[tuple[str, float]]) -> str:
    _check(arms)
    best, best_score = "", math.inf
    for name, weight in arms:
        if weight <= 0:
            continue
        score = -math.log(_uniform(salt, name, key)) / weight
        if score < best_score:
            best, best_score = name, score
    return best


def unsticky(arms: Sequence[tuple[str, float]], rng: random.Random) -> str:
    _check(arms)
    names, weights = zip(*arms)
    return rng.choices(names, weights=weights)[0]


def _uniform(salt: str, arm: str, key: str) -> float:
    """A uniform value in (0, 1), never 0 or 1, from the three strings (each length-prefixed: no ambiguity)."""
    digest = hashlib.blake2b(digest_size=8, person=b"sc-experiment")
    for part in (salt, arm, key):
        raw = part.encode()
        digest.update(len(raw).to_bytes(4, "big"))
        digest.update(raw)
    return ((int.from_bytes(digest.digest(), "big") >> (64 - _BITS)) + 0.5) / 2**_BITS


def _check(arms: Sequence[tuple[str, float]]) -> None:
    if not arms or any(weight < 0 or not math.isfinite(weight) for _, weight in arms):
        raise ValueError("arms need finite weights of at least 0")
    if not any(weight > 0 for _, weight in arms):
        raise ValueError("at least one arm needs a weight above 0")
