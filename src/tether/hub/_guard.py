"""Drop connections that never finish a request, and bound how many may be pending.

uvicorn waits forever for the first request on a new connection, so a client that connects
and sends nothing (or half a request line) holds a socket and a protocol object for as long as
it likes. This wraps uvicorn's HTTP protocol: a connection that has not completed a request's
headers (or a WebSocket handshake) within ``handshake_timeout`` is closed, and while
``max_pending`` connections are in that state, new ones are closed at once. Memory stays
bounded and the hub keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["guarded_http_protocol"]

log = logging.getLogger("tether.hub")


def _base_protocol() -> type[Any]:
    try:  # uvicorn's own choice for http="auto"
        import httptools  # noqa: F401  (a dependency: uvicorn parses HTTP with it)
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def guarded_http_protocol(handshake_timeout: float, max_pending: int) -> type[Any]:
    base = _base_protocol()
    pending = 0
    dropped = 0

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _pending = False

        def connection_made(self, transport: Any) -> None:
            nonlocal pending
            super().connection_made(transport)
            if pending >= max_pending:
                transport.close()
                return
            pending += 1
            self._pending = True
            self._timer = asyncio.get_running_loop().call_later(handshake_timeout, self._expire)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # A request has begun (headers complete) or the socket became a WebSocket.
            if self._pending and (
                self.cycle is not None or self.transport.get_protocol() is not self
            ):
                self._settle()

        def connection_lost(self, exc: Exception | None) -> None:
            self._settle()
            super().connection_lost(exc)

        def _settle(self) -> None:
            nonlocal pending
            if self._pending:
                self._pending = False
                pending -= 1
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            nonlocal dropped
            self._timer = None
            if self._pending and not self.transport.is_closing():
                dropped += 1
                if dropped in (1, 10, 100) or dropped % 1000 == 0:
                    log.warning(
                        "dropped %d connections that sent no request within %.1fs",
                        dropped,
                        handshake_timeout,
                    )
                self._settle()
                self.transport.close()

    return GuardedProtocol
