"""Coalesce what one event-loop callback writes to a connection into one system call.

uvicorn writes an HTTP answer in two calls (its head, then its body) and every WebSocket frame
in a call of its own, each one a ``send`` to the kernel that also wakes the reader on the other
end. :class:`CorkedTransport` wraps a connection's transport: writes made during one callback
are joined and written once, by a callback scheduled right after it. Nothing waits longer than
the current turn of the loop; closing (or half-closing) writes what is pending first, and an
HTTP handler that has sent its whole answer writes it at once with :func:`flush_answer`.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

__all__ = ["CorkedTransport", "corked_protocol", "flush_answer"]

# The transport of the connection whose data is being read: the request handler's task, which
# uvicorn starts from that read, inherits it.
_READING: contextvars.ContextVar[CorkedTransport | None] = contextvars.ContextVar(
    "tether_corked_transport", default=None
)


def flush_answer() -> None:
    """Write what the current request's handler wrote so far (its whole answer) now, rather
    than at the end of the loop's turn."""
    transport = _READING.get()
    if transport is not None:
        transport.flush()


class CorkedTransport:
    """A transport whose writes leave together at the end of the current loop callback."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        # Everything else (reading, flow control, extra info, protocol switching) is the
        # real transport's.
        return getattr(self._transport, name)


def corked_protocol(base: type[Any]) -> type[Any]:
    """``base`` (a uvicorn HTTP protocol class) writing through a :class:`CorkedTransport`;
    a connection upgraded to a WebSocket keeps it."""

    class CorkedProtocol(base):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(CorkedTransport(transport))

        def data_received(self, data: bytes) -> None:
            token = _READING.set(self.transport)
            try:
                super().data_received(data)
            finally:
                _READING.reset(token)

    return CorkedProtocol
