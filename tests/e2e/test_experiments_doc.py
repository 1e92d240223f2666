"""docs/experiments.md as an operator and an app developer use it: its config loads into a running daemon, its
Python example runs, its HTTP example posts, and every sidecardctl command in it works, in the order written."""

import contextlib
import io
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import msgspec
import trio

from sidecard import ctl
from tests.e2e.test_hostile import http_exchange, post
from tests.harness import connect

ROOT = Path(__file__).parents[2]
DOC = (ROOT / "docs" / "experiments.md").read_text()


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC, re.DOTALL)


async def sidecardctl(d, line: str) -> str:
    argv = ["--socket", d.admin_socket_path, *shlex.split(line)[1:]]
    out = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(out):
            try:
                ctl.main(argv)
            except SystemExit as exit:
                assert not exit.code, f"{line}: exit {exit.code}\n{out.getvalue()}"

    await trio.to_thread.run_sync(run)
    return out.getvalue()


async def test_the_experiments_guide_works_as_written(daemon_factory, short_tmp, monkeypatch):
    (config,) = blocks("toml")
    sections = tomllib.loads(config)
    sections["review"].update(path=f"{short_tmp}/review.db", rate=1.0)  # this host's path; every answer reviewed
    prompts = Path(short_tmp) / "prompts"
    shutil.copytree(ROOT / "prompts", prompts)
    shutil.copy(prompts / "support-reply" / "v2.toml", prompts / "support-reply" / "v3.toml")  # the version rolled out
    d = await daemon_factory(**sections, prompts={"directory": str(prompts)},
                             quality={"enabled": True, "sample_rate": 0.0, "canary_sample_rate": 0.0})

    (example,) = blocks("python")
    monkeypatch.setenv("SIDECARD_SOCKET", d.socket_path)
    printed = io.StringIO()

    def app() -> None:
        with contextlib.redirect_stdout(printed):
            exec(compile(example, "docs/experiments.md", "exec"), {})

    await trio.to_thread.run_sync(app)
    assert printed.getvalue() == "duplicate_feedback\n"

    client = await connect(d)
    answer = await client.complete("[[sim:say:The Pro plan has 5 seats.]] how many seats?", feature="chat")
    ran = []
    for line in (line for block in blocks("sh") for line in block.splitlines() if line.strip()):
        if line.startswith("curl "):
            body = re.search(r"-d '(.*)'", line).group(1).replace("REQUEST_ID", answer["request_id"])
            status, _, reply = await http_exchange(d.config.http.socket, post(body.encode(), path=b"/v1/feedback"))
            assert status == 200 and msgspec.json.decode(reply)["kind"] == "thumbs", reply
            continue
        if line.startswith("sidecardctl review"):
            with trio.fail_after(10):  # the queue is written from a thread
                while (await trio.to_thread.run_sync(lambda: d.control.review.store.counts()))["pending"] < 1:
                    await trio.sleep(0.01)
        ran.append((line, await sidecardctl(d, line)))
    outputs = dict(ran)
    assert "experiment reply-tone: prompt versions of support-reply" in outputs["sidecardctl experiment status reply-tone"]
    assert "rollout of support-reply: v3 against v2" in outputs["sidecardctl rollout status support-reply"]
    assert "state: \"running\" -> \"aborted\"" in outputs["sidecardctl rollout abort route:default"]
    assert "shadow haiku-triage" in outputs["sidecardctl shadow status"]
    assert "QUESTION (redacted)" in outputs["sidecardctl review show 1"]
    assert d.status()["prompts"]["support-reply"]["stable"] == 2  # promoted, then the rollout of v3 aborted
