"""The experiment loop in the daemon: the pure cores of `experiments/` wired to the engine, faces and control.

- `feedback`: the desk that remembers every answer sidecard gave (an accounting sink) and takes feedback on it
  from either face, counts it, and passes it on to the quality monitor and the experiments.
- `experiments`: experiments in force, the arm each request is served by (read by the planner), the tally of
  each arm's values (an accounting sink and feedback), and the evaluation that decides and stops them.
"""
