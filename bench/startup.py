"""How long `sidecard serve` takes to be ready, and how fast a bad config fails.

    .venv/bin/python bench/startup.py [--runs N]

Ready is the `started` log line: the daemon logs it once its sockets listen (systemd gets READY=1 then). Each
figure is the median of N runs, from the process's start, interpreter start included:
  - serve, first-party targets only (the fast path: the anthropic SDK is never imported);
  - serve with a Bedrock target (the SDK path is imported before ready);
  - serve cold: the first start after an install, every module compiled afresh (an empty bytecode cache);
  - `check-config` on a good file, and `serve` with a bad one (which must fail as fast).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
FIRST_PARTY = '[routes.default]\ntargets = [{ model = "claude-sonnet-4-6" }]\n'
BEDROCK = '[routes.default]\ntargets = [{ model = "claude-sonnet-4-6", provider = "bedrock", region = "us-east-1" }]\n'


def write_config(directory: Path, routes: str) -> Path:
    path = directory / "sidecard.toml"
    path.write_text(f'[server]\nsocket = "{directory}/app.sock"\n[metrics]\nenabled = false\n'
                    f'[state]\npath = "{directory}/state.json"\n[prompts]\nwatch = false\n' + routes)
    return path


def time_to_ready(config: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen([BIN / "sidecard", "serve", "--config", str(config)], env=env, cwd=config.parent,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            if '"event":"started"' in line:
                return time.perf_counter() - started
        raise SystemExit(f"bench: the daemon exited without starting ({config})")
    finally:
        proc.terminate()
        proc.wait()


def time_to_exit(*args: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([BIN / "sidecard", *args], env=env, capture_output=True, check=False)
    return time.perf_counter() - started


def median_ms(measure, runs: int) -> str:
    values = [measure() * 1000 for _ in range(runs)]
    return f"{statistics.median(values):6.0f} ms   (min {min(values):.0f}, max {max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    env = {**os.environ, "ANTHROPIC_API_KEY": "bench-key-not-secret"}
    env.pop("PYTHONPYCACHEPREFIX", None)
    print(f"sidecard start-up (median of {runs} runs, interpreter start included)\n")
    with tempfile.TemporaryDirectory(prefix="scs-", dir="/tmp") as tmp:
        first_party, bedrock = Path(tmp) / "fast", Path(tmp) / "bedrock"
        first_party.mkdir()
        bedrock.mkdir()
        good, with_sdk = write_config(first_party, FIRST_PARTY), write_config(bedrock, BEDROCK)
        bad = Path(tmp) / "bad.toml"
        bad.write_text("[server]\nsocket_mode = 'rw'\n")
        time_to_ready(good, env)  # warm the page cache and the bytecode cache
        print(f"serve, ready (first-party targets)  {median_ms(lambda: time_to_ready(good, env), runs)}")
        print(f"serve, ready (a Bedrock target)     {median_ms(lambda: time_to_ready(with_sdk, env), runs)}")

        def cold() -> float:
            with tempfile.TemporaryDirectory(prefix="scs-pyc-", dir="/tmp") as empty:
                return time_to_ready(good, {**env, "PYTHONPYCACHEPREFIX": empty})

        print(f"serve, ready, cold (no bytecode)    {median_ms(cold, runs)}")
        print(f"check-config, a good file           {median_ms(lambda: time_to_exit('check-config', str(good), env=env), runs)}")
        print(f"serve, a bad config (exit 2)        {median_ms(lambda: time_to_exit('serve', '--config', str(bad), env=env), runs)}")


if __name__ == "__main__":
    main()
