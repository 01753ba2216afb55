"""A light runner for hub tests: the real protocol over a real socket, driven by hand.

It speaks through :class:`tether.protocol.RunnerConnection` but runs no steps: a test decides
what to acknowledge, when to heartbeat and which results to send, which is what fencing, lease
and timeout tests need.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tether.protocol import (
    SUBPROTOCOL,
    Assignment,
    Dispatch,
    ErrorInfo,
    FunctionInfo,
    HeartbeatAck,
    Hello,
    Message,
    Outcome,
    Result,
    ResultAck,
    RunnerConnection,
    RunRef,
    Welcome,
    encode,
)


class LightRunner:
    def __init__(self, ws: ClientConnection, conn: RunnerConnection, welcome: Welcome) -> None:
        self.ws = ws
        self.conn = conn
        self.welcome = welcome
        self.beating = True

    async def send(self, message: Message) -> None:
        await self.ws.send(encode(message))

    async def recv(self, timeout: float = 5.0) -> Message:
        """The next message from the hub that is not a heartbeat ack."""
        with anyio.fail_after(timeout):
            while True:
                event = self.conn.receive(await self.ws.recv(), time.monotonic())
                if not isinstance(event, HeartbeatAck):
                    assert isinstance(event, Message), event
                    return event

    async def recv_run(self, timeout: float = 5.0) -> Assignment:
        """The run of the next message, which must be a dispatch of one run."""
        message = await self.recv(timeout)
        assert isinstance(message, Dispatch) and len(message.runs) == 1, message
        return message.runs[0]

    async def result(self, run_id: str, attempt: int, value: Any = None, *,
                     error: ErrorInfo | None = None) -> None:  # fmt: skip
        outcome = Outcome(run_id=run_id, attempt=attempt, ok=error is None, value=value,
                          error=error)  # fmt: skip
        await self.send(Result(outcomes=(outcome,)))

    async def _heartbeat(self) -> None:
        while True:
            now = time.monotonic()
            if self.beating and now >= self.conn.next_heartbeat_at():
                await self.ws.send(self.conn.heartbeat(now, free_slots=1, in_flight=0))
            await anyio.sleep(0.005)


def acked(run_id: str, attempt: int) -> ResultAck:
    """The hub's acknowledgement of one result."""
    return ResultAck(runs=(RunRef(run_id=run_id, attempt=attempt),))


@asynccontextmanager
async def light_runner(
    url: str,
    runner_id: str = "light",
    functions: Sequence[str | FunctionInfo] = ("t.f",),
    *,
    slots: int = 2,
    in_flight: Sequence[RunRef] = (),
    hold_per_slot: int = 8,
) -> AsyncIterator[LightRunner]:
    infos = tuple(f if isinstance(f, FunctionInfo) else FunctionInfo(name=f) for f in functions)
    hello = Hello(runner_id=runner_id, host="test", pid=1, slots=slots, functions=infos,
                  in_flight=tuple(in_flight), hold_per_slot=hold_per_slot)  # fmt: skip
    conn = RunnerConnection(hello)
    ws_url = url.replace("http://", "ws://") + "/v1/connect"
    async with connect(ws_url, subprotocols=[Subprotocol(SUBPROTOCOL)], ping_interval=None) as ws:
        await ws.send(conn.opening_frame())
        welcome = conn.receive(await ws.recv(), time.monotonic())
        assert isinstance(welcome, Welcome), welcome
        runner = LightRunner(ws, conn, welcome)
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner._heartbeat)
            yield runner
            tg.cancel_scope.cancel()
