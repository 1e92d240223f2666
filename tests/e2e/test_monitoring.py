"""The monitoring kit in deploy/ uses only metrics (and labels) the daemon exports, and is valid PromQL.

Names come from the daemon's own registry rendered as Prometheus text, as a scrape of /metrics returns it.
A few names are allowed without being exported, each for a stated reason (FUTURE, EXTERNAL); an allowance is
removed as soon as the daemon exports the name.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sidecard.observe.metrics import Metrics

DEPLOY = Path(__file__).parents[2] / "deploy"

# Metrics a feature in progress will export, with these exact names and labels; the rules and panels that use
# them stay silent until then. None at present.
FUTURE: dict[str, set[str]] = {}
# Not sidecard's: Prometheus's own `up`, and node_exporter's systemd collector
# (--collector.systemd --collector.systemd.enable-restarts-metrics).
EXTERNAL: dict[str, set[str]] = {
    "up": set(),
    "node_systemd_service_restart_total": {"name"},
    "node_systemd_unit_state": {"name", "state", "type"},
}
TARGET_LABELS = {"job", "instance"}  # attached by Prometheus to every scraped series

METRIC = re.compile(r"\b(?:sidecard|node)_[a-z0-9_]+\b|\bup(?=\{)")
SELECTOR = re.compile(r"\b((?:sidecard|node)_[a-z0-9_]+|up)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported() -> dict[str, set[str]]:
    """Every sample name the daemon can export, with its label names."""
    metrics = Metrics(CollectorRegistry())
    text = generate_latest(metrics.registry).decode()
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    labels: dict[str, set[str]] = {}
    for attribute in vars(metrics).values():
        metric = getattr(attribute, "metric", attribute)
        if hasattr(metric, "_labelnames"):
            labels[metric._name] = set(metric._labelnames)
    names: dict[str, set[str]] = {}
    for name, kind in families.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        own = labels.get(base, labels.get(name, set()))
        if kind == "counter":
            samples = [f"{base}_total", f"{base}_created"]
        elif kind == "histogram":
            samples = [f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"]
            names[f"{base}_bucket"] = own | {"le"}
        else:
            samples = [name]
        for sample in samples:
            names.setdefault(sample, set(own))
    return names


def alert_text() -> str:
    return (DEPLOY / "alerts.yml").read_text()


def alert_exprs() -> list[str]:
    """The `expr:` of every rule (single line or a `|` block)."""
    exprs, lines = [], alert_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("expr:"):
            continue
        value = stripped.removeprefix("expr:").strip()
        if value == "|":
            indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) < indent:
                    break
                block.append(following.strip())
            value = " ".join(block)
        exprs.append(value)
    return exprs


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v.get("definition")]
    return exprs


def used_names() -> dict[str, set[str]]:
    """Metric name -> where it is used."""
    used: dict[str, set[str]] = {}
    rules = "\n".join(line for line in alert_text().splitlines() if not line.lstrip().startswith("#"))
    for name in METRIC.findall(rules):
        used.setdefault(name, set()).add("alerts.yml")
    for expr in dashboard_exprs():
        for name in METRIC.findall(expr):
            used.setdefault(name, set()).add("grafana-dashboard.json")
    return used


def test_every_metric_in_the_alerts_and_the_dashboard_is_exported_by_the_daemon():
    names = exported()
    assert "sidecard_requests_total" in names and "sidecard_request_duration_seconds_bucket" in names  # sanity
    unknown = {
        name: where for name, where in used_names().items() if name not in names and name not in FUTURE and name not in EXTERNAL
    }
    assert not unknown, f"not exported by the daemon: {unknown}"


def test_the_allowed_exceptions_are_all_still_needed():
    used = used_names()
    names = exported()
    for name in FUTURE:
        assert name in used, f"{name} is listed as a future metric but nothing uses it"
        assert name not in names, f"{name} is exported now: remove it from FUTURE"
    for name in EXTERNAL:
        assert name in used, f"{name} is listed as external but nothing uses it"
        assert name not in names


def test_label_matchers_and_groupings_name_real_labels():
    names = exported()
    known = {**{n: l | TARGET_LABELS for n, l in names.items()}, **{n: l | TARGET_LABELS for n, l in {**FUTURE, **EXTERNAL}.items()}}
    problems = []
    for source, exprs in (("alerts.yml", alert_exprs()), ("grafana-dashboard.json", dashboard_exprs())):
        for expr in exprs:
            expr = expr.replace("$__rate_interval", "5m")
            for name, matchers in SELECTOR.findall(expr):
                for label in MATCHER.findall(matchers):
                    if label not in known.get(name, set()):
                        problems.append(f"{source}: {name} has no label {label!r}: {expr}")
            in_scope = set().union(*(known.get(n, set()) for n in METRIC.findall(expr))) | {"le"}
            for grouping in GROUPING.findall(expr):
                for label in filter(None, (g.strip() for g in grouping.split(","))):
                    if label not in in_scope:
                        problems.append(f"{source}: grouping by {label!r}, which no metric here has: {expr}")
    assert not problems, "\n".join(problems)


def test_every_alert_has_a_severity_and_a_summary():
    text = alert_text()
    alerts = re.findall(r"- alert: (\w+)", text)
    assert len(alerts) == len(set(alerts)) >= 10
    assert len(alert_exprs()) == len(alerts)
    assert text.count("severity:") == len(alerts) and text.count("summary:") == len(alerts)
    wanted = {"SidecardBreakerOpen", "SidecardHighFallbackRate", "SidecardHighErrorRate", "SidecardQualityAlertFiring",
              "SidecardBudgetNearLimit", "SidecardShedding", "SidecardRestartedBySystemd"}
    assert wanted <= set(alerts)


def test_every_alert_rule_has_a_unit_test_that_fires_it():
    """promtool runs deploy/alerts_test.yml; this keeps it complete: each rule's expression, `for` and annotations
    are exercised by at least one case where the alert fires."""
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", (DEPLOY / "alerts_test.yml").read_text()))
    alerts = set(re.findall(r"- alert: (\w+)", alert_text()))
    assert alerts - fired == set() and fired <= alerts


def test_the_dashboard_is_well_formed():
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] and board["title"] == "sidecard"
    for p in board["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("requests", "time", "cost", "cache", "breaker", "quality"):
        assert topic in titles, topic


# ---------------------------------------------------------------------- promtool

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: apt install prometheus)")


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@needs_promtool
def test_promtool_check_rules():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_config_as_installed(tmp_path):
    shutil.copy(DEPLOY / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "sidecard-alerts.yml")  # the name prometheus.yml loads
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    exprs = [e for e in dashboard_exprs() if not e.startswith("label_values(")]
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        expr = expr.replace("$__rate_interval", "5m").replace('"$instance"', '".*"')
        rules += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    (tmp_path / "dashboard-rules.yml").write_text("\n".join(rules) + "\n")
    result = promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
