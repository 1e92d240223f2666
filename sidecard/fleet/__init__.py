"""Fleet mode: the sidecars of one app share operator state, limits, budgets, cache and quality windows in a
Redis or Valkey store (issue 19). The key layout, scripts and failure semantics are described below as they land.
"""
