"""A swarm of light runners in one process, for benchmarks/scale.py.

Each light runner is one real WebSocket speaking the real protocol through
:class:`tether.protocol.RunnerConnection` (as ``tests/lightrunner.py`` does), heartbeating on the
schedule the hub sets in ``welcome``. It runs no steps: in ``idle`` mode it only heartbeats; in
``work`` mode it answers every dispatch at once with an ack and a ``None`` result, so that what
is measured is the hub's dispatching, not a step.

    python benchmarks/_swarm.py --hub URL --runners 100 --prefix p0 [--mode idle|work]
                                [--slots 1] [--ramp 2.0]

It prints ``ready`` once every runner has its welcome, then, when it gets SIGTERM (or its stdin
closes), one JSON line: heartbeats sent, their round trips (send to ``heartbeat_ack``) and how
late each was sent against the hub's schedule, results sent, connections lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tether.protocol import (
    SUBPROTOCOL,
    Ack,
    Dispatch,
    FunctionInfo,
    HeartbeatAck,
    Hello,
    Outcome,
    Result,
    RunnerConnection,
    RunRef,
    Welcome,
    encode,
)

NOOP = "noop_tasks.noop"


class Stats:
    def __init__(self) -> None:
        self.round_trips_ms: list[float] = []
        self.late_ms: list[float] = []
        self.results = 0
        self.lost = 0


async def light_runner(
    url: str, runner_id: str, slots: int, work: bool, stats: Stats, ready: asyncio.Event
) -> None:
    hello = Hello(runner_id=runner_id, host="swarm", pid=os.getpid(), slots=slots,
                  functions=(FunctionInfo(name=NOOP),))  # fmt: skip
    conn = RunnerConnection(hello)
    ws_url = url.replace("http://", "ws://") + "/v1/connect"
    async with connect(ws_url, subprotocols=[Subprotocol(SUBPROTOCOL)], ping_interval=None,
                       max_size=None, compression=None, open_timeout=60) as ws:  # fmt: skip
        await ws.send(conn.opening_frame())
        welcome = conn.receive(await ws.recv(), time.monotonic())
        assert isinstance(welcome, Welcome), welcome
        ready.set()
        beats = asyncio.get_running_loop().create_task(heartbeat(ws, conn, slots, stats))
        try:
            async for data in ws:
                event = conn.receive(data, time.monotonic())
                if isinstance(event, HeartbeatAck):
                    if conn.round_trip is not None:
                        stats.round_trips_ms.append(conn.round_trip * 1000)
                elif isinstance(event, Dispatch) and work:
                    refs = tuple(RunRef(run_id=r.run_id, attempt=r.attempt) for r in event.runs)
                    await ws.send(encode(Ack(runs=refs)))
                    outcomes = tuple(Outcome(run_id=r.run_id, attempt=r.attempt, ok=True)
                                     for r in event.runs)  # fmt: skip
                    await ws.send(encode(Result(outcomes=outcomes)))
                    stats.results += len(outcomes)
        finally:
            beats.cancel()


async def heartbeat(ws: ClientConnection, conn: RunnerConnection, slots: int, stats: Stats) -> None:
    while True:
        due = conn.next_heartbeat_at()
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
            now = time.monotonic()
        stats.late_ms.append(max(0.0, now - due) * 1000)
        await ws.send(conn.heartbeat(now, free_slots=slots, in_flight=0))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)

    async def keep(runner_id: str, ready: asyncio.Event) -> None:
        try:
            await light_runner(args.hub, runner_id, args.slots, args.mode == "work", stats, ready)
        except (ConnectionClosed, OSError):
            pass
        if not stop.is_set():
            stats.lost += 1

    tasks = []
    readies = []
    for i in range(args.runners):
        ready = asyncio.Event()
        readies.append(ready)
        tasks.append(loop.create_task(keep(f"{args.prefix}-{i}", ready)))
        # Spread the connections (and so the heartbeat phases) over the ramp.
        await asyncio.sleep(args.ramp / args.runners)
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
    print("ready", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "round_trips_ms": stats.round_trips_ms,
        "late_ms": stats.late_ms,
        "results": stats.results,
        "lost": stats.lost,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hub", required=True)
    parser.add_argument("--runners", type=int, default=100)
    parser.add_argument("--prefix", default="swarm")
    parser.add_argument("--mode", choices=["idle", "work"], default="idle")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds to connect them all")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
