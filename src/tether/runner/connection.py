"""The runner's connection to the hub: everything that runs on the connection thread.

:class:`HubLink` is an I/O driver around :class:`~tether.protocol.RunnerConnection`. On its
own event loop (started by the main thread through ``anyio.from_thread.start_blocking_portal``)
it connects, says hello, heartbeats on the hub's schedule, takes dispatches, hands each step to
an isolation backend, extends leases, sends results and keeps them until acknowledged, and
reconnects with jittered backoff forever.

It never runs user code and never blocks: steps run in isolation units on other threads or
processes, so a step that holds its GIL for minutes cannot delay a heartbeat.

The WebSocket itself is websockets' sans-I/O client protocol driven by :class:`_Socket`, a
plain asyncio protocol: each frame from the hub is handled in the call that read it, and each
frame to the hub is written in the call that made it. No queue, lock or task per message: the
high-level client spent more of the runner's time on those than on anything else.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from .. import __version__
from .._step import encode_request
from ..app import FunctionSpec
from ..exceptions import ProtocolError
from ..protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SUBPROTOCOL,
    Ack,
    Assignment,
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
    Outcome,
    ProtocolFailure,
    RejectDispatch,
    Result,
    ResultAck,
    ResultOutbox,
    RunnerConnection,
    RunRef,
    Welcome,
    encode,
    encode_split,
)
from ..protocol.codec import loads
from .isolation import Backend

__all__ = ["EXIT_DRAINED", "EXIT_FATAL", "EXIT_RESTART", "HubLink"]

log = logging.getLogger("tether.runner")

EXIT_DRAINED = 0
EXIT_FATAL = 2
EXIT_RESTART = 75  # abandoned units piled up: the supervisor re-executes the runner

# A runner holds up to this many runs per slot (and per unit of a function's concurrency): one
# running, the others waiting their turn here, so that a slot that frees starts its next step
# at once instead of a round trip to the hub later. The hub decides how many to send, no more
# than this (scheduler.py, MAX_HOLD_PER_SLOT); a step's timeout starts when it starts running.
MAX_HOLD_PER_SLOT = 32

# An outcome that finishes while other steps still run waits this long for theirs, so that
# they share one result message (under load one per run cost the runner and the hub a frame
# each); the last step running sends at once. Acknowledgements of dispatches (which the hub
# does not wait for) leave with the next outcomes, or after ACK_HOLD; a run whose outcome
# leaves in the same write is not acknowledged at all.
RESULT_HOLD = 0.0005
ACK_HOLD = 0.002
RESULT_BATCH = 64  # outcomes waiting that are sent at once
HANDSHAKE_TIMEOUT = 10.0
READ_BUFFER_BYTES = 64 * 1024  # under the C library's threshold for mapping memory of its own
CLOSE_TIMEOUT = 2.0  # after a close frame, how long the hub has to close the TCP connection
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


def ws_url(hub: str) -> str:
    hub = hub.rstrip("/")
    if hub.startswith("https://"):
        hub = "wss://" + hub[len("https://") :]
    elif hub.startswith("http://"):
        hub = "ws://" + hub[len("http://") :]
    return hub + "/v1/connect"


class _Socket(asyncio.BufferedProtocol):
    """One WebSocket to the hub: websockets' sans-I/O :class:`ClientProtocol` over an asyncio
    transport (the pattern of websockets' ``docs/howto/sansio.rst``).

    Whole messages go to ``on_message`` from inside the call that read them; until it is set
    (the handshake) they wait for :meth:`first_message`. :meth:`send` and :meth:`send_all`
    write at once, except while a read is being handled: what that read produced (rejections
    of its dispatches, say) leaves in one write, after the steps it started are on their way.

    Reads land in one buffer of our own (a buffered protocol): a plain protocol makes asyncio
    allocate a fresh 256 KiB bytes object per read, which the C library maps, shrinks and
    unmaps again each time (three system calls and page faults per read, measured under load).
    """

    def __init__(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol
        self._buffer = bytearray(READ_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.on_message: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._corked = False
        self._close_timer: asyncio.TimerHandle | None = None
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.protocol.receive_data(self._buffer[:nbytes])  # a copy of what was read, only
        corked, self._corked = self._corked, True
        try:
            self._process()
        finally:
            # What this read produced is written once the steps it started have been handed
            # to their units: the tasks it created run first, then this callback.
            if not corked:
                self._loop.call_soon(self._uncork)

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._process()
        self._flush()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionError("the hub closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    # -- frames -----------------------------------------------------------------------------

    def _process(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                opcode = event.opcode
                if opcode is Opcode.BINARY or opcode is Opcode.TEXT:
                    if event.fin:
                        self._deliver(bytes(event.data))
                    else:
                        self._fragments = [bytes(event.data)]
                elif opcode is Opcode.CONT and self._fragments:
                    self._fragments.append(bytes(event.data))
                    if event.fin:
                        data, self._fragments = b"".join(self._fragments), []
                        self._deliver(data)
                # PING: the protocol queued its PONG already; PONG and CLOSE: nothing to do.
            elif isinstance(event, Response) and not self.handshake.done():
                if self.protocol.handshake_exc is not None:
                    self.handshake.set_exception(self.protocol.handshake_exc)
                else:
                    self.handshake.set_result(None)
        if self.protocol.close_expected() and self._close_timer is None:
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._abort)

    def _deliver(self, data: bytes) -> None:
        if self.on_message is not None:
            self.on_message(data)
        else:
            self._early.append(data)
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def first_message(self) -> bytes | None:
        """The first message (the hub's welcome); None if the connection closed first."""
        while not self._early:
            if self.closed.done():
                return None
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._early.pop(0)

    def start(self, on_message: Callable[[bytes], None]) -> None:
        """From now on, hand each message to ``on_message`` as it arrives."""
        self.on_message = on_message
        early, self._early = self._early, []
        for data in early:
            on_message(data)

    # -- sending and closing ------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.protocol.state is State.OPEN and not self.closed.done()

    def send(self, frame: bytes) -> None:
        self.send_all([frame])

    def send_all(self, frames: list[bytes]) -> None:
        """Send ``frames`` in one write (or with the rest of the read being handled)."""
        if not self.open or not frames:
            return  # results are sent again after reconnecting; the rest does not matter
        for frame in frames:
            self.protocol.send_binary(frame)
        if not self._corked:  # else: it leaves with the rest of this read's answers
            self._flush()

    def _uncork(self) -> None:
        self._corked = False
        self._flush()

    def _flush(self) -> None:
        transport = self.transport
        writes = self.protocol.data_to_send()
        if transport is None or transport.is_closing() or not writes:
            return
        data = b"".join(writes)
        if data:
            transport.write(data)
        if not writes[-1] and transport.can_write_eof():  # SEND_EOF: half-close
            transport.write_eof()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the hub closes the TCP connection (or we do, after
        :data:`CLOSE_TIMEOUT`)."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
            if self._close_timer is None:
                self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._abort)
        elif self.transport is not None and self.protocol.state is not State.CLOSING:
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)


