"""Experiments and feedback: the pure cores the engine, control layer and faces plug into.

- `stats`: the always-valid sequential test (mSPRT) on mergeable per-arm statistics.
- `metric`: the metrics compared (direction, kind, resolution), guards on them, and the mergeable `Tally`.
- `assign`: sticky, weighted assignment of users to arms.
- `experiment`: an A/B(/n) experiment as a frozen value; evaluating and stopping it.
- `rollout`: the progressive-rollout state machine (serialisable, so it survives restarts).
- `feedback`: the record of issued requests and the validation of feedback on them.
- `review`: the human review queue's sampling and its SQLite store (the package's only I/O).
- `shadow`: which requests to mirror within a budget, and the paired comparison of the answers.
- `simulate`: simulated experiments, for planning and for checking the test's error rates.

Nothing here imports the rest of sidecard; `now` and random sources are injected.
"""
