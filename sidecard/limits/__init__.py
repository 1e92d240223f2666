"""Traffic control in front of the upstream: spend budgets and the admission queue per target.

The pure rate, concurrency and throttling policies these build on live in `sidecard.policies` (`bucket`,
`concurrency`, `throttle`).
"""
