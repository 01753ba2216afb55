"""The :class:`Hub`: wires the store, the scheduler and the ASGI app onto uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from ..exceptions import ConfigError
from ._cork import corked_protocol
from ._guard import guarded_http_protocol
from .app import create_app
from .scheduler import HubTimings, Scheduler
from .storage import StoreThread
from .store import open_store

__all__ = ["Hub"]

log = logging.getLogger("tether.hub")

MAX_PENDING_CONNECTIONS = 1024  # connections that have not finished a request yet
# uvloop where it exists (a dependency except on Windows): a third less CPU per message.
# Only `Hub.run` picks the loop; `Hub.running` serves on the caller's loop, whatever it is.
_LOOP = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Hub:
    """A Tether hub. Every keyword maps one-to-one to a ``[server]`` setting.

    ``store`` is a URL (``sqlite:///path/to/file.db``); by default a SQLite file under
    ``data_dir``. Without a token the hub only binds to loopback addresses.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 7878,
        data_dir: str | os.PathLike[str] = ".tether",
        store: str | None = None,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        lease: float = 30.0,
        handshake_timeout: float = 10.0,
        max_message_bytes: int = 16 * 1024 * 1024,
        token: str | None = None,
        runner_token: str | None = None,
        fsync: bool = False,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("TLS needs both tls_cert and tls_key (--tls-cert and --tls-key)")
        for what, path in (("tls_cert", tls_cert), ("tls_key", tls_key)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{what}: no such file {path!r}")
        if heartbeat_timeout <= heartbeat_interval:
            raise ConfigError(
                f"heartbeat_timeout ({heartbeat_timeout}s) must be longer than"
                f" heartbeat_interval ({heartbeat_interval}s)"
            )
        if not token and not runner_token and not _is_loopback(host):
            raise ConfigError(
                f"refusing to bind {host} without a token: set --token (or TETHER_TOKEN),"
                " or bind 127.0.0.1"
            )
        self.host = host
        self.port = port
        self.data_dir = os.fspath(data_dir)
        self.store_url = store or os.path.join(self.data_dir, "tether.db")
        self.timings = HubTimings(
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            lease=lease,
            handshake_timeout=handshake_timeout,
            max_message_bytes=max_message_bytes,
        )
        self.producer_tokens = tuple(t for t in (token,) if t)
        # A runner may present the runner token or the (more powerful) producer token.
        self.runner_tokens = tuple(t for t in (runner_token, token) if t)
        self.fsync = fsync
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.scheduler: Scheduler | None = None
        self._server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def _build(self) -> Any:
        store = open_store(self.store_url)
        if self.fsync and hasattr(store, "fsync"):
            store.fsync = True
        storage = StoreThread(store)
        scheduler = Scheduler(storage, self.timings)
        self.scheduler = scheduler

        async def lifespan() -> AsyncIterator[None]:
            await asyncio.to_thread(storage.start)
            try:
                await scheduler.recover()
                # Everything loaded so far (modules, recovered runs) lives as long as the hub:
                # out of the collector's sight, a full collection no longer walks it (which
                # took milliseconds, a pause every few hundred runs).
                gc.freeze()
                task = asyncio.get_running_loop().create_task(scheduler.serve())
                log.info("hub serving on %s (store %s)", self.url, self.store_url)
                if not self.producer_tokens and not self.runner_tokens:
                    log.info("no token set: accepting unauthenticated clients on loopback only")
                try:
                    yield
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            finally:
                await asyncio.to_thread(storage.stop)

        return create_app(
            scheduler,
            producer_tokens=self.producer_tokens,
            runner_tokens=self.runner_tokens,
            lifespan=lifespan,
        )

    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self._build(),
            host=self.host,
            port=self.port,
            ws="websockets-sansio",
            loop=_LOOP,
            http=corked_protocol(
                guarded_http_protocol(self.timings.handshake_timeout, MAX_PENDING_CONNECTIONS)
            ),
            ws_max_size=self.timings.max_message_bytes,
            ws_ping_interval=None,  # liveness is our own heartbeat, measured by the hub
            ws_ping_timeout=None,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            ssl_certfile=self.tls_cert,
            ssl_keyfile=self.tls_key,
        )

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (uvicorn installs the handlers)."""
        self._server = uvicorn.Server(self._config())
        # uvicorn re-raises the signal that stopped it once it has shut down, to the handler
        # that was installed before it ran. A clean shutdown is exit status 0, so that handler
        # does nothing.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        self._server.run()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve in the background of the current event loop (tests, benchmarks); yields the
        base URL with the real port when ``port=0``."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(self._config())
        server.config.setup_event_loop = lambda: None  # type: ignore[method-assign]
        self._server = server
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("hub stopped during start-up")
                await asyncio.sleep(0.005)
            yield self.url
        finally:
            server.should_exit = True
            await task
            sock.close()
