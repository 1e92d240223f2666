"""Traffic control in front of the upstream: spend budgets and the admission queue per target.

The pure rate and concurrency policies these build on live in `sidecard.policies` (`bucket`, `concurrency`).
"""
