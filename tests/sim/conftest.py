"""The simulator served on a free port (`url`, for the module's own `sim` fixture) and an SDK client on it."""

import anthropic
import pytest
import trio

from sidecard.sim import Simulator, serve_sim


@pytest.fixture
async def url(nursery: trio.Nursery, sim: Simulator) -> str:
    return await nursery.start(serve_sim, sim)


@pytest.fixture
async def client(url: str):
    client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0, open_telemetry=False)
    yield client
    await client.close()
