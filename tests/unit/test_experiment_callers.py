"""A request the daemon stopped, as the experiment book sees it: not the arm's failure."""

from __future__ import annotations


def test_a_request_the_daemon_stopped_says_nothing_about_the_arm_that_served_it():
    """A request cut at the drain's end is `shutting_down` (STOPPED): like a `cancelled` one it says nothing about
    its arm (else every deploy charged the requests it cut, the slower arm's most, to that arm's error_rate)."""
    from types import SimpleNamespace

    from sidecard.engine import STOPPED
    from tests.unit.test_experiment_book import PROMPT, book

    kept = book(PROMPT)
    plan = SimpleNamespace(experiment="tone", arm="a", prompt="echo", version=None, rollout=None)
    trace = SimpleNamespace(plan=plan, internal=False, job=None)
    kept(SimpleNamespace(trace=trace, counting=False, error=STOPPED, completion=None, latency_s=30.0))
    assert kept.tallies["tone"].get("a", "error_rate").n == 0
