"""docs/playbook.md is run during incidents: every command in it must parse, every alert and panel it names must exist."""

import json
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import msgspec
import trio

from sidecard import ctl
from sidecard.config import Target, target_problem
from tests.harness import admin, connect

ROOT = Path(__file__).parents[2]
PLAYBOOK = (ROOT / "docs" / "playbook.md").read_text()


def ctl_commands() -> list[str]:
    """`sidecardctl ...` in inline code, and lines of shell blocks that start with it (their comments cut)."""
    found = re.findall(r"`(sidecardctl [^`]+)`", PLAYBOOK)
    for block in re.findall(r"```sh\n(.*?)```", PLAYBOOK, re.DOTALL):
        found += [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("sidecardctl ")]
    return found


def test_every_sidecardctl_command_in_the_playbook_parses():
    commands = ctl_commands()
    assert len(commands) >= 20 and any("--target bedrock:" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)[1:]
        frame = ctl._frame(ctl._parser().parse_args(argv))  # SystemExit on a bad command or target
        assert frame["op"], command
        for target in frame.get("targets", []):
            # What the daemon will accept: no timeout of 0, no Bedrock target without its region.
            assert target_problem(msgspec.convert(target, Target)) is None, command


def test_every_alert_the_playbook_names_is_defined():
    defined = set(re.findall(r"- alert: (\w+)", (ROOT / "deploy" / "alerts.yml").read_text()))
    named = set(re.findall(r"\bSidecard[A-Z]\w+", PLAYBOOK))
    assert named and named <= defined, named - defined


def test_every_grafana_panel_the_playbook_names_exists():
    titles = {p["title"] for p in json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())["panels"]}
    named = [title for line in PLAYBOOK.splitlines() if "Grafana" in line for title in re.findall(r'"([^"]+)" (?:and|panels)', line)]
    assert named and set(named) <= titles, set(named) - titles


# ---------------------------------------------------------------------- run, as an operator would

PROMPT = "support-reply"
BAD = "[[sim:say:I'm sorry, but I can't help with that request.]]"  # what the bad release answers
QUALITY = {
    "enabled": True, "sample_rate": 1.0, "canary_sample_rate": 1.0,
    "monitor": {"window": 10, "min_samples": 5, "baseline": 0.9, "threshold": 0.6, "max_drop": 0.1, "hysteresis": 0.05},
    "prompts": {PROMPT: {"fallback_route_on_alert": "safe"}},
}
ROUTES = {
    "default": {"targets": [{"model": "claude-sonnet-4-6"}, {"model": "claude-haiku-4-5-20251001"}]},
    "judge": {"targets": [{"model": "claude-haiku-4-5-20251001"}]},
    "safe": {"targets": [{"model": "claude-opus-4-6"}]},
}


def playbook_steps() -> list[tuple[str, list[str], list[str]]]:
    """docs/playbook.md in order, as (what, commands, undos): each shell line, each mitigation row with its undo
    column, then the closing check."""
    steps, in_shell = [], False
    for line in PLAYBOOK.splitlines():
        if line.startswith("```"):
            in_shell = line == "```sh"
        elif in_shell and (command := line.split("  #")[0].strip()) and not command.startswith("#"):
            steps.append((command, [command], []))
        elif line.startswith("| ") and "`sidecardctl " in line:
            situation, command, undo = (cell.strip() for cell in line.strip().strip("|").split(" | "))
            steps.append((situation, *(re.findall(r"`(sidecardctl [^`]+)`", cell) for cell in (command, undo))))
    closing = re.search(r"Verify with (.*?), and watch", PLAYBOOK, re.S).group(1)
    steps.append(("verify", re.findall(r"`(sidecardctl [^`]+)`", closing), []))
    return steps


