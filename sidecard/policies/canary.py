"""Sticky canary selection.

A key (the request's `user`) hashes to a bucket in [0, 10000); the key is in the canary when its bucket is
below the percentage. Raising the percentage only adds buckets, so users already in the canary stay there.
The prompt name salts the hash, so each prompt's canary reaches a different slice of users.
"""

from __future__ import annotations

import hashlib

BUCKETS = 10_000


def bucket(salt: str, key: str) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"sc-canary", salt=_salt_bytes(salt)).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def in_canary(salt: str, key: str, percent: float) -> bool:
    return bucket(salt, key) < percent * (BUCKETS // 100)


def _salt_bytes(salt: str) -> bytes:
    # blake2b takes at most 16 bytes of salt: a longer name is hashed down whole, so two prompts that share
    # their first 16 characters still get different slices (shorter names keep their buckets).
    raw = salt.encode()
    return raw if len(raw) <= 16 else hashlib.blake2b(raw, digest_size=16).digest()
