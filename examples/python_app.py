#!/usr/bin/env python3
"""A tiny app on sidecard: ask a question, stream the answer, and fall back to the app's non-AI path when the
AI cannot answer.

    make run                                                  # terminal 1: the daemon (simulated upstream)
    .venv/bin/python examples/python_app.py "How do I reset my password?"      # terminal 2

Options: --feature NAME (default help-center; sidecard's per-feature settings and kill switches use it).
The socket is $SIDECARD_SOCKET, else the daemon's default. Exit status 0 whenever the user got an answer,
from the AI or from the fallback path; 1 only for a bug in the request (a BadRequest).
"""

from __future__ import annotations

import argparse
import sys

from sidecard_client import AIDisabled, BadRequest, Client, ConnectionLost, PartialAnswer, SidecardError, Unavailable

HELP_PAGES = "https://example.com/help"


def non_ai_answer(why: str, retry_after_ms: int | None = None) -> None:
    """What the app does without AI: say so plainly and point to the help pages."""
    later = f" Try again in {retry_after_ms / 1000:g} s." if retry_after_ms else ""
    print(f"The assistant is unavailable right now ({why}).{later}")
    print(f"Meanwhile, our help pages: {HELP_PAGES}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="*", default=["How do I reset my password?"])
    parser.add_argument("--feature", default="help-center")
    args = parser.parse_args(argv)
    question = " ".join(args.question)
    print(f"Q: {question}")
    answering = False  # "A: " and the first piece of the answer are on screen
    try:
        with Client(timeout=30) as sidecard:
            for frame in sidecard.stream(
                [{"role": "user", "content": question}],
                system="You are the help-center assistant. Answer briefly.",
                feature=args.feature,
                deadline_ms=20_000,
                max_tokens=300,
            ):
                if frame["event"] == "delta" and frame["type"] == "text":
                    print(frame["text"] if answering else f"A: {frame['text']}", end="", flush=True)
                    answering = True
                elif frame["event"] == "done":
                    print("" if answering else f"A: {frame['text']}")
                    if frame["degraded"]:
                        # sidecard's static fallback (an operator's or the config's text): shown, but the app
                        # switches to its non-AI behaviour as well.
                        print("[degraded: this is our standard answer, not the assistant's]")
                        print(f"More help: {HELP_PAGES}")
                    else:
                        print(f"[answered by {frame['served_by']['model']}, first token after {frame['ttft_ms']:.0f} ms]")
    except SidecardError as exc:
        if answering:
            print()  # end the line of text that did arrive
        if isinstance(exc, PartialAnswer):
            print(f"[the answer was cut short ({exc.code}): the text above is incomplete]")
            print(f"More help: {HELP_PAGES}")
        elif isinstance(exc, AIDisabled):
            print(f"The assistant is switched off for now ({exc.message}).")
            print(f"Our help pages: {HELP_PAGES}")
        elif isinstance(exc, (Unavailable, ConnectionLost)):
            non_ai_answer(exc.code, exc.retry_after_ms)
        elif isinstance(exc, BadRequest):
            print(f"bug: sidecard refused the request: {exc}", file=sys.stderr)
            return 1
        else:  # rate limited, overloaded, deadline exceeded, client-side timeout: the non-AI answer too
            non_ai_answer(exc.code, exc.retry_after_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
