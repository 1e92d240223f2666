"""Command-line output into a pipe the reader closed (`sidecardctl --json limits | head`): a quiet exit.

Python ignores SIGPIPE, so the write raises BrokenPipeError, and its traceback (or an "Exception ignored" line
when stdout is flushed at exit) lands on the operator's terminal. Not restoring SIGPIPE instead: a closed
socket must stay an error the command reports, not a silent death.

Both commands (`sidecard`, `sidecardctl`) import this module already, so the exit statuses they share (`sidecard
eval`'s too) are kept here, at no import cost.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Final, ParamSpec, TypeVar

EXIT_CLOSED_PIPE: Final = 141  # 128 + SIGPIPE: what a Unix tool stopped by a closed pipe reports
EXIT_USAGE: Final = 2  # bad usage: the command line, or a file it names, is wrong (argparse's own code too)
EXIT_UNREACHABLE: Final = 3  # the daemon cannot be reached: a script tells it from bad usage (2) and a refusal (1)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def quiet_on_closed_pipe(main: Callable[_P, _R]) -> Callable[_P, _R]:
    """Wrap a command's `main`: output that cannot be written ends it with status 141 and no message."""

    @functools.wraps(main)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            try:
                return main(*args, **kwargs)
            finally:
                sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught (also after sys.exit)
        except BrokenPipeError:
            # Whatever is still buffered would fail again at exit: stdout goes nowhere from now on.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            sys.exit(EXIT_CLOSED_PIPE)

    return run
