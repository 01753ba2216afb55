"""Throughput: N no-op runs from one producer to one worker with 2 slots, Tether beside peers.

    .venv/bin/python benchmarks/throughput.py [--runs 5000] [--rounds 5] [--peers celery,taskiq]
                                              [--quick]

What is measured, for each system and each way of submitting, ``--rounds`` times, interleaved
round by round (so load from elsewhere on the machine lands on every system alike):

* **runs/s**: ``N`` divided by the time from the first submit to the moment the last result is
  stored. Tether: a real ``tether server`` (SQLite store, WAL, ``synchronous=NORMAL``: every run
  is in the store before the API answers, every result before the runner is told it may forget
  it) and a real ``tether worker`` with 2 slots running ``noop_tasks.noop`` in subinterpreters;
  the producer is :class:`tether.AsyncClient` in this process. The end is when the last runs
  (as many as the runner has slots: dispatch is first in, first out, so every earlier result
  was stored before theirs) answer ``GET /v1/runs/{id}/wait``; the count of succeeded runs is
  then checked. Peers: see ``benchmarks/peers/driver.py``.
* **submit-only runs/s**: ``N`` divided by the time until the last submit call returned.

Ways of submitting: ``single`` is one submit call per run (Tether: ``AsyncClient.submit`` with up
to 32 calls in flight, which the client sends two requests at a time, each carrying the calls
that waited for it; Celery: ``delay()`` in a loop; taskiq: ``kiq()``, 32 in flight);
``batch`` is Tether's ``submit_many`` with 500 runs per request, Celery's ``group``, and taskiq's
``kiq()`` all at once (it has no batch call).

It asserts nothing about time; it checks that every run succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine
from _harness import NOOP, Peer, TetherStack, peer_names, print_systems, spread, start_peers
from peers.lanes import bounded
from tether import AsyncClient

IN_FLIGHT = 32
BATCH = 500
MODES = ("single", "batch")


async def tether_round(stack: TetherStack, n: int, mode: str) -> dict[str, float]:
    before = stack.succeeded()
    async with AsyncClient(stack.url, timeout=120) as client:
        started = time.perf_counter()
        if mode == "single":
            handles = await bounded([lambda: client.submit(NOOP)] * n, IN_FLIGHT)
        else:
            handles = []
            for i in range(0, n, BATCH):
                handles += await client.submit_many(NOOP, [()] * min(BATCH, n - i))
        submitted = time.perf_counter()
        for handle in handles[-stack.slots :]:
            await handle.wait(timeout=600)
        finished = time.perf_counter()
    while (done := stack.succeeded() - before) < n:  # never expected: then the end is later
        await asyncio.sleep(0.001)
        finished = time.perf_counter()
    return {"submit_s": submitted - started, "total_s": finished - started, "ok": done}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5000, help="runs per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per figure")
    parser.add_argument("--peers", default="celery,taskiq", help="celery,taskiq or none")
    parser.add_argument("--modes", default="single,batch")
    parser.add_argument("--quick", action="store_true", help="1,000 runs, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.rounds = 1000, 3
    modes = [m for m in args.modes.split(",") if m in MODES]
    n = args.runs

    print(
        f"throughput: {n:,} no-op runs from one producer to one worker with 2 slots,"
        f" first submit to last result stored; median (min-max) of {args.rounds} rounds"
    )
    print(f"machine:    {machine()}")
    with tempfile.TemporaryDirectory(prefix="tether-throughput-") as tmp:
        logs = Path(tmp)
        (logs / "data").mkdir()
        peers, skipped = start_peers(peer_names(args.peers), logs)
        try:
            with TetherStack(logs / "data", logs) as stack:
                print("  warming up ...", flush=True)
                asyncio.run(tether_round(stack, min(n, 500), "batch"))
                for peer in peers.values():
                    peer.call(op="throughput", n=min(n, 200), mode="batch")
                results: dict[tuple[str, str], list[dict[str, float]]] = {}
                for r in range(args.rounds):
                    print(f"  round {r + 1}/{args.rounds} ...", flush=True)
                    for mode in modes:
                        figures = asyncio.run(tether_round(stack, n, mode))
                        results.setdefault(("tether", mode), []).append(figures)
                        for name, peer in peers.items():
                            results.setdefault((name, mode), []).append(
                                peer.call(op="throughput", n=n, mode=mode)
                            )
        finally:
            for peer in peers.values():
                peer.close()
        report(results, modes, peers, skipped, n)
    return 0


def report(
    results: dict[tuple[str, str], list[dict[str, float]]],
    modes: list[str],
    peers: dict[str, Peer],
    skipped: list[str],
    n: int,
) -> None:
    print_systems("hub + runner as subprocesses, SQLite WAL synchronous=NORMAL (every run"
                  " durable before the API answers), subinterpreter units;", peers, skipped,
                  11)  # fmt: skip
    header = (f"{'submit':<7} {'system':<8} {'runs/s end to end':>24} {'submit-only runs/s':>26}"
              f" {'all ok':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for mode in modes:
        for name in ("tether", *peers):
            rows = results.get((name, mode), [])
            rate = [n / f["total_s"] for f in rows]
            submit = [n / f["submit_s"] for f in rows]
            ok = "yes" if all(f["ok"] == n for f in rows) else "NO"
            print(f"{mode:<7} {name:<8} {spread(rate):>24} {spread(submit):>26} {ok:>7}")
    print()
    for mode in modes:
        tether = [n / f["total_s"] for f in results.get(("tether", mode), [])]
        for name in peers:
            peer = [n / f["total_s"] for f in results.get((name, mode), [])]
            if tether and peer:
                med_t, med_p = statistics.median(tether), statistics.median(peer)
                print(f"{mode:<7} tether / {name:<7} {med_t / med_p:5.2f}x  (median runs/s,"
                      f" end to end)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