class Operator:
    """Runs the playbook's text in bash on this host's `sidecardctl` and `sidecard`, pointed at the test daemon by the
    environment an operator's shell would have. `journalctl` reads the daemon's log, and the review log's path is
    the test's. The mock clock stands still meanwhile: a command takes real time, and a kill switch `--for 2h`
    must not expire while it runs."""

    def __init__(self, d, clock, capture_log, tmp: Path) -> None:
        self.d, self.clock, self.log, self.tmp = d, clock, capture_log, tmp
        shim = tmp / "bin"
        shim.mkdir()
        (shim / "journalctl").write_text(f'#!/bin/sh\ncat "{tmp}/journal"\n')
        (shim / "journalctl").chmod(0o755)
        self.env = {
            **os.environ, "PATH": f"{Path(sys.executable).parent}:{shim}:{os.environ['PATH']}",
            "SIDECARD_SOCKET": d.socket_path, "SIDECARD_ADMIN_SOCKET": d.admin_socket_path,
        }
        self.ran: list[str] = []

    async def run(self, command: str) -> str:
        (self.tmp / "journal").write_text(self.log.text)
        script = command.replace("/var/lib/sidecard/review.jsonl", str(self.tmp / "review.jsonl"))
        threshold, self.clock.autojump_threshold = self.clock.autojump_threshold, math.inf
        try:
            done = await trio.run_process(["bash", "-o", "pipefail", "-c", script], capture_stdout=True,
                                          capture_stderr=True, check=False, cwd=ROOT, env=self.env)
        finally:
            self.clock.autojump_threshold = threshold
        self.ran.append(command)
        out = done.stdout.decode()
        allowed = (0, 1) if command.startswith("sidecard eval") else (0,)  # eval: 1 is a verdict (regressed)
        assert done.returncode in allowed, f"{command}\n{out}{done.stderr.decode()}"
        assert "Traceback" not in done.stderr.decode(), command
        return out


async def test_every_playbook_command_works_as_written_against_a_live_daemon(
    daemon_factory, sim, capture_log, short_tmp, autojump_clock
):
    prompts = Path(short_tmp) / "prompts"
    shutil.copytree(ROOT / "prompts", prompts)  # the shipped prompts: support-reply v1 stable, v2 a 10% canary
    d = await daemon_factory(prompts={"directory": str(prompts)}, routes=ROUTES,
                             quality={**QUALITY, "review_log": f"{short_tmp}/review.jsonl"})
    client = await connect(d)
    # Before the incident: v2 was promoted to everyone. Then its answers go bad; the monitor switches the
    # prompt to its fallback route.
    assert (await admin(d, {"op": "prompt.promote", "prompt": PROMPT}))["after"]["stable"] == 2
    for n in range(100):
        if d.control.remedies.switches.active():
            break
        reply = await client.call({"op": "complete", "prompt": PROMPT, "vars": {"question": f"{BAD} {n}"}, "user": f"u{n}"})
        assert reply["ok"] and reply["prompt_version"] == 2
        await trio.sleep(0.2)  # the judge's verdict, before the next answer
    assert d.control.remedies.switches.active() and d.control.remedies.firing_on(PROMPT, 2)

    operator = Operator(d, autojump_clock, capture_log, Path(short_tmp))
    for what, commands, undos in playbook_steps():
        outputs = [await operator.run(command) for command in commands]
        if what.startswith("journalctl"):
            assert '"prompt":"support-reply"' in outputs[0]
        if what.startswith("tail -n 50"):
            assert '"scores"' in outputs[0]
        for undo in undos:
            await operator.run(undo)
        status = d.status()
        assert status["kills"] == [], what  # each undo removed what its move put in place
        assert not any(route["overridden"] for route in status["routes"].values()), what
        assert status["prompts"][PROMPT]["stable"] in (1, 2) and status["prompts"][PROMPT]["canary"] is None, what
    # The undo handed the prompt back to release.toml (v1 stable, v2 a 10% canary), but v2's alert still fires:
    # it stays stopped rather than coming back to the users the monitor took it from.
    assert d.status()["prompts"][PROMPT] == {**d.status()["prompts"][PROMPT], "stable": 1, "canary": None}
    assert set(ctl_commands()) <= set(operator.ran)  # every command the playbook names was run


def _subcommands(parser) -> dict[str, object]:
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return dict(actions[0].choices) if actions else {}


def test_every_sidecardctl_command_the_docs_name_exists():
    """Synopses (`sidecardctl kill [SCOPE] ...`) need not parse, but the command they name must exist."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {m for doc in texts for m in re.findall(r"(?<![\w-])sidecardctl((?: (?:--json|[a-z][a-z-]*))+)", doc.read_text())}
    assert len(named) > 20
    for words in named:
        parser = ctl._parser()
        for word in (w for w in words.split() if w != "--json"):
            choices = _subcommands(parser)
            if not choices:
                break
            assert word in choices, f"sidecardctl{words}: no command {word!r}"
            parser = choices[word]
