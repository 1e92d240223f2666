"""sidecardctl's text views of what the admin socket returns (pure rendering)."""

from sidecard.ctl import render_jobs

JOBS = {"jobs": {"succeeded": 3}, "oldest_pending_s": None, "at_risk": 0, "batches_in_flight": 0, "jobs_in_batches": 0}


def test_small_costs_and_savings_show_their_digits_not_zero_cents():
    """Three small batch answers saved $0.000293: the view said "saved $0.00" (a fresh-clone trial)."""
    text = render_jobs({**JOBS, "batch_cost_usd": 0.000293, "savings_usd": 0.000293})
    assert "batch cost $0.000293, saved $0.000293 against interactive" in text
    assert "saved $1,234.50" in render_jobs({**JOBS, "batch_cost_usd": 0.0, "savings_usd": 1234.5})
    assert "batch cost $0.00, saved <$0.000001" in render_jobs({**JOBS, "batch_cost_usd": 0.0, "savings_usd": 1e-9})


def test_a_change_shows_what_changed_and_a_result_a_line_a_key():
    """A second fresh-clone trial: `rollout pause`, `experiment start` and `reload` printed the whole state before
    and after, and their result, as one JSON line of about a kilobyte each."""
    from sidecard.ctl import render

    before = {"prompt": "support-reply", "state": "running", "step": 2, "percent": 5.0, "history": [1]}
    after = {**before, "state": "paused", "history": [1, 2]}
    assert render({"op": "rollout.control", "ok": True, "before": before, "after": after}).splitlines() == [
        "rollout.control: done", '  state: "running" -> "paused"', "  history: [1] -> [1, 2]"]
    assert render({"op": "kill", "ok": True, "before": None, "after": {"scope": "global"}}).splitlines() == [
        "kill: done", "  before: null", '  after:  {"scope": "global"}']
    assert render({"op": "reload", "ok": True, "result": {"changed": ["routes"], "note": "reloaded"}}).splitlines() == [
        "reload: done", '  changed: ["routes"]', "  note: reloaded"]
