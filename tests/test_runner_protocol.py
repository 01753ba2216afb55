"""A real ``tether worker`` against a scripted hub on a loopback WebSocket: what the runner
answers to a dispatch of several runs, some of which it must refuse."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from support import UNIT, Proc, apoll
from tether.protocol import (
    SUBPROTOCOL,
    Ack,
    Assignment,
    Dispatch,
    Heartbeat,
    Hello,
    HubConnection,
    Message,
    RejectDispatch,
    Result,
    ResultAck,
    RunRef,
    Welcome,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


class ScriptedHub:
    """Accepts a runner (again after a reconnect), answers its heartbeats, and hands the test
    everything else: its hellos and, in order, its other messages."""

    def __init__(self) -> None:
        self.hellos: list[Hello] = []
        self.messages: list[Message] = []
        self.arrived = anyio.Event()
        self.ws: ServerConnection | None = None
        self.conn = HubConnection(heartbeat_interval_ms=100, heartbeat_timeout_ms=5_000)
        self.limit = 1 << 20  # the message limit the next welcome announces

    async def handler(self, ws: ServerConnection) -> None:
        self.conn = HubConnection(heartbeat_interval_ms=100, heartbeat_timeout_ms=5_000)
        hello = self.conn.receive(await ws.recv(), time.monotonic())
        assert isinstance(hello, Hello), hello
        welcome = Welcome(session_id="s", heartbeat_interval_ms=100, heartbeat_timeout_ms=5_000,
                          lease_ms=30_000, extend_interval_ms=10_000,
                          max_message_bytes=self.limit)  # fmt: skip
        await ws.send(self.conn.accept(welcome, time.monotonic()))
        self.ws = ws
        self.hellos.append(hello)
        self.arrived.set()
        try:
            async for data in ws:
                message = self.conn.receive(data, time.monotonic())
                if isinstance(message, Heartbeat):
                    await ws.send(self.conn.ack_heartbeat(message))
                else:
                    assert isinstance(message, Message), message
                    self.messages.append(message)
                    self.arrived.set()
        except ConnectionClosed:
            pass  # the runner was stopped

    async def send(self, message: Message) -> None:
        assert self.ws is not None
        await self.ws.send(self.conn.send(message))

    async def until(self, count: int) -> list[Message]:
        """The first ``count`` messages other than heartbeats."""
        with anyio.fail_after(20 * UNIT):
            while len(self.messages) < count:
                await self._next()
        return self.messages[:count]

    async def outcomes(self, count: int) -> set[tuple[str, int, bool, object]]:
        """(run, attempt, ok, value) of every outcome sent, once there are ``count``."""
        with anyio.fail_after(20 * UNIT):
            while True:
                found = [o for m in self.messages if isinstance(m, Result) for o in m.outcomes]
                if len(found) >= count:
                    return {(o.run_id, o.attempt, o.ok, o.value) for o in found}
                await self._next()

    async def connections(self, count: int) -> Hello:
        """The hello of the ``count``-th connection, once it is open."""
        with anyio.fail_after(60 * UNIT):
            while len(self.hellos) < count:
                await self._next()
        return self.hellos[count - 1]

    async def _next(self) -> None:
        self.arrived = anyio.Event()
        await self.arrived.wait()


@asynccontextmanager
async def scripted_hub_and_runner(tmp_path: Path, *args: str) -> AsyncIterator[ScriptedHub]:
    hub = ScriptedHub()
    async with serve(hub.handler, "127.0.0.1", 0, subprotocols=[Subprotocol(SUBPROTOCOL)]) as srv:
        port = srv.sockets[0].getsockname()[1]
        runner = Proc("runner", ["worker", "apps.jobs", "--hub", f"http://127.0.0.1:{port}",
                                 "--runner-id", "scripted", *args], tmp_path)  # fmt: skip
        try:
            await hub.connections(1)
            yield hub
        finally:
            runner.kill()


async def test_a_dispatch_of_several_runs_is_acked_once_and_a_run_it_cannot_take_is_rejected(
    tmp_path: Path,
) -> None:
    # Steps that wait to be released: their outcomes cannot stand in for the ack (an outcome
    # leaving in the same write as its run's ack replaces it).
    release = [tmp_path / "release1", tmp_path / "release3"]
    started = [tmp_path / "started1", tmp_path / "started3"]
    async with scripted_hub_and_runner(tmp_path, "--slots", "2") as hub:
        runs = (
            Assignment(run_id="r1", attempt=1, function="apps.jobs.wait_for",
                       args=[str(release[0]), str(started[0])], kwargs={}),
            Assignment(run_id="r2", attempt=1, function="apps.jobs.nowhere", args=[], kwargs={}),
            Assignment(run_id="r3", attempt=4, function="apps.jobs.wait_for",
                       args=[str(release[1]), str(started[1])], kwargs={}),
        )  # fmt: skip
        await hub.send(Dispatch(runs=runs, lease_ms=30_000))
        first = await hub.until(2)
        assert RejectDispatch(run_id="r2", attempt=1, reason="unknown_function") in first
        assert Ack(runs=(RunRef(run_id="r1", attempt=1), RunRef(run_id="r3", attempt=4))) in first
        for path in release:
            path.write_text("go")
        assert await hub.outcomes(2) == {("r1", 1, True, "released"), ("r3", 4, True, "released")}
        # Acknowledged, an outcome is forgotten; the other is kept, and sent again (alone)
        # once the runner has reconnected.
        await hub.send(ResultAck(runs=(RunRef(run_id="r1", attempt=1),)))
        before = len(hub.messages)
        assert hub.ws is not None
        await hub.ws.close()
        hello = await hub.connections(2)
        assert hello.unacked == (RunRef(run_id="r3", attempt=4),)
        [again] = (await hub.until(before + 1))[before:]
        assert isinstance(again, Result)
        assert [(o.run_id, o.value) for o in again.outcomes] == [("r3", "released")]


async def test_acks_and_outcomes_held_for_company_still_leave_while_a_step_runs(
    tmp_path: Path,
) -> None:
    """The runner holds an acknowledgement, and an outcome that ends while another step runs,
    a moment so that they share a message with what follows; with nothing following (the other
    step runs on), they leave by themselves."""
    release, started = tmp_path / "release", tmp_path / "started"
    async with scripted_hub_and_runner(tmp_path, "--slots", "2") as hub:
        blocker = Assignment(run_id="block", attempt=1, function="apps.jobs.wait_for",
                             args=[str(release), str(started)], kwargs={})  # fmt: skip
        await hub.send(Dispatch(runs=(blocker,), lease_ms=30_000))
        assert await hub.until(1) == [Ack(runs=(RunRef(run_id="block", attempt=1),))]

        async def has_started() -> bool:
            return started.exists()

        await apoll("the blocker to start", has_started)
        # Longer than the ack is held: the ack leaves first, the outcome has a hold of its own.
        nap = Assignment(run_id="nap", attempt=1, function="apps.jobs.nap", args=[0.05],
                         kwargs={})  # fmt: skip
        await hub.send(Dispatch(runs=(nap,), lease_ms=30_000))
        assert await hub.outcomes(1) == {("nap", 1, True, 0.05)}
        assert not release.exists()  # the blocker still runs: the outcome left on its own
        assert Ack(runs=(RunRef(run_id="nap", attempt=1),)) in hub.messages
        release.write_text("go")
        assert await hub.outcomes(2) == {("nap", 1, True, 0.05), ("block", 1, True, "released")}


async def test_a_runner_meeting_a_hub_of_another_protocol_version_says_so_and_exits(
    tmp_path: Path,
) -> None:
    # What this hub answers to a runner that does not offer its subprotocol (test_hub.py).
    body = b'{"error":"this hub speaks tether.v9; offered: tether.v2"}'
    answer = (b"HTTP/1.1 426 Upgrade Required\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        runner = Proc("runner", ["worker", "apps.jobs", "--hub", f"http://127.0.0.1:{port}"],
                      tmp_path)  # fmt: skip
        try:
            code = await anyio.to_thread.run_sync(runner.wait)  # the server answers meanwhile
        finally:
            runner.kill()
    output = runner.output()
    assert code == 2, output
    assert "speaks another protocol version than this runner (tether.v2):" in output
    assert "this hub speaks tether.v9; offered: tether.v2" in output


async def test_a_kept_result_too_large_for_the_next_hub_is_sent_as_an_error(
    tmp_path: Path,
) -> None:
    async with scripted_hub_and_runner(tmp_path) as hub:
        big = Assignment(run_id="r1", attempt=1, function="apps.jobs.text", args=[100_000],
                         kwargs={})  # fmt: skip
        await hub.send(Dispatch(runs=(big,), lease_ms=30_000))
        await hub.outcomes(1)  # 100 kB: within this hub's 1 MiB
        # Never acknowledged; the runner comes back to a hub whose limit is 64 KiB.
        hub.limit = 64 * 1024
        before = len(hub.messages)
        assert hub.ws is not None
        await hub.ws.close()
        assert (await hub.connections(2)).unacked == (RunRef(run_id="r1", attempt=1),)
        [again] = (await hub.until(before + 1))[before:]
        assert isinstance(again, Result)
        [outcome] = again.outcomes
        assert (outcome.run_id, outcome.ok) == ("r1", False)
        assert outcome.error is not None and outcome.error.type == "tether.ResultTooLarge"
        assert "over the hub's message limit of 65,536 bytes" in outcome.error.message
