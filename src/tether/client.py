"""Producer-side clients: submit runs to a hub and read their results, over httpx.

:class:`BaseClient` holds everything but the sending: request building, argument checks,
response interpretation. :class:`Client` and :class:`AsyncClient` only send (the httpx
pattern). httpx errors are translated here, where they enter: callers see
:class:`~tether.exceptions.HubUnavailable`, :class:`~tether.exceptions.HubError`,
:class:`~tether.exceptions.TaskError` and friends, never an httpx exception.

Requests go through httpx, but not through its default transport (httpcore and h11, pure
Python HTTP/1.1, most of a request's CPU time in a producer): :class:`_Transport` and
:class:`_AsyncTransport` speak HTTP/1.1 over keep-alive sockets themselves, which is all a hub
needs. When a proxy from the environment applies to the hub, httpx's own transport is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any, Self

import httpx

from .app import DEFAULT_HUB
from .exceptions import (
    HubError,
    HubUnavailable,
    RunNotFound,
    TaskCancelled,
    TaskError,
    WaitTimeout,
)

__all__ = ["AsyncClient", "AsyncRunHandle", "Client", "RunHandle"]

_LONG_POLL = 30.0  # seconds per wait request; longer waits are several requests
# How long call()'s submit waits for the run before it goes on with wait requests. Short: a
# submit whose answer is lost (a proxy that cuts idle connections) leaves the caller without
# the run's id, and a retry would run it twice.
_CALL_WAIT = 5.0
# AsyncClient: submit requests in flight at once. A submit made while this many are out waits
# for one of them to come back, and goes with every other submit that waited meanwhile in one
# batch request: concurrent submits cost a request per round trip, not one each.
_SUBMITS_IN_FLIGHT = 2
_Waiting = tuple[dict[str, Any], asyncio.Future[str]]  # a submit's body, and its caller's future


def _check_json(function: str, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """TypeError naming the first argument that JSON cannot carry."""
    try:
        json.dumps([args, kwargs], allow_nan=False)
        return  # the common case: one encoding, not one per argument
    except (TypeError, ValueError, RecursionError):
        pass
    for where, value in [*((f"argument {i}", a) for i, a in enumerate(args)),
                         *((f"keyword argument {k!r}", v) for k, v in kwargs.items())]:  # fmt: skip
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{where} of {function} ({type(value).__name__}) cannot be sent as JSON: {exc}"
            ) from None


class BaseClient:
    def __init__(
        self,
        hub: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        ca: str | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.hub = (hub or os.environ.get("TETHER_HUB") or DEFAULT_HUB).rstrip("/")
        self.token = token if token is not None else os.environ.get("TETHER_TOKEN") or None
        self.timeout = timeout
        ca = ca or os.environ.get("TETHER_CA") or None
        # ``ca``: a CA bundle to trust for an https hub (a private CA, a self-signed hub).
        self.verify = ssl.create_default_context(cafile=ca) if ca else verify
        # What every request the client writes itself starts with (see _raw_request).
        url = httpx.URL(self.hub)
        self._origin = _origin(url)
        self._prefix = url.raw_path.rstrip(b"/")
        raw_host = url.raw_host.decode("ascii")  # IDNA-encoded, as httpx sends it
        host = f"[{raw_host}]" if ":" in raw_host else raw_host
        if url.port is not None:
            host = f"{host}:{url.port}"
        lines = [f"Host: {host}", "Accept: */*", "Connection: keep-alive",
                 f"User-Agent: tether-client/{httpx.__version__}"]  # fmt: skip
        lines += [f"{name}: {value}" for name, value in self._headers().items()]
        self._fixed_headers = ("\r\n".join(lines) + "\r\n").encode("latin-1")

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def _raw_request(self, method: str, path: str, options: dict[str, Any]) -> bytes | None:
        """The bytes of a request the client can write itself (the same bytes httpx would
        write, less its bookkeeping), or None to leave it to httpx."""
        if not _PLAIN_PATH.issuperset(path) or not set(options) <= {"json", "params", "timeout"}:
            return None
        target = self._prefix + path.encode()
        params = options.get("params")
        if params:
            target += b"?" + urllib.parse.urlencode(params).encode()
        head = method.encode() + b" " + target + b" HTTP/1.1\r\n" + self._fixed_headers
        if "json" not in options:
            return head + b"\r\n"
        body = json.dumps(options["json"], ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()  # fmt: skip
        return (head + b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip

    def _run_body(
        self,
        function: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        *,
        queue: str | None = None,
        delay: float | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        kwargs = kwargs or {}
        _check_json(function, args, kwargs)
        body: dict[str, Any] = {"function": function, "args": list(args), "kwargs": kwargs}
        if queue is not None:
            body["queue"] = queue
        if delay is not None:
            body["delay"] = delay
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return body

    def _answer(self, response: httpx.Response, *, run_id: str | None = None) -> Any:
        if response.status_code < 400:
            return response.json()
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        if response.status_code == 404 and run_id is not None:
            raise RunNotFound(404, message)
        raise HubError(response.status_code, message)

    def _call_options(
        self, function: str, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """A submit that the hub answers once the run finished (or a long poll passed)."""
        return {
            "json": self._run_body(function, args, kwargs),
            "params": {"wait": f"{_CALL_WAIT:.3f}"},
            "timeout": _CALL_WAIT + self.timeout,
        }

    def _wait_params(self, deadline: float | None) -> dict[str, str]:
        remaining = _LONG_POLL if deadline is None else max(0.0, deadline - time.monotonic())
        return {"timeout": f"{min(remaining, _LONG_POLL):.3f}"}

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _done(view: dict[str, Any]) -> bool:
        return view["state"] in ("succeeded", "failed", "cancelled")

    @staticmethod
    def _outcome(view: dict[str, Any]) -> Any:
        if view["state"] == "succeeded":
            return view.get("result")
        error = view.get("error") or {}
        cls = TaskCancelled if view["state"] == "cancelled" else TaskError
        raise cls(
            error.get("type", "Cancelled" if cls is TaskCancelled else "Error"),
            error.get("message", f"run {view['id']} was {view['state']}"),
            error.get("traceback", ""),
            run_id=view["id"],
        )


# -- HTTP/1.1 for the hub ----------------------------------------------------------------------

_MAX_HEAD = 64 * 1024
_IDLE_CONNECTIONS = 32
_NO_BODY = frozenset({204, 304})


class _Response:
    """Reads one HTTP/1.1 response from bytes fed to it as they arrive."""

    __slots__ = ("buffer", "status", "headers", "keep_alive", "_length", "_chunked", "body",
                 "_head_only")  # fmt: skip

    def __init__(self, *, head_only: bool = False) -> None:
        self.buffer = bytearray()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self._length: int | None = None  # None: until the connection closes
        self._chunked = False
        self.body = b""
        self._head_only = head_only

    def feed(self, data: bytes) -> bool:
        """Add ``data``; True once the response is complete."""
        self.buffer += data
        return self._parse()

    def eof(self) -> bool:
        """The connection closed: True if that completes the response."""
        if self.status and self._length is None and not self._chunked:
            self.body, self.keep_alive = bytes(self.buffer), False
            return True
        return False

    def _parse(self) -> bool:
        while not self.status:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    raise httpx.RemoteProtocolError("response head too large")
                return False
            head = bytes(self.buffer[:end]).split(b"\r\n")
            del self.buffer[: end + 4]
            version, _, rest = head[0].partition(b" ")
            try:
                status = int(rest[:3])
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad status line {head[0][:60]!r}") from None
            headers = []
            for line in head[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    raise httpx.RemoteProtocolError(f"bad header line {line[:60]!r}")
                headers.append((name.strip(), value.strip()))
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            connection = b""
            for name, value in headers:
                lowered = name.lower()
                if lowered == b"content-length":
                    self._length = _number(value, 10, "Content-Length")
                elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
                    self._chunked = True
                elif lowered == b"connection":
                    connection = value.lower()
            self.status, self.headers = status, headers  # only once the head made sense
            self.keep_alive = (
                connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
            )
            if self._head_only or status in _NO_BODY:
                self._length, self._chunked = 0, False
            elif self._chunked:
                self._length = None
                self.headers = [(n, v) for n, v in headers if n.lower() != b"transfer-encoding"]
        if self._chunked:
            return self._dechunk()
        if self._length is not None and len(self.buffer) >= self._length:
            self.body = bytes(self.buffer[: self._length])
            return True
        return False

    def _dechunk(self) -> bool:
        body = bytearray()
        at = 0
        buffer = self.buffer
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                return False
            size = _number(bytes(buffer[at:line_end]).split(b";")[0], 16, "chunk size")
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0 and buffer[line_end : line_end + 4] != b"\r\n\r\n":
                    return False
                self.body = bytes(body)
                return True
            start = line_end + 2
            if len(buffer) < start + size + 2:
                return False
            body += buffer[start : start + size]
            at = start + size + 2


def _number(text: bytes, base: int, what: str) -> int:
    try:
        value = int(text, base)
    except ValueError:
        value = -1
    if value < 0:
        raise httpx.RemoteProtocolError(f"bad {what} {text[:40]!r}")
    return value


def _request_head(request: httpx.Request, body: bytes) -> bytes:
    lines = [request.method.encode("ascii") + b" " + request.url.raw_path + b" HTTP/1.1"]
    has_length = False
    for name, value in request.headers.raw:
        lowered = name.lower()
        if lowered == b"accept-encoding":
            continue  # answers come uncompressed: nothing to undo
        has_length |= lowered == b"content-length"
        lines.append(name + b": " + value)
    if body and not has_length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _TLS:
    """The TLS context for https connections, made on first use and kept: making one loads the
    CA bundle (tens of milliseconds)."""

    def __init__(self, verify: ssl.SSLContext | bool) -> None:
        self.verify = verify
        self._context = verify if isinstance(verify, ssl.SSLContext) else None

    def context(self, scheme: str) -> ssl.SSLContext | None:
        if scheme != "https":
            return None
        if self._context is None:
            self._context = httpx.create_ssl_context(self.verify)
        return self._context


def _proxied(hub: str) -> bool:
    """Does a proxy from the environment apply to ``hub`` (so that httpx must handle it)?"""
    url = httpx.URL(hub)
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.host)


type _Origin = tuple[str, str, int]  # scheme, host, port


def _origin(url: httpx.URL) -> _Origin:
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


def _answer_of(response: _Response) -> httpx.Response:
    return httpx.Response(response.status, headers=response.headers, content=response.body,
                          extensions={"http_version": b"HTTP/1.1"})  # fmt: skip


class _Connection:
    __slots__ = ("sock", "origin")

    def __init__(self, sock: socket.socket, origin: _Origin) -> None:
        self.sock = sock
        self.origin = origin

    def dropped(self) -> bool:
        """Closed by the hub while idle (a keep-alive timeout), or with stray bytes."""
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


class _Transport(httpx.BaseTransport):
    """HTTP/1.1 over keep-alive sockets, for a blocking :class:`Client`."""

    def __init__(self, verify: ssl.SSLContext | bool) -> None:
        self._tls = _TLS(verify)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self, origin: _Origin, timeout: float | None) -> _Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.origin == origin and not conn.dropped():
                    return conn
                conn.sock.close()
        try:
            sock = socket.create_connection(origin[1:], timeout=timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = self._tls.context(origin[0])
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_hostname=origin[1])
            except OSError as exc:
                sock.close()
                raise httpx.ConnectError(str(exc)) from exc
        return _Connection(sock, origin)

    def fetch(
        self, origin: _Origin, data: bytes, timeout: float | None, *, head_only: bool = False
    ) -> _Response:
        """Send one request (its bytes) and read the answer."""
        conn = self._connect(origin, timeout)
        response = _Response(head_only=head_only)
        sock = conn.sock
        try:
            sock.settimeout(timeout)
            sock.sendall(data)
            while True:
                chunk = sock.recv(262144)
                if not chunk:
                    if response.eof():
                        break
                    raise httpx.RemoteProtocolError("the hub closed the connection mid-answer")
                if response.feed(chunk):
                    break
        except TimeoutError as exc:
            sock.close()
            raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            sock.close()
            raise httpx.ReadError(str(exc)) from exc
        except BaseException:
            sock.close()
            raise
        kept = False
        if response.keep_alive:
            with self._lock:
                if not self._closed and len(self._idle) < _IDLE_CONNECTIONS:
                    self._idle.append(conn)
                    kept = True
        if not kept:
            sock.close()
        return response

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {}).get("read")
        body = request.read()
        data = _request_head(request, body) + body
        return _answer_of(self.fetch(_origin(request.url), data, timeout,
                                     head_only=request.method == "HEAD"))  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._closed = True  # a request still in flight closes its connection after
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.sock.close()


class _AsyncConnection(asyncio.Protocol):
    """One keep-alive connection on an asyncio loop: bytes in, one response at a time out."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.response: _Response | None = None
        self.done: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        response, done = self.response, self.done
        if response is None or done is None or done.done():
            self.close()  # bytes nobody asked for: never reuse this connection
            return
        try:
            complete = response.feed(data)
        except httpx.HTTPError as exc:
            done.set_exception(exc)
            return
        if complete:
            done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response, done = self.response, self.done
        if response is not None and done is not None and not done.done():
            if response.eof():
                done.set_result(None)
            else:
                done.set_exception(httpx.ReadError("the hub closed the connection mid-answer"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is closed already
                self.transport.close()

    async def exchange(self, data: bytes, response: _Response, timeout: float | None) -> None:
        assert self.transport is not None
        self.response = response
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            async with asyncio.timeout(timeout):
                await self.done
        finally:
            self.response = self.done = None


class _AsyncTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over keep-alive connections, for :class:`AsyncClient` on asyncio. On any other
    event loop (trio) it hands requests to httpx's own transport."""

    def __init__(self, verify: ssl.SSLContext | bool) -> None:
        self._tls = _TLS(verify)
        self._idle: list[_AsyncConnection] = []
        self._fallback: httpx.AsyncHTTPTransport | None = None
        self._closed = False

    async def _connect(self, origin: _Origin, timeout: float | None) -> _AsyncConnection:
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()
            if conn.origin == origin and not conn.closed and conn.loop is loop:
                return conn
            conn.close()  # (one kept from another event loop cannot be used from this one)
        conn = _AsyncConnection(origin)
        context = self._tls.context(origin[0])
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().create_connection(
                    lambda: conn, origin[1], origin[2], ssl=context,
                    server_hostname=origin[1] if context is not None else None,
                )  # fmt: skip
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        return conn

    async def fetch(
        self, origin: _Origin, data: bytes, timeout: float | None, *, head_only: bool = False
    ) -> _Response:
        """Send one request (its bytes) and read the answer."""
        conn = await self._connect(origin, timeout)
        response = _Response(head_only=head_only)
        try:
            await conn.exchange(data, response, timeout)
        except TimeoutError as exc:
            conn.close()
            raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
        except BaseException:  # an HTTP error, or cancelled mid-answer: unknown state
            conn.close()
            raise
        keep = response.keep_alive and not conn.closed and not self._closed
        if keep and len(self._idle) < _IDLE_CONNECTIONS:
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not _on_asyncio():
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport(verify=self._tls.verify)
            return await self._fallback.handle_async_request(request)
        timeout = request.extensions.get("timeout", {}).get("read")
        body = await request.aread()
        data = _request_head(request, body) + body
        return _answer_of(await self.fetch(_origin(request.url), data, timeout,
                                           head_only=request.method == "HEAD"))  # fmt: skip

    async def aclose(self) -> None:
        self._closed = True  # a request still in flight closes its connection after
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if self._fallback is not None:
            await self._fallback.aclose()


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# Characters a path may carry as they are; anything else goes through httpx, which quotes it.
_PLAIN_PATH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/-._~")


def _unavailable(hub: str, exc: httpx.HTTPError) -> HubUnavailable:
    return HubUnavailable(f"cannot reach the hub at {hub}: {exc}")


class Client(BaseClient):
    """A blocking client: ``Client().submit("tasks.add", 2, 3).get(timeout=10)``."""

    def __init__(self, hub: str | None = None, **options: Any) -> None:
        super().__init__(hub, **options)
        self._direct = None if _proxied(self.hub) else _Transport(self.verify)
        self._http = httpx.Client(
            base_url=self.hub, headers=self._headers(), timeout=self.timeout, verify=self.verify,
            transport=self._direct,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, run_id: str | None = None, **kwargs: Any) -> Any:
        raw = None if self._direct is None else self._raw_request(method, path, kwargs)
        try:
            if raw is None:
                response = self._http.request(method, path, **kwargs)
            else:
                assert self._direct is not None
                timeout = kwargs.get("timeout", self.timeout)
                response = _answer_of(self._direct.fetch(self._origin, raw, timeout))
        except httpx.HTTPError as exc:
            raise _unavailable(self.hub, exc) from exc
        return self._answer(response, run_id=run_id)

    def submit(self, function: str, /, *args: Any, **kwargs: Any) -> RunHandle:
        """Submit ``function(*args, **kwargs)``; see :meth:`apply` for queue, delay, key."""
        return self.apply(function, args, kwargs)

    def apply(
        self,
        function: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        delay: float | None = None,
        idempotency_key: str | None = None,
    ) -> RunHandle:
        body = self._run_body(
            function, args, kwargs, queue=queue, delay=delay, idempotency_key=idempotency_key
        )
        answer = self._request("POST", "/v1/runs", json=body)
        return RunHandle(self, answer["id"])

    def call(self, function: str, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``function(*args, **kwargs)`` on the fleet and return its result (or raise its
        :class:`TaskError`): ``submit(...).get()`` in one request, one round trip to the hub
        when the run finishes within a long poll."""
        view = self._request("POST", "/v1/runs", **self._call_options(function, args, kwargs))
        return self._outcome(view if self._done(view) else self.wait(view["id"]))

    def submit_many(
        self, function: str, calls: Iterable[Sequence[Any]], *, queue: str | None = None
    ) -> list[RunHandle]:
        """Submit one run per argument tuple in ``calls``, in one request."""
        runs = [self._run_body(function, args, None, queue=queue) for args in calls]
        answer = self._request("POST", "/v1/runs/batch", json={"runs": runs})
        return [RunHandle(self, run_id) for run_id in answer["ids"]]

    def run(self, run_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/runs/{run_id}", run_id=run_id)  # type: ignore[no-any-return]

    def wait(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The run once finished; :class:`WaitTimeout` if ``timeout`` passes first."""
        deadline = self._deadline(timeout)
        while True:
            params = self._wait_params(deadline)
            view: dict[str, Any] = self._request(
                "GET",
                f"/v1/runs/{run_id}/wait",
                run_id=run_id,
                params=params,
                timeout=float(params["timeout"]) + self.timeout,
            )
            if self._done(view):
                return view
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"run {run_id} is still {view['state']} after {timeout}s")

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/runs/{run_id}/cancel", run_id=run_id)  # type: ignore[no-any-return]

    def runners(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/runners")["runners"]  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status")  # type: ignore[no-any-return]


class AsyncClient(BaseClient):
    """The same as :class:`Client`, over ``httpx.AsyncClient``."""

    def __init__(self, hub: str | None = None, **options: Any) -> None:
        super().__init__(hub, **options)
        self._direct = None if _proxied(self.hub) else _AsyncTransport(self.verify)
        self._http = httpx.AsyncClient(
            base_url=self.hub, headers=self._headers(), timeout=self.timeout, verify=self.verify,
            transport=self._direct,
        )
        self._submitting = 0  # submit requests in flight
        self._waiting: list[_Waiting] = []  # submits to send once one in flight comes back
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, path: str, *, run_id: str | None = None, **kwargs: Any
    ) -> Any:
        raw = None
        if self._direct is not None and _on_asyncio():
            raw = self._raw_request(method, path, kwargs)
        try:
            if raw is None:
                response = await self._http.request(method, path, **kwargs)
            else:
                assert self._direct is not None
                timeout = kwargs.get("timeout", self.timeout)
                response = _answer_of(await self._direct.fetch(self._origin, raw, timeout))
        except httpx.HTTPError as exc:
            raise _unavailable(self.hub, exc) from exc
        return self._answer(response, run_id=run_id)

    async def submit(self, function: str, /, *args: Any, **kwargs: Any) -> AsyncRunHandle:
        return await self.apply(function, args, kwargs)

    async def apply(
        self,
        function: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        delay: float | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncRunHandle:
        body = self._run_body(
            function, args, kwargs, queue=queue, delay=delay, idempotency_key=idempotency_key
        )
        counted = _on_asyncio()  # on another event loop library, every submit goes at once
        if counted and self._submitting >= _SUBMITS_IN_FLIGHT:
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._waiting.append((body, future))
            return AsyncRunHandle(self, await future)
        if counted:
            self._submitting += 1
        try:
            answer = await self._request("POST", "/v1/runs", json=body)
        finally:
            if counted:
                self._submitted()
        return AsyncRunHandle(self, answer["id"])

    def _submitted(self) -> None:
        """A submit request came back: send the submits that waited for it, in one request."""
        self._submitting -= 1
        waiting = [(body, future) for body, future in self._waiting if not future.done()]
        self._waiting = []
        if waiting:
            self._submitting += 1
            task = asyncio.get_running_loop().create_task(self._submit_together(waiting))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _submit_together(self, runs: list[_Waiting]) -> None:
        try:
            if len(runs) == 1:
                await self._submit_alone(*runs[0])
                return
            try:
                answer = await self._request(
                    "POST", "/v1/runs/batch", json={"runs": [body for body, _ in runs]}
                )
            except HubError as exc:
                if exc.status >= 500:
                    _fail_all(runs, exc)
                    return
                # One of them was refused (an unknown function, a bad delay, too big...): send
                # each on its own, so that each caller gets its own answer.
                await asyncio.gather(*(self._submit_alone(body, future) for body, future in runs))
                return
            except BaseException as exc:  # the hub is unreachable, for instance
                _fail_all(runs, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for (_, future), run_id in zip(runs, answer["ids"], strict=True):
                if not future.done():
                    future.set_result(run_id)
        finally:
            self._submitted()

    async def _submit_alone(self, body: dict[str, Any], future: asyncio.Future[str]) -> None:
        try:
            answer = await self._request("POST", "/v1/runs", json=body)
        except BaseException as exc:
            _fail_all([(body, future)], exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not future.done():
                future.set_result(answer["id"])

    async def call(self, function: str, /, *args: Any, **kwargs: Any) -> Any:
        """:meth:`Client.call`: ``(await submit(...)).get()`` in one request."""
        options = self._call_options(function, args, kwargs)
        view = await self._request("POST", "/v1/runs", **options)
        return self._outcome(view if self._done(view) else await self.wait(view["id"]))

    async def submit_many(
        self, function: str, calls: Iterable[Sequence[Any]], *, queue: str | None = None
    ) -> list[AsyncRunHandle]:
        runs = [self._run_body(function, args, None, queue=queue) for args in calls]
        answer = await self._request("POST", "/v1/runs/batch", json={"runs": runs})
        return [AsyncRunHandle(self, run_id) for run_id in answer["ids"]]

    async def run(self, run_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/runs/{run_id}", run_id=run_id)  # type: ignore[no-any-return]

    async def wait(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = self._deadline(timeout)
        while True:
            params = self._wait_params(deadline)
            view: dict[str, Any] = await self._request(
                "GET",
                f"/v1/runs/{run_id}/wait",
                run_id=run_id,
                params=params,
                timeout=float(params["timeout"]) + self.timeout,
            )
            if self._done(view):
                return view
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"run {run_id} is still {view['state']} after {timeout}s")

    async def cancel(self, run_id: str) -> dict[str, Any]:
        return await self._request("POST", f"/v1/runs/{run_id}/cancel", run_id=run_id)  # type: ignore[no-any-return]

    async def runners(self) -> list[dict[str, Any]]:
        return (await self._request("GET", "/v1/runners"))["runners"]  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/status")  # type: ignore[no-any-return]


def _fail_all(runs: list[_Waiting], exc: BaseException) -> None:
    """Tell the callers of ``runs`` that their submit failed with ``exc``."""
    for _, future in runs:
        if not future.done():
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)


class RunHandle:
    """A submitted run. ``get()`` waits and returns the result or raises the task's error."""

    def __init__(self, client: Client, run_id: str) -> None:
        self.client = client
        self.id = run_id

    def __repr__(self) -> str:
        return f"<RunHandle {self.id}>"

    def status(self) -> dict[str, Any]:
        return self.client.run(self.id)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        return self.client.wait(self.id, timeout)

    def get(self, timeout: float | None = None) -> Any:
        return BaseClient._outcome(self.wait(timeout))

    def cancel(self) -> dict[str, Any]:
        return self.client.cancel(self.id)


class AsyncRunHandle:
    def __init__(self, client: AsyncClient, run_id: str) -> None:
        self.client = client
        self.id = run_id

    def __repr__(self) -> str:
        return f"<AsyncRunHandle {self.id}>"

    async def status(self) -> dict[str, Any]:
        return await self.client.run(self.id)

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.client.wait(self.id, timeout)

    async def get(self, timeout: float | None = None) -> Any:
        return BaseClient._outcome(await self.wait(timeout))

    async def cancel(self) -> dict[str, Any]:
        return await self.client.cancel(self.id)
