"""The runner's connection to the hub: everything that runs on the connection thread.

:class:`HubLink` is an I/O driver around :class:`~tether.protocol.RunnerConnection`. On its
own event loop (started by the main thread through ``anyio.from_thread.start_blocking_portal``)
it connects, says hello, heartbeats on the hub's schedule, takes dispatches, hands each step to
an isolation backend, extends leases, sends results and keeps them until acknowledged, and
reconnects with jittered backoff forever.

It never runs user code and never blocks: steps run in isolation units on other threads or
processes, so a step that holds its GIL for minutes cannot delay a heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from .. import __version__
from .._step import encode_request
from ..app import FunctionSpec
from ..exceptions import ProtocolError
from ..protocol import (
    SUBPROTOCOL,
    Ack,
    Cancel,
    Closing,
    Dispatch,
    Draining,
    ErrorInfo,
    Extend,
    Extended,
    FunctionInfo,
    HeartbeatAck,
    Hello,
    LeaseLost,
    ProtocolFailure,
    RejectDispatch,
    Result,
    ResultAck,
    ResultOutbox,
    RunnerConnection,
    RunRef,
    Welcome,
    encode,
)
from .isolation import Backend

__all__ = ["EXIT_DRAINED", "EXIT_FATAL", "EXIT_RESTART", "HubLink"]

log = logging.getLogger("tether.runner")

EXIT_DRAINED = 0
EXIT_FATAL = 2
EXIT_RESTART = 75  # abandoned units piled up: the supervisor re-executes the runner

HANDSHAKE_TIMEOUT = 10.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


def ws_url(hub: str) -> str:
    hub = hub.rstrip("/")
    if hub.startswith("https://"):
        hub = "wss://" + hub[len("https://") :]
    elif hub.startswith("http://"):
        hub = "ws://" + hub[len("http://") :]
    return hub + "/v1/connect"


class _Step:
    """One run executing on this runner."""

    __slots__ = ("ref", "spec", "scope", "started")

    def __init__(self, ref: RunRef, spec: FunctionSpec) -> None:
        self.ref = ref
        self.spec = spec
        self.scope = anyio.CancelScope()
        self.started = time.monotonic()


class HubLink:
    def __init__(
        self,
        *,
        hub: str,
        specs: Mapping[str, FunctionSpec],
        backends: Mapping[str, Backend],
        functions: list[FunctionInfo],
        slots: int,
        runner_id: str,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        drain_grace: float = 30.0,
        max_abandoned: int = 4,
    ) -> None:
        self.url = ws_url(hub)
        self.specs = dict(specs)
        self.backends = dict(backends)
        self.functions = functions
        self.slots = slots
        self.runner_id = runner_id
        self.token = token
        self.ssl_context = ssl_context
        self.drain_grace = drain_grace
        self.max_abandoned = max_abandoned
        self.outbox = ResultOutbox()
        self.steps: dict[str, _Step] = {}  # by run id
        self.running: dict[str, int] = {name: 0 for name in self.specs}
        self.draining = False
        self.exit_code = EXIT_DRAINED
        self.connected = anyio.Event()
        self._ws: ClientConnection | None = None
        self._conn: RunnerConnection | None = None
        self._steps_tg: anyio.abc.TaskGroup | None = None
        self._stop = anyio.Event()
        self._idle = anyio.Event()
        self._acked = anyio.Event()

    # -- life cycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Connect and serve until drained (or told the hub refuses us); the exit code."""
        async with anyio.create_task_group() as steps:
            self._steps_tg = steps
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._connect_forever, tg.cancel_scope)
                await self._stop.wait()
                tg.cancel_scope.cancel()
            steps.cancel_scope.cancel()
        return self.exit_code

    async def drain(self, reason: str = "signal") -> None:
        """Take no more work, finish what runs (up to the grace period), deliver every result,
        then stop."""
        if self.draining:
            return
        self.draining = True
        log.info("draining (%s): %d runs in flight", reason, len(self.steps))
        await self._send(encode(Draining()))
        with anyio.move_on_after(self.drain_grace):
            while self.steps:
                await self._wait_idle()
        for step in list(self.steps.values()):
            log.warning("run %s did not finish within the drain grace period", step.ref.run_id)
            step.scope.cancel()
        # Results wait for the hub's acknowledgement (bounded: the hub may be gone).
        with anyio.move_on_after(max(5.0, self.drain_grace / 2)):
            while len(self.outbox):
                self._acked = anyio.Event()
                await self._acked.wait()
        if len(self.outbox):
            log.warning("%d results were not acknowledged by the hub", len(self.outbox))
        self._stop.set()

    def stop(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self._stop.set()

    async def _wait_idle(self) -> None:
        self._idle = anyio.Event()
        if self.steps:
            await self._idle.wait()

    # -- connecting ---------------------------------------------------------------------------

    def _hello(self) -> Hello:
        return Hello(
            runner_id=self.runner_id,
            version=1,
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=self.slots,
            functions=tuple(self.functions),
            in_flight=tuple(step.ref for step in self.steps.values()),
            unacked=tuple(
                RunRef(run_id=r.run_id, attempt=r.attempt) for r in self.outbox.pending()
            ),
            draining=self.draining,
        )

    async def _connect_forever(self, scope: anyio.CancelScope) -> None:
        delay = BACKOFF_FIRST
        last_logged: tuple[str, float] | None = None
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        while True:
            try:
                async with connect(
                    self.url,
                    subprotocols=[Subprotocol(SUBPROTOCOL)],
                    additional_headers=headers,
                    ssl=self.ssl_context if self.url.startswith("wss://") else None,
                    open_timeout=HANDSHAKE_TIMEOUT,
                    ping_interval=None,  # liveness is our own heartbeat, judged by the hub
                    close_timeout=2,
                    max_size=None,  # we enforce the limit the hub sets in welcome
                    compression=None,
                    user_agent_header=f"tether-runner/{__version__}",
                ) as ws:
                    delay = BACKOFF_FIRST
                    last_logged = None
                    await self._serve(ws)
            except BaseException as raised:
                # Task groups wrap what their tasks raise; judge the innermost error.
                exc = _innermost(raised)
                if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
                    log.error("the hub at %s refused our token (HTTP %d)", self.url,
                              exc.response.status_code)  # fmt: skip
                    self.stop(EXIT_FATAL)
                    return
                cancelled = isinstance(raised, anyio.get_cancelled_exc_class())
                if cancelled or not isinstance(exc, _RECOVERABLE):
                    raise
                reason = _describe(exc)
                # Say it once per backoff step, not once per attempt.
                if last_logged is None or last_logged != (reason, delay):
                    log.warning("hub %s: %s; retrying in %.1fs", self.url, reason, delay)
                    last_logged = (reason, delay)
            finally:
                self._ws = None
                self._conn = None
                self.connected = anyio.Event()
            await anyio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _serve(self, ws: ClientConnection) -> None:
        conn = RunnerConnection(self._hello())
        await ws.send(conn.opening_frame())
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            event = conn.receive(await ws.recv(), time.monotonic())
        if isinstance(event, ProtocolFailure):
            await ws.close(event.code, event.reason[:120])
            raise ProtocolError(event.code, event.reason)
        assert isinstance(event, Welcome)
        log.info(
            "connected to %s as %s (heartbeat every %d ms)",
            self.url,
            self.runner_id,
            event.heartbeat_interval_ms,
        )
        self._ws, self._conn = ws, conn
        self.connected.set()
        # Results kept from before the reconnect go first; the hub fences stale ones.
        for result in self.outbox.pending():
            await ws.send(encode(result))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeats, ws, conn, tg.cancel_scope)
            tg.start_soon(self._extensions, ws, event)
            async for data in ws:
                event2 = conn.receive(data, time.monotonic())
                if isinstance(event2, ProtocolFailure):
                    log.error("hub broke the protocol: %s", event2.reason)
                    await ws.close(event2.code, event2.reason[:120])
                    break
                if isinstance(event2, Closing):
                    log.info("hub is closing (%s): reconnecting", event2.reason or "no reason")
                    await ws.close()
                    break
                self._on_message(event2)
            tg.cancel_scope.cancel()
        raise ConnectionClosed(None, None)

    async def _heartbeats(
        self, ws: ClientConnection, conn: RunnerConnection, scope: anyio.CancelScope
    ) -> None:
        while True:
            now = time.monotonic()
            if conn.hub_silent(now):
                log.warning("hub went silent: reconnecting")
                await ws.close(1001, "hub silent")
                scope.cancel()
                return
            wait = conn.next_heartbeat_at() - now
            if wait > 0:
                await anyio.sleep(wait)
                continue
            frame = conn.heartbeat(
                now, free_slots=self.slots - len(self.steps), in_flight=len(self.steps)
            )
            await ws.send(frame)

    async def _extensions(self, ws: ClientConnection, welcome: Welcome) -> None:
        while True:
            await anyio.sleep(welcome.extend_interval_ms / 1000)
            if self.steps:
                refs = tuple(step.ref for step in self.steps.values())
                await ws.send(encode(Extend(runs=refs)))

    async def _send(self, frame: bytes) -> None:
        ws = self._ws
        if ws is None:
            return  # sent again (results) or re-announced (hello) after reconnecting
        try:
            await ws.send(frame)
        except ConnectionClosed:
            pass

    # -- messages from the hub ----------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        if isinstance(message, Dispatch):
            self._on_dispatch(message)
        elif isinstance(message, ResultAck):
            self.outbox.acknowledge(RunRef(run_id=message.run_id, attempt=message.attempt))
            self._acked.set()
        elif isinstance(message, Cancel | LeaseLost):
            step = self.steps.get(message.run_id)
            if step is not None and step.ref.attempt == message.attempt:
                why = (
                    "cancelled" if isinstance(message, Cancel) else f"lease lost ({message.reason})"
                )
                log.info("run %s attempt %d: %s; stopping it", message.run_id, message.attempt, why)
                step.scope.cancel()
        elif isinstance(message, HeartbeatAck | Extended):
            pass  # the state machine measured the round trip; extensions need no bookkeeping

    def _on_dispatch(self, dispatch: Dispatch) -> None:
        ref = RunRef(run_id=dispatch.run_id, attempt=dispatch.attempt)
        spec = self.specs.get(dispatch.function)
        reason = None
        if self.draining:
            reason = "draining"
        elif spec is None:
            reason = "unknown_function"
        elif dispatch.run_id in self.steps or len(self.steps) >= self.slots:
            reason = "no_slot"
        elif spec.concurrency is not None and self.running[spec.name] >= spec.concurrency:
            reason = "no_slot"
        if reason is not None or spec is None:
            self._spawn_send(
                RejectDispatch(run_id=ref.run_id, attempt=ref.attempt, reason=reason or "")
            )
            return
        step = _Step(ref, spec)
        self.steps[ref.run_id] = step
        self.running[spec.name] += 1
        self._spawn_send(Ack(run_id=ref.run_id, attempt=ref.attempt))
        assert self._steps_tg is not None
        self._steps_tg.start_soon(self._execute, step, dispatch)

    def _spawn_send(self, message: Any) -> None:
        assert self._steps_tg is not None
        self._steps_tg.start_soon(self._send, encode(message))

    async def _execute(self, step: _Step, dispatch: Dispatch) -> None:
        spec = step.spec
        backend = self.backends[spec.isolation]
        request = encode_request(spec.module, spec.qualname, dispatch.args, dispatch.kwargs)
        outcome: bytes | None = None
        try:
            with step.scope:
                outcome = await backend.run(request, spec)
        finally:
            self.steps.pop(step.ref.run_id, None)
            self.running[spec.name] -= 1
            if not self.steps:
                self._idle.set()
        if outcome is None:
            return  # cancelled by the hub (cancel, lease lost): nobody wants a result
        result = _result(step, outcome)
        self.outbox.add(result)
        await self._send(encode(result))
        if backend.abandoned >= self.max_abandoned and not self.draining:
            log.warning(
                "%d subinterpreter units are stuck in timed-out steps: draining to restart",
                backend.abandoned,
            )
            self.exit_code = EXIT_RESTART
            assert self._steps_tg is not None
            self._steps_tg.start_soon(self.drain, "too many abandoned units")