class _Step:
    """One run held by this runner: waiting for a slot, then executing."""

    __slots__ = ("order", "ref", "scope", "spec", "started")

    def __init__(self, ref: RunRef, spec: FunctionSpec, order: Assignment) -> None:
        self.ref = ref
        self.spec = spec
        self.order = order
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
        # Outcomes and acknowledgements not sent yet, and when they go (_send_soon).
        self._unsent: list[Outcome] = []
        self._unacked: list[RunRef] = []
        self._sending: asyncio.TimerHandle | None = None
        self._executing = 0  # steps in a slot
        self._limit = DEFAULT_MAX_MESSAGE_BYTES  # the hub's message size limit, from welcome
        self.steps: dict[str, _Step] = {}  # by run id
        self.running: dict[str, int] = {name: 0 for name in self.specs}  # held, by function
        # One worker task per slot takes held steps in the order they came, skipping those whose
        # function is at its concurrency: no task, semaphore or slot wait per step. A step's
        # clock (its reported duration) starts when a worker takes it.
        self._ready: collections.deque[_Step] = collections.deque()
        self._active: dict[str, int] = {name: 0 for name in self.specs}  # in a slot, by function
        self._limits = {name: spec.concurrency for name, spec in self.specs.items()
                        if spec.concurrency is not None}  # fmt: skip
        self._resting: list[asyncio.Future[None]] = []  # workers with nothing they may take
        self.draining = False
        self.exit_code = EXIT_DRAINED
        self.connected = anyio.Event()
        self._sock: _Socket | None = None
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
            for _ in range(self.slots):
                steps.start_soon(self._worker)
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
        self._send(encode(Draining()))
        with anyio.move_on_after(self.drain_grace):
            while self.steps:
                await self._wait_idle()
        for step in list(self.steps.values()):
            log.warning("run %s did not finish within the drain grace period", step.ref.run_id)
            self._stop_step(step)
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
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=self.slots,
            functions=tuple(self.functions),
            in_flight=tuple(step.ref for step in self.steps.values()),
            unacked=tuple(
                RunRef(run_id=r.run_id, attempt=r.attempt) for r in self.outbox.pending()
            ),
            draining=self.draining,
            hold_per_slot=MAX_HOLD_PER_SLOT,
        )

    async def _open(self) -> _Socket:
        """Connect and complete the WebSocket handshake (no compression, no size limit: we
        enforce the one the hub sets in ``welcome``; no pings: liveness is our heartbeat)."""
        uri = parse_uri(self.url)
        protocol = ClientProtocol(uri, subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=None)
        request = protocol.connect()
        if self.token:
            request.headers["Authorization"] = f"Bearer {self.token}"
        request.headers["User-Agent"] = f"tether-runner/{__version__}"
        context = None
        if uri.secure:
            context = self.ssl_context or ssl.create_default_context()
        sock = _Socket(protocol)
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                await asyncio.get_running_loop().create_connection(
                    lambda: sock, uri.host, uri.port, ssl=context
                )
                protocol.send_request(request)
                sock._flush()
                await sock.handshake
        except BaseException:
            sock._abort()
            raise
        return sock

    async def _connect_forever(self, scope: anyio.CancelScope) -> None:
        delay = BACKOFF_FIRST
        last_logged: tuple[str, float] | None = None
        while True:
            sock: _Socket | None = None
            try:
                sock = await self._open()
                delay = BACKOFF_FIRST
                last_logged = None
                await self._serve(sock)
            except BaseException as raised:
                # Task groups wrap what their tasks raise; judge the innermost error.
                exc = _innermost(raised)
                if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
                    log.error("the hub at %s refused our token (HTTP %d)", self.url,
                              exc.response.status_code)  # fmt: skip
                    self.stop(EXIT_FATAL)
                    return
                if isinstance(exc, InvalidStatus) and exc.response.status_code == 426:
                    log.error("the hub at %s speaks another protocol version than this runner"
                              " (%s): %s", self.url, SUBPROTOCOL,
                              _said(exc.response.body))  # fmt: skip
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
                self._sock = None
                self._conn = None
                self.connected = anyio.Event()
                if sock is not None:
                    sock.close()
            await anyio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _serve(self, sock: _Socket) -> None:
        conn = RunnerConnection(self._hello())
        sock.send(conn.opening_frame())
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            data = await sock.first_message()
        if data is None:
            raise ConnectionClosed(None, None)
        event = conn.receive(data, time.monotonic())
        if isinstance(event, ProtocolFailure):
            sock.close(event.code, event.reason[:120])
            raise ProtocolError(event.code, event.reason)
        assert isinstance(event, Welcome)
        log.info(
            "connected to %s as %s (heartbeat every %d ms)",
            self.url,
            self.runner_id,
            event.heartbeat_interval_ms,
        )
        self._sock, self._conn = sock, conn
        self._limit = event.max_message_bytes
        self.connected.set()
        # Results kept from before the reconnect go first; the hub fences stale ones. One this
        # hub's limit does not let through (it may be lower than the last one's) is an error.
        self._unsent.clear()  # they are in the outbox, and go now
        self._unacked.clear()  # dispatches of the last connection: the hello names the runs held
        kept = [_within(outcome, self._limit) for outcome in self.outbox.pending()]
        for outcome in kept:
            self.outbox.add(outcome)  # in place: the outbox keeps its order
        sock.send_all(_result_frames(conn, kept))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeats, sock, conn, tg.cancel_scope)
            tg.start_soon(self._extensions, sock, event)
            sock.start(lambda frame: self._on_frame(sock, conn, frame))
            await sock.wait_closed()
            tg.cancel_scope.cancel()
        raise ConnectionClosed(None, None)

    def _on_frame(self, sock: _Socket, conn: RunnerConnection, data: bytes) -> None:
        """One message from the hub, handled in the call that read it."""
        try:
            event = conn.receive(data, time.monotonic())
            if not sock.open:
                # Closing (a close frame may come in the same read as the messages before it):
                # results the hub acknowledged are still forgotten rather than sent again;
                # nothing else matters any more.
                if isinstance(event, ResultAck):
                    self._on_message(event)
            elif isinstance(event, ProtocolFailure):
                log.error("hub broke the protocol: %s", event.reason)
                sock.close(event.code, event.reason[:120])
            elif isinstance(event, Closing):
                log.info("hub is closing (%s): reconnecting", event.reason or "no reason")
                sock.close()
            else:
                self._on_message(event)
        except Exception:  # our bug: never let it escape into the transport
            log.exception("failed to handle a message from the hub: reconnecting")
            sock.close(1011, "runner error")

    async def _heartbeats(
        self, sock: _Socket, conn: RunnerConnection, scope: anyio.CancelScope
    ) -> None:
        while True:
            now = time.monotonic()
            if conn.hub_silent(now):
                log.warning("hub went silent: reconnecting")
                sock.close(1001, "hub silent")
                scope.cancel()
                return
            wait = conn.next_heartbeat_at() - now
            if wait > 0:
                await anyio.sleep(wait)
                continue
            frame = conn.heartbeat(
                now, free_slots=max(0, self.slots - len(self.steps)), in_flight=len(self.steps)
            )
            sock.send(frame)

    async def _extensions(self, sock: _Socket, welcome: Welcome) -> None:
        while True:
            await anyio.sleep(welcome.extend_interval_ms / 1000)
            if self.steps:
                refs = tuple(step.ref for step in self.steps.values())
                sock.send(encode(Extend(runs=refs)))

    def _send(self, frame: bytes) -> None:
        sock = self._sock
        if sock is not None:  # else: sent again (results) or re-announced (hello) on reconnect
            sock.send(frame)

    # -- messages from the hub ----------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        if isinstance(message, Dispatch):
            accepted = []
            for order in message.runs:
                ref = self._on_dispatch(order)
                if ref is not None:
                    accepted.append(ref)
            if accepted:
                self._unacked += accepted
                self._send_soon(ACK_HOLD)
        elif isinstance(message, ResultAck):
            for ref in message.runs:
                self.outbox.acknowledge(ref)
            self._acked.set()
        elif isinstance(message, Cancel | LeaseLost):
            step = self.steps.get(message.run_id)
            if step is not None and step.ref.attempt == message.attempt:
                why = (
                    "cancelled" if isinstance(message, Cancel) else f"lease lost ({message.reason})"
                )
                log.info("run %s attempt %d: %s; stopping it", message.run_id, message.attempt, why)
                self._stop_step(step)
        elif isinstance(message, HeartbeatAck | Extended):
            pass  # the state machine measured the round trip; extensions need no bookkeeping

    def _on_dispatch(self, order: Assignment) -> RunRef | None:
        """Hold ``order`` for a slot (its ref, to acknowledge) or reject it (None)."""
        ref = RunRef(run_id=order.run_id, attempt=order.attempt)
        spec = self.specs.get(order.function)
        reason = None
        if self.draining:
            reason = "draining"
        elif spec is None:
            reason = "unknown_function"
        elif order.run_id in self.steps or len(self.steps) >= self.slots * MAX_HOLD_PER_SLOT:
            reason = "no_slot"
        elif (
            spec.concurrency is not None
            and self.running[spec.name] >= spec.concurrency * MAX_HOLD_PER_SLOT
        ):
            reason = "no_slot"
        if reason is not None or spec is None:
            self._send_message(
                RejectDispatch(run_id=ref.run_id, attempt=ref.attempt, reason=reason or "")
            )
            return None
        step = _Step(ref, spec, order)
        self.steps[ref.run_id] = step
        self.running[spec.name] += 1
        self._ready.append(step)
        while self._resting:  # wake one resting worker: it takes this step or the next
            resting = self._resting.pop()
            if not resting.done():
                resting.set_result(None)
                break
        return ref

    # -- executing steps ----------------------------------------------------------------------

    async def _worker(self) -> None:
        """One slot: take the next step it may run, run it, again. A function's steps wait
        while its concurrency is taken; a worker that frees one looks again at once."""
        loop = asyncio.get_running_loop()
        while True:
            step = self._take()
            if step is None:
                resting = loop.create_future()
                self._resting.append(resting)
                try:
                    await resting
                finally:
                    if resting in self._resting:  # cancelled (the runner is stopping)
                        self._resting.remove(resting)
                continue
            name = step.spec.name
            self._active[name] += 1
            self._executing += 1
            try:
                await self._execute(step)
            finally:
                self._active[name] -= 1
                self._executing -= 1

    def _take(self) -> _Step | None:
        for step in self._ready:
            limit = self._limits.get(step.spec.name)
            if limit is None or self._active[step.spec.name] < limit:
                self._ready.remove(step)
                return step
        return None

    def _stop_step(self, step: _Step) -> None:
        """Cancel ``step``: one still waiting for a slot is forgotten at once."""
        try:
            self._ready.remove(step)
        except ValueError:
            step.scope.cancel()  # executing: its worker stops it
        else:
            self._forget(step)

    def _forget(self, step: _Step) -> None:
        self.steps.pop(step.ref.run_id, None)
        self.running[step.spec.name] -= 1
        if not self.steps:
            self._idle.set()

    def _send_message(self, message: Any) -> None:
        self._send(encode(message))

    async def _execute(self, step: _Step) -> None:
        spec, order = step.spec, step.order
        backend = self.backends[spec.isolation]
        request = encode_request(spec.module, spec.qualname, order.args, order.kwargs)
        outcome: bytes | None = None
        step.started = time.monotonic()
        try:
            with step.scope:
                outcome = await backend.run(request, spec)
        finally:
            self._forget(step)
        if outcome is None:
            return  # cancelled by the hub (cancel, lease lost): nobody wants a result
        self._report(_outcome(step, outcome, self._limit))
        if backend.abandoned >= self.max_abandoned and not self.draining:
            log.warning(
                "%d subinterpreter units are stuck in timed-out steps: draining to restart",
                backend.abandoned,
            )
            self.exit_code = EXIT_RESTART
            assert self._steps_tg is not None
            self._steps_tg.start_soon(self.drain, "too many abandoned units")

    def _report(self, outcome: Outcome) -> None:
        """Keep ``outcome`` until acknowledged; send it at once if no other step is running,
        else with the outcomes of those that end within RESULT_HOLD."""
        self.outbox.add(outcome)
        self._unsent.append(outcome)
        if self._executing > 1 and len(self._unsent) < RESULT_BATCH:  # this step counts
            self._send_soon(RESULT_HOLD)
        else:
            self._send_now()

    def _send_soon(self, delay: float) -> None:
        """Send what waits within ``delay`` seconds (sooner if it was due sooner already)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._sending is not None:
            if self._sending.when() <= due:
                return
            self._sending.cancel()
        self._sending = loop.call_at(due, self._send_waiting)

    def _send_now(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
        try:
            self._send_waiting()
        except Exception:  # our bug; the outcomes stay in the outbox, sent on reconnecting
            log.exception("failed to send outcomes to the hub")

    def _send_waiting(self) -> None:
        """Acknowledgements and outcomes, in one write."""
        self._sending = None
        unacked, self._unacked = self._unacked, []
        unsent, self._unsent = self._unsent, []
        sock, conn = self._sock, self._conn
        if sock is None or conn is None:
            return  # outcomes go from the outbox on reconnect; acks no longer matter
        if unacked and unsent:  # an outcome says its dispatch arrived: no ack for it
            done = {(outcome.run_id, outcome.attempt) for outcome in unsent}
            unacked = [ref for ref in unacked if (ref.run_id, ref.attempt) not in done]
        frames = [encode(Ack(runs=tuple(unacked)))] if unacked else []
        sock.send_all(frames + _result_frames(conn, unsent))


def _result_frames(conn: RunnerConnection, outcomes: list[Outcome]) -> list[bytes]:
    """``result`` frames for ``outcomes`` (none for none), each within the hub's message size
    limit."""
    if not outcomes:
        return []
    return encode_split(lambda batch: Result(outcomes=batch), outcomes, conn.max_message_bytes)


def loads_outcome(outcome: bytes) -> Any:
    """A step's outcome: JSON, except that it may spell NaN or an infinity (the step's encoder
    allows them; the caller refuses them)."""
    try:
        return loads(outcome)
    except ValueError:
        return json.loads(outcome)


def _outcome(step: _Step, outcome: bytes, limit: int) -> Outcome:
    """The outcome to report for ``step`` from the unit's ``outcome`` bytes. What the hub could
    not take is the step's error: a result that is not JSON, or an outcome whose message would
    be over the hub's size ``limit`` (sent, it would close the connection, and again after
    every reconnect)."""
    reported = _read_outcome(step, outcome)
    # The message is the outcome's JSON and a few hundred bytes: only a big one needs measuring.
    if len(outcome) > limit - 1024 and len(encode(Result(outcomes=(reported,)))) > limit:
        return _too_large(reported, step.spec.name, f"{len(outcome):,} bytes as JSON", limit)
    return reported


def _within(outcome: Outcome, limit: int) -> Outcome:
    """``outcome``, or the error that it is too large for a message of ``limit`` bytes."""
    size = len(encode(Result(outcomes=(outcome,))))
    if size <= limit:
        return outcome
    return _too_large(outcome, f"run {outcome.run_id}", f"{size:,} bytes as a message", limit)


def _too_large(outcome: Outcome, of: str, size: str, limit: int) -> Outcome:
    """``outcome`` turned into the error that it does not fit the hub's message ``limit``."""
    error = ErrorInfo(
        type="tether.ResultTooLarge",
        message=f"the {'result' if outcome.ok else 'error'} of {of} is {size}, over the hub's"
        f" message limit of {limit:,} bytes",
        retryable=False,
    )
    return dataclasses.replace(outcome, ok=False, value=None, error=error)


