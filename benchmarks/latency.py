"""Latency: one run's round trip, submit then wait for its result, Tether beside peers.

    .venv/bin/python benchmarks/latency.py [--trips 300] [--rounds 5] [--peers celery,taskiq]
                                           [--quick]

What is measured: ``--trips`` round trips in a row from one producer to one idle worker with
2 slots, each timed from just before the submit call to the moment its result is in the
producer's hands; p50, p90 and p99 of each round, then the median (min-max) of those over
``--rounds`` rounds, the systems interleaved round by round.

* Tether: :class:`tether.Client` (blocking, httpx) in this process, two ways: ``tether/get`` is
  ``client.submit(...)`` then ``handle.get()`` (``POST /v1/runs``, then the long poll
  ``GET /v1/runs/{id}/wait``); ``tether/call`` is ``client.call(...)``, both in one request
  (``POST /v1/runs?wait=30``, answered once the run finished). Both against a real
  ``tether server`` (SQLite, WAL, ``synchronous=NORMAL``: the run is in the store before the
  submit is answered, its result before the runner may forget it) and a real ``tether worker``
  running ``noop_tasks.noop`` in a subinterpreter.
* Celery: ``noop.delay().get()``; taskiq: ``kiq()`` then ``wait_result(check_interval=0.001)``
  (see ``benchmarks/peers/driver.py``).

It asserts nothing about time; it checks every result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine
from _harness import (
    NOOP,
    Peer,
    TetherStack,
    peer_names,
    percentile,
    print_systems,
    spread,
    start_peers,
)
from tether import Client

QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


WAYS = ("tether/get", "tether/call")


def tether_round(stack: TetherStack, trips: int, way: str) -> list[float]:
    out = []
    with Client(stack.url, timeout=30) as client:
        for _ in range(trips):
            started = time.perf_counter()
            if way == "tether/get":
                value = client.submit(NOOP).get(timeout=30)
            else:
                value = client.call(NOOP)
            out.append((time.perf_counter() - started) * 1000)
            assert value is None, value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trips", type=int, default=300, help="round trips per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure")
    parser.add_argument("--peers", default="celery,taskiq", help="celery,taskiq or none")
    parser.add_argument("--quick", action="store_true", help="100 trips, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.trips, args.rounds = 100, 3

    print(f"latency: {args.trips} sequential round trips (submit, then wait for the result) of a"
          f" no-op run to an idle worker with 2 slots; median (min-max) of {args.rounds} rounds")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tether-latency-") as tmp:
        logs = Path(tmp)
        (logs / "data").mkdir()
        peers, skipped = start_peers(peer_names(args.peers), logs)
        trips: dict[str, list[list[float]]] = {}
        try:
            with TetherStack(logs / "data", logs) as stack:
                print("  warming up ...", flush=True)
                for way in WAYS:
                    tether_round(stack, 50, way)
                for peer in peers.values():
                    peer.call(op="latency", n=50)
                for r in range(args.rounds):
                    print(f"  round {r + 1}/{args.rounds} ...", flush=True)
                    for way in WAYS:
                        trips.setdefault(way, []).append(tether_round(stack, args.trips, way))
                    for name, peer in peers.items():
                        answer = peer.call(op="latency", n=args.trips)
                        trips.setdefault(name, []).append(answer["trips_ms"])
        finally:
            for peer in peers.values():
                peer.close()
        report(trips, peers, skipped)
    return 0


def report(trips: dict[str, list[list[float]]], peers: dict[str, Peer], skipped: list[str]) -> None:
    print_systems("hub + runner as subprocesses, SQLite WAL synchronous=NORMAL, subinterpreter"
                  " units, blocking tether.Client;", peers, skipped, 8)  # fmt: skip
    header = f"{'system':<12}" + "".join(f"{name + ' ms':>22}" for name, _ in QUANTILES)
    print(header)
    print("-" * len(header))
    for name, rounds in trips.items():
        cells = [spread([percentile(r, q) for r in rounds], "{:.2f}") for _, q in QUANTILES]
        print(f"{name:<12}" + "".join(f"{c:>22}" for c in cells))
    print()
    for way in WAYS:
        for name in peers:
            if way in trips and name in trips:
                ratios = []
                for label, q in QUANTILES:
                    mine = statistics.median(percentile(r, q) for r in trips[way])
                    theirs = statistics.median(percentile(r, q) for r in trips[name])
                    ratios.append(f"{label} {theirs / mine:.2f}x")
                print(f"{way} is faster than {name} by: {', '.join(ratios)}")


if __name__ == "__main__":
    sys.exit(main())
