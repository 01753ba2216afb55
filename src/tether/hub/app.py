"""The hub as an ASGI application: the HTTP API and the runner WebSocket on one port.

This module is the I/O driver around :class:`~.scheduler.Scheduler`: it parses and validates
requests, turns them into scheduler calls, and pumps frames between a runner's socket and its
:class:`~tether.protocol.HubConnection`. Every malformed request gets a 4xx naming the field;
every misbehaving runner gets a close code naming its fault; neither affects anyone else.

The hot paths (submit, batch submit, read and wait for a run, the runner WebSocket) are served
by a plain ASGI function in front of Starlette, with the same handlers, checks and answers as
the Starlette routes behind it, which serve everything else (and these paths too, for a method
they do not take). Starlette's middleware, routing and request objects cost the hub more than
the store does per run; the front skips them where it matters.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..protocol import (
    SUBPROTOCOL,
    Assignment,
    CloseCode,
    Dispatch,
    Heartbeat,
    Hello,
    HubConnection,
    ProtocolFailure,
    Welcome,
    encode,
)
from ..protocol.codec import loads
from ._cork import flush_answer
from ._json import dumps
from .metrics import CONTENT_TYPE
from .scheduler import Scheduler, Session, SubmitRequest

__all__ = ["create_app"]

type Scope = MutableMapping[str, Any]
type Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
type Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
type ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("tether.hub")

MAX_WAIT_SECONDS = 300.0
OUTBOX_FRAMES = 10_000  # frames queued to one runner before it counts as a slow consumer


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Disconnected(Exception):
    """The client went away before its request body arrived: nobody to answer."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _JSON(Response):
    """A JSON answer rendered like Starlette's JSONResponse, by the faster encoder."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def _authorized(header: str | None, tokens: tuple[str, ...]) -> bool:
    if not tokens:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    presented = header[len("Bearer ") :].encode()
    # Compare against every token, always, in constant time per token.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented, token.encode())
    return matched


def create_app(
    scheduler: Scheduler,
    *,
    producer_tokens: tuple[str, ...] = (),
    runner_tokens: tuple[str, ...] = (),
    lifespan: Callable[[], AsyncIterator[None]] | None = None,
) -> ASGIApp:
    timings = scheduler.timings
    max_body = timings.max_message_bytes

    # -- the handlers, on plain values: (status, JSON body) out, BadRequest for a 4xx --------

    def parse_body(body: bytes | bytearray) -> Any:
        try:
            return loads(body)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(400, f"request body is not valid JSON: {exc}") from None

    def seconds(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise BadRequest(400, f"{name} must be a number of seconds, got {raw!r}") from None
        if not math.isfinite(value) or value < 0:
            raise BadRequest(400, f"{name} must be a finite number >= 0, got {raw!r}")
        return min(value, MAX_WAIT_SECONDS)

    def dispatchable(body: bytes | bytearray, runs: list[SubmitRequest], where: str) -> None:
        """413 for a run whose dispatch would not fit the runners' message limit (a runner
        would refuse it, and every dispatch after it). Its arguments take about what they
        took in the body, unless written in a short form (``1e15`` is re-encoded as
        ``1000000000000000.0``): only a body over a fifth of the limit needs measuring."""
        limit = timings.max_message_bytes
        if len(body) <= limit // 5:
            return
        for i, run in enumerate(runs):
            order = Assignment(run_id="0" * 32, attempt=2**31, function=run.function,
                               args=run.args, kwargs=run.kwargs, timeout=1e300)  # fmt: skip
            size = len(encode(Dispatch(runs=(order,), lease_ms=2**31)))
            if size > limit:
                name = where if len(runs) == 1 else f"{where}[{i}]"
                raise BadRequest(413, f"{name} would be a dispatch of {size:,} bytes, over the"
                                      f" runners' message limit of {limit:,} bytes")  # fmt: skip

    async def do_submit(body: bytes | bytearray, wait: str | None = None) -> tuple[int, Any]:
        """Store a run; with ``wait`` (seconds), answer once it finished or that time passed,
        with the whole run: a submit and a long poll in one round trip."""
        run = parse_run(parse_body(body), "run")
        dispatchable(body, [run], "run")
        timeout = None if wait is None else seconds("wait", wait)
        watch: dict[str, Any] | None = None if timeout is None else {}
        [(record, created)] = await scheduler.submit([run], watch=watch)
        status = 201 if created else 200
        if timeout is None or watch is None:
            return status, {"id": record.id, "state": record.state}
        finished = await scheduler.wait(record.id, timeout, watch.get(record.id))
        return status, (finished or record).public()

    async def do_submit_batch(body: bytes | bytearray) -> tuple[int, Any]:
        obj = parse_body(body)
        if not isinstance(obj, dict) or not isinstance(obj.get("runs"), list):
            raise BadRequest(400, "body must be an object with a list 'runs'")
        runs = [parse_run(item, f"runs[{i}]") for i, item in enumerate(obj["runs"])]
        dispatchable(body, runs, "runs")
        stored = await scheduler.submit(runs)
        return 201, {"ids": [record.id for record, _ in stored]}

    def found(run_id: str, record: Any) -> tuple[int, Any]:
        if record is None:
            return 404, {"error": f"no run with id {run_id!r}"}
        return 200, record.public()

    async def do_get(run_id: str) -> tuple[int, Any]:
        return found(run_id, await scheduler.get(run_id))

    async def do_wait(run_id: str, raw: str) -> tuple[int, Any]:
        return found(run_id, await scheduler.wait(run_id, seconds("timeout", raw)))

    def api(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not _authorized(request.headers.get("authorization"), producer_tokens):
                return _error(401, "missing or invalid bearer token")
            try:
                return await handler(request)
            except BadRequest as exc:
                return _error(exc.status, exc.message)

        return endpoint

    async def read_body(request: Request) -> bytearray:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise BadRequest(413, f"request body of {length} bytes exceeds {max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise BadRequest(413, f"request body exceeds {max_body} bytes")
        return body

    def parse_run(obj: Any, where: str) -> SubmitRequest:
        if not isinstance(obj, dict):
            raise BadRequest(400, f"{where} must be a JSON object")
        allowed = {"function", "args", "kwargs", "queue", "idempotency_key", "delay"}
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise BadRequest(400, f"{where}: unknown field {unknown[0]!r}")
        function = obj.get("function")
        if not isinstance(function, str) or not function:
            raise BadRequest(400, f"{where}.function must be a non-empty string")
        args = obj.get("args", [])
        if not isinstance(args, list):
            raise BadRequest(400, f"{where}.args must be a list")
        kwargs = obj.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise BadRequest(400, f"{where}.kwargs must be an object")
        queue = obj.get("queue")
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise BadRequest(400, f"{where}.queue must be a non-empty string")
        key = obj.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not key or len(key) > 256):
            raise BadRequest(400, f"{where}.idempotency_key must be a string of 1-256 chars")
        delay = obj.get("delay", 0)
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise BadRequest(400, f"{where}.delay must be a number of seconds")
        if not math.isfinite(delay) or delay < 0:
            raise BadRequest(400, f"{where}.delay must be a finite number >= 0, got {delay}")
        if queue is None and scheduler.queue_of(function) is None:
            raise BadRequest(
                404,
                f"{where}: unknown function {function!r}: no runner has registered it"
                " (give a queue to submit it for runners not yet connected)",
            )
        return SubmitRequest(
            function=function,
            args=args,
            kwargs=kwargs,
            queue=queue,
            idempotency_key=key,
            delay=float(delay),
        )

    def answer(status: int, body: Any) -> Response:
        return _JSON(body, status_code=status)

    @api
    async def submit(request: Request) -> Response:
        wait = request.query_params.get("wait")
        return answer(*await do_submit(await read_body(request), wait))

    @api
    async def submit_batch(request: Request) -> Response:
        return answer(*await do_submit_batch(await read_body(request)))

    @api
    async def get_run(request: Request) -> Response:
        return answer(*await do_get(request.path_params["run_id"]))

    @api
    async def wait_run(request: Request) -> Response:
        raw = request.query_params.get("timeout", "30")
        return answer(*await do_wait(request.path_params["run_id"], raw))

    @api
    async def cancel_run(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        return answer(*found(run_id, await scheduler.cancel(run_id)))

    @api
    async def runners(request: Request) -> Response:
        return JSONResponse({"runners": scheduler.runner_views()})

    @api
    async def functions(request: Request) -> Response:
        return JSONResponse({"functions": scheduler.functions})

    @api
    async def status(request: Request) -> Response:
        counts = await scheduler.count_by_state()
        return JSONResponse(
            {
                "runners": scheduler.runner_views(),
                "functions": scheduler.functions,
                "queues": scheduler.queue_depths(),
                "runs": counts,
            }
        )

    @api
    async def metrics(request: Request) -> Response:
        running = len(scheduler.leases)
        body = scheduler.metrics.render(
            runners=len(scheduler.sessions),
            queue_depths=scheduler.queue_depths(),
            unfinished=lambda: {"queued": len(scheduler.runs) - running, "running": running},
        )
        return Response(body, media_type=CONTENT_TYPE)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        if lifespan is None:
            yield
        else:
            async with asynccontextmanager(lifespan)():
                yield

    app = Starlette(
        routes=[
            Route("/v1/runs", submit, methods=["POST"]),
            Route("/v1/runs/batch", submit_batch, methods=["POST"]),
            Route("/v1/runs/{run_id}", get_run, methods=["GET"]),
            Route("/v1/runs/{run_id}/wait", wait_run, methods=["GET"]),
            Route("/v1/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
            Route("/v1/runners", runners, methods=["GET"]),
            Route("/v1/functions", functions, methods=["GET"]),
            Route("/v1/status", status, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=app_lifespan,
    )
    app.router.redirect_slashes = False  # an API answers 404 for a wrong path, not a redirect

    # -- the front: the hot paths as plain ASGI, the rest to Starlette ------------------------

    async def read(receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > max_body:
            raise BadRequest(413, f"request body of {length} bytes exceeds {max_body}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
                if size > max_body:
                    raise BadRequest(413, f"request body exceeds {max_body} bytes")
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def query(scope: Scope) -> dict[str, str]:
        raw = scope.get("query_string", b"")
        if not raw:
            return {}
        return dict(urllib.parse.parse_qsl(raw.decode("latin-1"), keep_blank_values=True))

    def route(method: str, path: str) -> tuple[str, str] | None:
        """Which hot path this is (and its run id), or None for Starlette."""
        if method == "POST":
            if path == "/v1/runs":
                return "submit", ""
            if path == "/v1/runs/batch":
                return "batch", ""
        elif method == "GET" and path.startswith("/v1/runs/"):
            rest = path[len("/v1/runs/") :]
            if rest and "/" not in rest:
                return "get", rest
            if rest.endswith("/wait") and (run_id := rest[: -len("/wait")]) and "/" not in run_id:
                return "wait", run_id
        return None

    async def front(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and (hot := route(scope["method"], scope["path"])) is not None:
            headers = dict(scope["headers"])
            if not _authorized(_latin1(headers.get(b"authorization")), producer_tokens):
                await _respond(send, 401, {"error": "missing or invalid bearer token"})
                return
            which, run_id = hot
            try:
                if which == "submit":
                    wait = query(scope).get("wait")
                    status, body = await do_submit(await read(receive, headers), wait)
                elif which == "batch":
                    status, body = await do_submit_batch(await read(receive, headers))
                elif which == "get":
                    status, body = await do_get(run_id)
                else:
                    status, body = await do_wait(run_id, query(scope).get("timeout", "30"))
            except BadRequest as exc:
                status, body = exc.status, {"error": exc.message}
            except _Disconnected:
                return
            await _respond(send, status, body)
        elif kind == "websocket" and scope["path"] == "/v1/connect":
            await _serve_runner(scope, receive, send, scheduler, runner_tokens)
        else:
            await app(scope, receive, send)

    return front


def _latin1(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


async def _respond(send: Send, status: int, body: Any) -> None:
    data = dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", str(len(data)).encode()),
                (b"content-type", b"application/json"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
    flush_answer()


class _Link:
    """The outgoing side of one runner's socket. A frame is written in the call that sends it,
    unless frames before it still wait for the socket to drain; those are written in order by
    one task, and at most :data:`OUTBOX_FRAMES` may wait."""

    def __init__(self, send: Send) -> None:
        self._send = send  # the server's own ASGI send: no wrappers per frame
        self._waiting: collections.deque[bytes] = collections.deque()
        self._closing: tuple[int, str] | None = None
        self._writer: asyncio.Task[None] | None = None  # while frames wait for the socket
        self._broken = False  # the socket failed: nothing more can be written

    def send(self, frame: bytes) -> bool:
        if self._closing is not None or self._broken:
            return True  # nobody reads it any more: not the runner's fault
        if len(self._waiting) >= OUTBOX_FRAMES:
            return False
        self._waiting.append(frame)
        self._write()
        return True

    def close(self, code: int, reason: str) -> None:
        """Write what waits, then the close frame."""
        if self._closing is None:
            self._closing = (code, reason)
            self._write()

    def _write(self) -> None:
        if self._writer is None:
            # Eager: the task runs here and now, up to the first write that has to wait.
            task = asyncio.Task(self._drain(), loop=asyncio.get_running_loop(), eager_start=True)
            if not task.done():
                self._writer = task

    async def _drain(self) -> None:
        send, waiting = self._send, self._waiting
        try:
            while waiting:
                await send({"type": "websocket.send", "bytes": waiting.popleft()})
            if self._closing is not None:
                code, reason = self._closing
                await send({"type": "websocket.close", "code": code, "reason": reason[:120]})
        except (RuntimeError, WebSocketDisconnect, OSError):
            self._broken = True  # the reading side sees the connection end
            waiting.clear()
        except Exception:
            log.exception("writing to a runner failed")
            self._broken = True
            waiting.clear()
        finally:
            self._writer = None

    def abandon(self) -> None:
        """The runner is gone: write nothing more."""
        self._broken = True
        self._waiting.clear()
        if self._writer is not None:
            self._writer.cancel()

    async def finish(self, timeout: float) -> None:
        """Let what is being written (the close frame, say) go out within ``timeout`` s."""
        if self._writer is not None:
            done, _ = await asyncio.wait({self._writer}, timeout=timeout)
            if not done:
                self.abandon()


async def _receive(receive: Receive) -> bytes | str | None:
    message = await receive()
    if message["type"] == "websocket.disconnect":
        return None
    data: bytes | str | None = message.get("bytes")
    if data is None:
        data = message.get("text", "")
    return data


async def _serve_runner(
    scope: Scope, receive: Receive, send: Send, scheduler: Scheduler, tokens: tuple[str, ...]
) -> None:
    # Starlette's WebSocket for the handshake and closing; frames go through the server's own
    # receive and send.
    websocket = WebSocket(scope, receive, send)
    timings = scheduler.timings
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
    if not _authorized(websocket.headers.get("authorization"), tokens):
        log.warning("refusing runner connection from %s: missing or invalid token", peer)
        await websocket.close(CloseCode.POLICY_VIOLATION)
        return
    offered = websocket.scope.get("subprotocols", [])
    if SUBPROTOCOL not in offered:
        message = f"this hub speaks {SUBPROTOCOL}; offered: {', '.join(offered) or 'none'}"
        log.warning("refusing connection from %s: %s", peer, message)
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            # 426: the runner can tell another protocol version from a refused token (403).
            await websocket.send_denial_response(_error(426, message))
        else:
            await websocket.close(CloseCode.PROTOCOL_ERROR)
        return
    await websocket.accept(subprotocol=SUBPROTOCOL)
    conn = HubConnection(
        heartbeat_interval_ms=int(timings.heartbeat_interval * 1000),
        heartbeat_timeout_ms=int(timings.heartbeat_timeout * 1000),
        max_message_bytes=timings.max_message_bytes,
    )

    async def fail(code: int, reason: str) -> None:
        log.warning("closing runner connection from %s: %s (code %d)", peer, reason, code)
        try:
            await websocket.close(code, reason[:120])
        except (RuntimeError, WebSocketDisconnect, OSError):
            pass

    try:
        async with asyncio.timeout(timings.handshake_timeout):
            data = await _receive(receive)
    except TimeoutError:
        await fail(CloseCode.HANDSHAKE_TIMEOUT, "no hello within the handshake timeout")
        return
    except WebSocketDisconnect:
        return
    if data is None:
        return
    event = conn.receive(data, time.monotonic())
    if isinstance(event, ProtocolFailure):
        await fail(event.code, event.reason)
        return
    assert isinstance(event, Hello)
    link = _Link(send)
    session = Session(
        conn,
        session_id=secrets.token_hex(8),
        send=link.send,
        close=link.close,
        peer=peer,
    )
    welcome = Welcome(
        session_id=session.session_id,
        heartbeat_interval_ms=int(timings.heartbeat_interval * 1000),
        heartbeat_timeout_ms=int(timings.heartbeat_timeout * 1000),
        lease_ms=int(timings.lease * 1000),
        extend_interval_ms=int(timings.extend_interval * 1000),
        max_message_bytes=timings.max_message_bytes,
    )
    await websocket.send_bytes(conn.accept(welcome, time.monotonic()))
    scheduler.attach(session)
    try:
        while not session.closed:
            data = await _receive(receive)
            if data is None:
                break
            event = conn.receive(data, time.monotonic())
            if isinstance(event, ProtocolFailure):
                log.warning(
                    "runner %s from %s broke the protocol: %s (code %d)",
                    session.runner_id,
                    peer,
                    event.reason,
                    event.code,
                )
                session.close(event.code, event.reason)
                break
            if isinstance(event, Heartbeat):
                link.send(conn.ack_heartbeat(event))
                if conn.heartbeats.last_gap_ms is not None:
                    scheduler.metrics.heartbeat_gap.observe(conn.heartbeats.last_gap_ms / 1000)
            else:
                scheduler.on_message(session, event)
    except (WebSocketDisconnect, OSError):
        pass
    finally:
        scheduler.detach(session)
        if not session.closed:
            session.closed = True
            link.abandon()
        await link.finish(timeout=1.0)
