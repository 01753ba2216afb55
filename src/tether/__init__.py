"""Tether: a task runner whose workers never miss a heartbeat.

The public API, loaded lazily: ``from tether import Tether`` imports only the standard
library, so user task modules load inside isolated subinterpreters. ``Client`` and
``AsyncClient`` (httpx) are imported on first use.
"""

from __future__ import annotations

from .app import FunctionSpec, Task, Tether
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

_LAZY = {"AsyncClient", "AsyncRunHandle", "Client", "RunHandle"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
