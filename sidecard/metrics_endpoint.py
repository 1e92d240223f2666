"""The Prometheus scrape endpoint, on loopback by default.

Rendering runs in a worker thread (prometheus-client's collectors take locks and walk every series),
so a scrape never stalls the Trio loop that is serving requests.

Any local process may connect, so what connections hold is bounded: past `MAX_CONNECTIONS`, newcomers wait in
the listen backlog or take the slot of an idle one, and a client that reads nothing of a scrape for
`WRITE_TIMEOUT_S` is cut off. A scraper needs a connection or two; uncapped, a flood of idle connections took
every descriptor the daemon had, and its upstream calls failed.
"""

from __future__ import annotations

from typing import Final

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .httpserver import HttpRequest, Responder, serve_tcp_http

MAX_CONNECTIONS: Final = 64
WRITE_TIMEOUT_S: Final = 10.0


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handle(request: HttpRequest, responder: Responder) -> None:
        if request.method not in ("GET", "HEAD") or request.path not in ("/metrics", "/"):  # HEAD: monitors' probes
            await responder.send(404, [("content-type", "text/plain")], b"not found: try /metrics\n")
            return
        body = await trio.to_thread.run_sync(generate_latest, registry)
        await responder.send(200, [("content-type", CONTENT_TYPE_LATEST)], body)

    await serve_tcp_http(
        handle, host, port, max_connections=MAX_CONNECTIONS, write_timeout_s=WRITE_TIMEOUT_S, task_status=task_status
    )