def _result(step: _Step, outcome: bytes) -> Result:
    duration_ms = (time.monotonic() - step.started) * 1000
    data = json.loads(outcome)
    ref = step.ref
    if data["ok"]:
        try:
            # A result must travel as JSON; NaN or a value the codec refuses is the step's
            # error, not the runner's.
            json.dumps(data["value"], allow_nan=False)
        except ValueError as exc:
            error = ErrorInfo(
                type="ValueError",
                message=f"the result of {step.spec.name} cannot be sent as JSON: {exc}",
                retryable=False,
            )
            return Result(run_id=ref.run_id, attempt=ref.attempt, ok=False, error=error,
                          duration_ms=duration_ms)  # fmt: skip
        return Result(run_id=ref.run_id, attempt=ref.attempt, ok=True, value=data["value"],
                      duration_ms=duration_ms)  # fmt: skip
    e = data["error"]
    error = ErrorInfo(
        type=e["type"], message=e["message"], traceback=e.get("traceback", ""),
        retryable=bool(e.get("retryable", True)),
    )  # fmt: skip
    return Result(run_id=ref.run_id, attempt=ref.attempt, ok=False, error=error,
                  duration_ms=duration_ms)  # fmt: skip


_RECOVERABLE = (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, ProtocolError)


def _innermost(exc: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        cancelled = anyio.get_cancelled_exc_class()
        leaves = [e for e in exc.exceptions if not isinstance(e, cancelled)]
        exc = (leaves or exc.exceptions)[0]
    return exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        return "connection closed"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
