"""The sequential test's figures: requests (and time) to a correct verdict on a 5-point quality difference, the
false-positive rate over 1,000 A/A runs looked at continuously, what a rollout's guard needs, and a verdict's cost.

    .venv/bin/python bench/experiments.py [--runs 1000] [--seed 20] [--alpha 0.05] [--tau 0.2]

Simulated judge scores (`sidecard.experiments.simulate.judge_scores`: most answers about 0.87, a tail of poor
ones about 0.25, two decimals; a standard deviation of about 0.2), split between two arms, the statistics merged
and the test looked at after every batch. Then the same 5-point difference through the real daemon on the
simulator (`--daemon-runs`): an `[[experiments]]` A/B test between two prompt versions, users sticky, the
scores sent as feedback, the daemon's own evaluation deciding it (on virtual time, so the figure is requests
and the CPU they cost, not waiting).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import numpy as np
import trio
from scipy.stats import binomtest, norm
from trio.testing import MockClock

from sidecard.experiments import simulate
from sidecard.experiments.metric import DEFAULT_GUARDS
from sidecard.experiments.stats import Decision, Stats, compare, non_inferior

RATES = (1, 10, 100)  # judged requests per second, for the time to a verdict


def percentile(values: list[int], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def fixed_horizon(effect: float, sd: float, alpha: float, power: float) -> int:
    """Requests (both arms) a fixed-horizon two-sided z-test needs: the price of peeking freely, for comparison."""
    per_arm = 2 * ((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sd / effect) ** 2
    return 2 * int(np.ceil(per_arm))


def five_points(args: argparse.Namespace) -> None:
    good, bad = simulate.judge_scores(0.80), simulate.judge_scores(0.75)
    sd = float(good(np.random.default_rng(0), 200_000).std())
    test = functools.partial(compare, alpha=args.alpha, tau=args.tau, estimate=False, resolution=0.01)
    started = time.perf_counter()
    outcomes = simulate.runs(good, bad, test, count=args.runs, seed=args.seed, horizon=20_000, batch=1)
    spent = time.perf_counter() - started
    right = [o.requests for o in outcomes if o.decision is Decision.WORSE]
    wrong = sum(o.decision is Decision.BETTER for o in outcomes)
    print(f"5-point difference (judge score 0.80 vs 0.75, sd {sd:.3f}), 50/50 split, looked at after every request, "
          f"{args.runs} runs ({spent:.1f} s):")
    print(f"  correct verdict {len(right) / args.runs:.1%}, wrong {wrong / args.runs:.1%}, "
          f"undecided at 20,000 requests {(args.runs - len(right) - wrong) / args.runs:.1%}")
    print(f"  requests to the correct verdict: median {statistics.median(right):.0f}, p90 {percentile(right, 90):.0f}, "
          f"p99 {percentile(right, 99):.0f}")
    for rate in RATES:
        print(f"    at {rate:>3} judged requests/s: median {duration(statistics.median(right) / rate)}, "
              f"p90 {duration(percentile(right, 90) / rate)}")
    print(f"  a fixed-horizon test (no peeking) needs {fixed_horizon(0.05, sd, args.alpha, 0.8)} requests for 80 % "
          f"power, {fixed_horizon(0.05, sd, args.alpha, 0.95)} for 95 %")


def false_positives(args: argparse.Namespace) -> None:
    scores = simulate.judge_scores(0.80)
    test = functools.partial(compare, alpha=args.alpha, tau=args.tau, estimate=False, resolution=0.01)
    for share, horizon, batch in ((0.5, 10_000, 10), (0.01, 200_000, 200)):
        started = time.perf_counter()
        outcomes = simulate.runs(scores, scores, test, count=args.runs, seed=args.seed + 1, horizon=horizon,
                                 batch=batch, share=share)
        spent = time.perf_counter() - started
        hits = sum(o.decision is not Decision.UNDECIDED for o in outcomes)
        low, high = binomtest(hits, args.runs).proportion_ci(0.95)
        print(f"A/A (equal arms, judge score 0.80), {share:.0%} to the treatment, looked at after every {batch} requests "
              f"up to {horizon:,}, {args.runs} runs ({spent:.1f} s):")
        print(f"  false positives {hits} = {hits / args.runs:.1%} (95 % CI {low:.1%} to {high:.1%}); stated alpha "
              f"{args.alpha:.0%}")


def rollout_guard(args: argparse.Namespace) -> None:
    """The default judge-score guard (0.03) at the alpha a default rollout gives each guard at each step."""
    alpha = args.alpha / (len(DEFAULT_GUARDS) * 4)
    margin = next(g.margin for g in DEFAULT_GUARDS if g.metric == "judge_score")
    test = functools.partial(non_inferior, margin=margin, alpha=alpha, tau=args.tau, estimate=False, resolution=0.01)
    stable = simulate.judge_scores(0.80)
    runs = max(50, args.runs // 5)
    print(f"Rollout guard (judge score, margin {margin}, alpha {alpha:.4f} per guard and step), {runs} runs each:")
    for share in (1.0, 50.0):
        for label, candidate, expected in (("equal", stable, Decision.NOT_WORSE),
                                           ("5 points worse", simulate.judge_scores(0.75), Decision.WORSE)):
            outcomes = simulate.runs(stable, candidate, test, count=runs, seed=args.seed + 2, horizon=400_000,
                                     batch=max(10, int(1000 / share)), share=share / 100)
            right = [o.requests for o in outcomes if o.decision is expected]
            print(f"  {label:>14} at {share:>4.0f} %: {expected.value} in {len(right) / runs:.0%} of runs, median "
                  f"{statistics.median(right):,.0f} requests (p90 {percentile(right, 90):,.0f})")


def through_the_daemon(args: argparse.Namespace) -> None:
    """The 5-point difference as an experiment in a real daemon: requests to its verdict, and what they cost."""
    outcomes = [trio.run(_daemon_run, args.seed + run, clock=MockClock(autojump_threshold=0)) for run in range(args.daemon_runs)]
    right = [requests for decision, requests, _ in outcomes if decision == "v1"]
    cpu = sum(spent for _, _, spent in outcomes) / sum(requests for _, requests, _ in outcomes)
    print(f"Through the daemon: experiment v1 (feedback 0.80) against v2 (0.75), alpha {args.alpha}, evaluated every "
          f"second, {args.daemon_runs} runs:")
    print(f"  the right winner in {len(right)}/{args.daemon_runs}; requests to the verdict: median "
          f"{statistics.median(right) if right else float('nan'):.0f} (each with its feedback), "
          f"{cpu * 1e3:.2f} ms of CPU per request and feedback through the daemon and the simulator")


async def _daemon_run(seed: int) -> tuple[str | None, int, float]:
    import random
    import tempfile

    from prometheus_client import CollectorRegistry

    from sidecard.config import from_mapping
    from sidecard.daemon import Daemon
    from sidecard.sim import Simulator
    from sidecard_client.aio import AsyncClient

    rng = np.random.default_rng(seed)
    scores = {1: simulate.judge_scores(0.80), 2: simulate.judge_scores(0.75)}
    with tempfile.TemporaryDirectory(prefix="sc-bench-", dir="/tmp") as tmp:
        for n in (1, 2):
            (Path(tmp) / "prompts" / "ask").mkdir(parents=True, exist_ok=True)
            (Path(tmp) / "prompts" / "ask" / f"v{n}.toml").write_text(
                f'temperature = 0.0\n[variables]\nq = {{}}\n[[messages]]\nrole = "user"\ncontent = "[v{n}] {{q}}"\n')
        (Path(tmp) / "prompts" / "ask" / "release.toml").write_text("stable = 1\n")
        config = from_mapping({
            "server": {"socket": f"{tmp}/app.sock"}, "metrics": {"enabled": False}, "quality": {"enabled": False},
            "state": {"path": f"{tmp}/state.json"}, "prompts": {"directory": f"{tmp}/prompts", "watch": False},
            "log": {"level": "warning", "destination": f"{tmp}/log"}, "rollout": {"evaluate_every_s": 1.0},
            "experiments": [{"name": "five-points", "prompt": "ask", "primary": "feedback_score",
                             "arms": [{"name": "v1", "version": 1}, {"name": "v2", "version": 2}]}],
        }, "<bench>")
        daemon = Daemon(config, simulator=Simulator(seed=seed), registry=CollectorRegistry(), rng=random.Random(seed))
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            started, requests = time.process_time(), 0
            async with AsyncClient(daemon.socket_path) as client:
                while daemon.control.experiments.book.experiments["five-points"].running and requests < 40_000:
                    for _ in range(50):
                        requests += 1
                        reply = await client.complete(prompt="ask", vars={"q": f"q{requests}"}, user=f"user{requests}")
                        score = float(scores[reply.prompt_version](rng, 1)[0])
                        await client.feedback(reply.request_id, score=score)
                    await trio.sleep(1.0)
            spent = time.process_time() - started
            winner = daemon.control.experiments.book.experiments["five-points"].winner
            daemon.shutdown()
    return winner, requests, spent


def verdict_cost() -> None:
    control, treatment = Stats(5000, 0.80, 0.04 * 4999), Stats(5000, 0.79, 0.04 * 4999)
    for estimate in (False, True):
        n = 20_000
        started = time.perf_counter()
        for _ in range(n):
            compare(control, treatment, estimate=estimate)
        print(f"  one verdict {'with' if estimate else 'without'} the samples-needed estimate: "
              f"{(time.perf_counter() - started) / n * 1e6:.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--tau", type=float, default=0.2)
    parser.add_argument("--daemon-runs", type=int, default=5)
    args = parser.parse_args()
    print(f"mSPRT, normal mixture tau = {args.tau} standard deviations, alpha = {args.alpha}\n")
    five_points(args)
    print()
    false_positives(args)
    print()
    rollout_guard(args)
    print()
    through_the_daemon(args)
    print("\nCost:")
    verdict_cost()


if __name__ == "__main__":
    main()
