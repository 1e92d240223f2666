"""docs/usage.md and docs/tracing.md as an operator follows them: their config on a live daemon, their commands
run as written, every metric, alert, panel and span attribute they name real."""

from __future__ import annotations

import calendar
import contextlib
import io
import json
import re
import shlex
import tomllib
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, generate_latest

from sidecard import ctl
from sidecard.observe.metrics import Metrics
from sidecard.tracing import attributes
from sidecard.usage import report
from tests.harness import connect
from tests.tracing.receiver import serve_receiver

ROOT = Path(__file__).parents[2]
USAGE, TRACING = (ROOT / "docs" / "usage.md").read_text(), (ROOT / "docs" / "tracing.md").read_text()


def blocks(text: str, kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", text, re.DOTALL)


def commands(text: str) -> list[str]:
    return [line.split("  #")[0].strip() for block in blocks(text, "sh") for line in block.splitlines() if line.strip()]


def run_ctl(argv: list[str]) -> str:
    """`sidecardctl ARGV`'s standard output; fails on any exit status but 0."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            ctl.main(argv)
        except SystemExit as exit:
            assert exit.code in (0, None), (argv, exit.code)
    return out.getvalue()


async def test_the_usage_guide_works_as_written(daemon_factory, sim, short_tmp, autojump_clock):
    sections = tomllib.loads(blocks(USAGE, "toml")[0])
    sections["usage"]["path"] = f"{short_tmp}/usage.sqlite3"
    sections["anomaly"]["path"] = f"{short_tmp}/anomaly.json"
    d = await daemon_factory(**sections)
    client = await connect(d)
    for i in range(3):
        assert (await client.complete(f"q{i}", feature="search", user="alice@example.com"))["ok"]
    await d.usage_writer.flush()
    ran = commands(USAGE)
    assert len(ran) >= 7 and all(c.startswith("sidecardctl ") for c in ran)
    for command in ran:  # in-process (a subprocess each would cost seconds), with the shell's `> FILE`
        argv = shlex.split(command.replace("/tmp/spend.png", f"{short_tmp}/spend.png"))[1:]
        target = argv[argv.index(">") + 1] if ">" in argv else None
        argv = argv[: argv.index(">")] if target else argv
        out = await trio.to_thread.run_sync(run_ctl, ["--socket", d.admin_socket_path, *argv])
        if target:
            (Path(short_tmp) / target).write_text(out)
    assert (Path(short_tmp) / "spend-by-model.csv").read_text().startswith("period,period_start,key,")
    assert (Path(short_tmp) / "spend.png").read_bytes().startswith(b"\x89PNG")


def test_the_usage_guides_table_is_the_reports_own_layout():
    shown = re.search(r"```\n(day .*?)```", USAGE, re.DOTALL).group(1)
    day = calendar.timegm((2026, 12, 2, 0, 0, 0))
    rows = [report.UsageRow(day, "search", 1204, 96320, 48160, 0, 0, 0.6278, 0.041, 2),
            report.UsageRow(day, "chat", 310, 24800, 12400, 0, 0, 0.1604, 0.0, 3)]
    assert report.table(rows, "feature", "day") == shown.rstrip("\n")


def test_every_metric_alert_panel_and_attribute_the_guides_name_exists():
    exported = set(re.findall(r"^# TYPE (\S+)", generate_latest(Metrics(CollectorRegistry()).registry).decode(), re.M))
    for doc in (USAGE, TRACING):
        named = set(re.findall(r"\bsidecard_[a-z_]+[a-z]\b", doc))
        assert named and named <= exported | {f"{n}_total" for n in exported}, named - exported
        alerts = set(re.findall(r"- alert: (\w+)", (ROOT / "deploy" / "alerts.yml").read_text()))
        assert set(re.findall(r"\bSidecard[A-Z]\w+", doc)) <= alerts
        titles = {p["title"] for p in json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())["panels"]}
        assert set(re.findall(r'"([A-Z][^"]+)" panel', doc)) <= titles
    known = {v for k, v in vars(attributes).items() if k.isupper() and isinstance(v, str)}
    documented = set(re.findall(r"`((?:gen_ai|sidecard|error)\.[a-z_.]+)`", TRACING.split("## What a trace shows")[1]))
    span_names = {"sidecard.render", "sidecard.cache", "sidecard.guardrails"}
    assert len(documented) > 25 and documented - span_names <= known, documented - known


async def test_the_tracing_guide_works_as_written(daemon_factory, sim, nursery, capture_log):
    receiver = await serve_receiver(nursery)
    sections = tomllib.loads(blocks(TRACING, "toml")[0])
    assert sections["tracing"]["endpoint"] == "http://127.0.0.1:4318/v1/traces"
    sections["tracing"]["endpoint"] = receiver.url
    d = await daemon_factory(**sections)
    client = await connect(d)
    frame = json.loads(blocks(TRACING, "json")[0])
    reply = await client.call(frame)
    await trio.to_thread.run_sync(d.recorder.flush)
    trace_id = frame["traceparent"].split("-")[1]
    assert reply["ok"] and reply["trace_id"] == trace_id == capture_log.events("request")[0]["trace_id"]
    [request] = receiver.by_name(f"chat {reply['served_by']['model']}")[:1]
    assert request.parent_span_id == frame["traceparent"].split("-")[2] and request.attributes["sidecard.feature"] == "search"
    assert receiver.headers[0]["authorization"] == "Bearer collector-token"
    assert "collector-token" not in capture_log.text
    collector = blocks(TRACING, "yaml")[0]
    assert "endpoint: 127.0.0.1:4318" in collector and "protocols:\n      http:" in collector
