"""Tether: a task runner whose workers never miss a heartbeat.

The public API, loaded lazily: ``from tether import Tether`` imports only the standard
library, so user task modules load inside isolated subinterpreters. The application classes
are imported on first use (a unit's shim needs only the exceptions), ``Client`` and
``AsyncClient`` (httpx) too.
"""

from __future__ import annotations

from .exceptions import (
    ClientError,
    ConfigError,
    HubError,
    HubUnavailable,
    IsolationError,
    ProtocolError,
    Reject,
    RunNotFound,
    StoreError,
    TaskCancelled,
    TaskError,
    TetherError,
    WaitTimeout,
)

TYPE_CHECKING = False  # typing is not imported: see tether.app
if TYPE_CHECKING:
    from typing import Any

    from .app import FunctionSpec, Task, Tether
    from .client import AsyncClient, AsyncRunHandle, Client, RunHandle

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncRunHandle",
    "Client",
    "ClientError",
    "ConfigError",
    "FunctionSpec",
    "HubError",
    "HubUnavailable",
    "IsolationError",
    "ProtocolError",
    "Reject",
    "RunHandle",
    "RunNotFound",
    "StoreError",
    "Task",
    "TaskCancelled",
    "TaskError",
    "Tether",
    "TetherError",
    "WaitTimeout",
    "__version__",
]

# Loaded on first use: the client needs httpx, and a unit importing tether._step (the isolation
# shim) should not pay for the application classes unless its task module uses them.
_LAZY = {
    "FunctionSpec": "app",
    "Task": "app",
    "Tether": "app",
    "AsyncClient": "client",
    "AsyncRunHandle": "client",
    "Client": "client",
    "RunHandle": "client",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    if where == "app":
        from . import app as module
    else:
        from . import client as module  # type: ignore[no-redef]
    value = getattr(module, name)
    globals()[name] = value  # once: later lookups find it without this function
    return value
