"""Durations as people write them: `90s`, `15m`, `2h`, `1d` or plain seconds.

One spelling for a job's `by` (jobs/submit) and sidecardctl's DURATION arguments (`--for`, `--last`, a target's
`timeout=`); standard library only, so the command-line client imports it at no cost.
"""

from __future__ import annotations

import re
from typing import Final

_DURATION: Final = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def duration_seconds(text: str) -> float | None:
    """The seconds TEXT spells, or None if it is no duration. A sign is kept, for the caller to refuse in its own
    words (a job's deadline has passed; sidecardctl's duration must be positive)."""
    match = _DURATION.fullmatch(text)
    return None if match is None else float(match[1]) * _UNITS[match[2]]