def _read_outcome(step: _Step, outcome: bytes) -> Outcome:
    duration_ms = (time.monotonic() - step.started) * 1000
    data = loads_outcome(outcome)
    ref = step.ref
    if data["ok"]:
        try:
            # A result must travel as JSON; NaN or a value the codec refuses is the step's
            # error, not the runner's. The outcome is JSON already, so only a non-finite
            # number can be wrong, and only an outcome that spells one needs the check.
            if b"NaN" in outcome or b"Infinity" in outcome:
                json.dumps(data["value"], allow_nan=False)
        except ValueError as exc:
            error = ErrorInfo(
                type="ValueError",
                message=f"the result of {step.spec.name} cannot be sent as JSON: {exc}",
                retryable=False,
            )
            return Outcome(run_id=ref.run_id, attempt=ref.attempt, ok=False, error=error,
                           duration_ms=duration_ms)  # fmt: skip
        return Outcome(run_id=ref.run_id, attempt=ref.attempt, ok=True, value=data["value"],
                       duration_ms=duration_ms)  # fmt: skip
    e = data["error"]
    error = ErrorInfo(
        type=e["type"], message=e["message"], traceback=e.get("traceback", ""),
        retryable=bool(e.get("retryable", True)),
    )  # fmt: skip
    return Outcome(run_id=ref.run_id, attempt=ref.attempt, ok=False, error=error,
                   duration_ms=duration_ms)  # fmt: skip


_RECOVERABLE = (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, ProtocolError)


def _innermost(exc: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        cancelled = anyio.get_cancelled_exc_class()
        leaves = [e for e in exc.exceptions if not isinstance(e, cancelled)]
        exc = (leaves or exc.exceptions)[0]
    return exc


def _said(body: bytes | bytearray) -> str:
    """What an HTTP answer's JSON body says (its ``error``), or the body itself."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or "(no reason given)"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        return "connection closed"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
