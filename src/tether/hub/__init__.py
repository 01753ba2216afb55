"""The hub: the coordinator runners connect to and producers submit to.

:class:`Hub` serves the HTTP API and the runner WebSocket endpoint on one port (Starlette on
uvicorn), keeps runs in a store (SQLite by default), and dispatches them to runners.
The hub never imports the runner package.
"""

from __future__ import annotations

from .scheduler import HubTimings
from .server import Hub

__all__ = ["Hub", "HubTimings"]
