"""sidecardctl's text views of what the admin socket returns (pure rendering)."""

from sidecard.ctl import render_jobs

JOBS = {"jobs": {"succeeded": 3}, "oldest_pending_s": None, "at_risk": 0, "batches_in_flight": 0, "jobs_in_batches": 0}


def test_small_costs_and_savings_show_their_digits_not_zero_cents():
    """Three small batch answers saved $0.000293: the view said "saved $0.00" (a fresh-clone trial)."""
    text = render_jobs({**JOBS, "batch_cost_usd": 0.000293, "savings_usd": 0.000293})
    assert "batch cost $0.000293, saved $0.000293 against interactive" in text
    assert "saved $1,234.50" in render_jobs({**JOBS, "batch_cost_usd": 0.0, "savings_usd": 1234.5})
    assert "batch cost $0.00, saved <$0.000001" in render_jobs({**JOBS, "batch_cost_usd": 0.0, "savings_usd": 1e-9})
