"""The cheap quality checks' cost per answer, in process, one core: a typical answer and a huge one.

    .venv/bin/python bench/quality_checks.py

Every answer sampled for quality runs these checks (quality/checks.py) off the request path. Figures are the
median of several timed runs; they are for comparing one change with another in the same run, never a test.
"""

from __future__ import annotations

import statistics
import time

from sidecard.quality.checks import Sample, run_checks

QUESTION = "How do I reset my password?"
GOOD = "Open Settings, then Security, then choose Reset password. You will get an email with a link."


def sample(answer: str, question: str = QUESTION) -> Sample:
    return Sample(feature="support", model="claude-sonnet-4-6", prompt="support-reply", version=1, canary=False,
                  question=question, system="You are helpful.", answer=answer, stop_reason="end_turn",
                  output_problem=None, language="en")


def per_call_s(item: Sample, calls: int, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            run_checks(item)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main() -> None:
    typical = sample(GOOD * 3)
    huge = sample(" ".join(f"word{i}" for i in range(200_000)), question="lorem ipsum dolor " * 60_000)
    print(f"typical answer ({len(typical.answer)} chars): {per_call_s(typical, 2000) * 1e6:.1f} µs per answer")
    print(f"huge answer ({len(huge.answer) // 1000} KB, question {len(huge.question) // 1000} KB): "
          f"{per_call_s(huge, 1, runs=3) * 1e3:.1f} ms per answer")


if __name__ == "__main__":
    main()
