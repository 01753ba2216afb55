"""A TCP proxy for fault tests: forwards loopback connections, and can stop forwarding
without closing anything, the way a network partition looks to both ends."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._frozen = threading.Event()  # existing connections stop forwarding, stay open
        self._frozen_upto = 0
        self._refusing = False  # while partitioned, new connections are closed at once
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.close()
            return
        self.connections += 1
        generation = self.connections
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pump(reader, up_writer, generation), self._pump(up_reader, writer, generation)
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                # A partition swallows what crosses it: nothing arrives, nothing is closed.
                if self._frozen.is_set() and generation <= self._frozen_upto:
                    continue
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    def partition(self) -> None:
        """Connections open now stop forwarding for good (without a FIN or RST); new ones are
        closed at once until :meth:`heal`."""
        self._frozen_upto = self.connections
        self._frozen.set()
        self._refusing = True

    def heal(self) -> None:
        """New connections are forwarded again (the frozen ones stay frozen)."""
        self._refusing = False

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in self._writers:
                writer.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@contextlib.contextmanager
def proxy_to(port: int) -> Iterator[Proxy]:
    proxy = Proxy(port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
