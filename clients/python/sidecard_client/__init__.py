"""A dependency-free (stdlib only) client for the sidecard daemon.

    from sidecard_client import Client
    with Client() as sc:
        reply = sc.complete([{"role": "user", "content": "Hello"}], feature="greeting")
        print(reply.text)

Async jobs (docs/jobs.md): `submit` hands sidecard a request to answer by a deadline (cheaper, in a Message
Batch, when the deadline allows), `job` polls it, `wait` waits for it; `verify_webhook` checks a job's webhook.

One `Client` holds one connection and may be shared by many threads: requests are pipelined over it and
replies matched by id.

`AsyncClient` (in `sidecard_client.aio`) is the same API for asyncio and Trio; it needs `anyio`, imported
only when `AsyncClient` is first used.
"""

from ._client import AdminClient, Client, Completion, Usage, default_admin_socket_path, default_socket_path
from ._errors import (
    AIDisabled,
    BadRequest,
    BudgetExceeded,
    CacheMiss,
    InvalidOutput,
    PartialAnswer,
    ConnectionLost,
    DeadlineExceeded,
    FeedbackRefused,
    InvalidRequest,
    JobNotFound,
    Overloaded,
    RateLimited,
    SidecardError,
    Timeout,
    Unavailable,
    UpstreamAuthError,
    OutputBlocked,
    PolicyRefused,
    Forbidden,
)
from .webhook import InvalidWebhook, verify_webhook

__all__ = [
    "AdminClient",
    "AIDisabled",
    "BadRequest",
    "BudgetExceeded",
    "CacheMiss",
    "InvalidOutput",
    "InvalidWebhook",
    "PartialAnswer",
    "Client",
    "Completion",
    "ConnectionLost",
    "DeadlineExceeded",
    "FeedbackRefused",
    "InvalidRequest",
    "JobNotFound",
    "Overloaded",
    "RateLimited",
    "SidecardError",
    "Timeout",
    "Unavailable",
    "UpstreamAuthError",
    "OutputBlocked",
    "PolicyRefused",
    "Forbidden",
    "Usage",
    "default_admin_socket_path",
    "default_socket_path",
    "verify_webhook",
]


# `AsyncClient` is imported on first use (PEP 562), and kept out of `__all__`, so that neither
# `import sidecard_client` nor `from sidecard_client import *` needs anyio.
def __getattr__(name: str):
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
