"""docs/playbook.md is run during incidents: every command in it must parse, every alert and panel it names must exist."""

import json
import re
import shlex
from pathlib import Path

import msgspec

from sidecard import ctl
from sidecard.config import Target, target_problem

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
