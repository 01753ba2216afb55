"""Scale: a thousand runners on one hub, and dispatching from a store a million runs deep.

    .venv/bin/python benchmarks/scale.py [--runners 1000] [--per-process 100] [--seconds 10]
                                         [--rounds 3] [--finished 1000000] [--queued 100000]
                                         [--quick]

**Runners.** ``--runners`` light runners (``benchmarks/_swarm.py``: real WebSockets speaking the
real protocol through :class:`tether.protocol.RunnerConnection`, ``--per-process`` of them per
process, connections spread over a few seconds) hold one hub that asks for a heartbeat every
second (the default) and declares a runner dead after 5 s of silence. Over ``--rounds`` windows
of ``--seconds``: the hub process's CPU (user + system, from ``/proc``) in cores, and its
resident memory. Over the whole run: each heartbeat's round trip as the runners see it (sent to
``heartbeat_ack`` received: how long the hub took to process it, plus both sides' scheduling),
how late the runners sent them (their own lag, not the hub's), the largest gap between two
heartbeats the hub saw from any runner (``GET /v1/runners``), and how many runners it declared
dead (``tether_runners_lost_total``). The hub's idle CPU with no runner is shown for reference.

**Dispatch from a large store.** A SQLite store is filled with ``--finished`` succeeded runs and
``--queued`` queued ones (written straight into the hub's schema), and a hub started on it
(its start-up, recovery included, is shown). Four light runners with 32 slots each answer every
dispatch at once, so what limits the rate is the hub: every run marked running (with its
result, when that comes within the hub's MARK_DELAY) and every result stored before it is
acknowledged. The queue is drained in ``--rounds``
+ 1 equal chunks, the first one a warm-up; each figure is one chunk's runs divided by the time
it took, by the runs' own ``finished_at`` in the store (the hub's clock when it took up their
results). The same is measured against an empty
store holding only ``--queued`` runs submitted through the API, and the table prints the ratio.

It asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from _common import ROOT, child_env, machine, wait_for
from _harness import NOOP, TetherStack, cpu_seconds, percentile, rss_mib, spread, versions
from tether.hub.store.sqlite import SQLiteStore


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def runner_views(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/v1/runners", timeout=60).json()["runners"])


class Swarm:
    """Light runners in child processes."""

    def __init__(self, url: str, runners: int, per_process: int, prefix: str, *extra: str) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        for p, start in enumerate(range(0, runners, per_process)):
            count = min(per_process, runners - start)
            self.procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "benchmarks" / "_swarm.py"), "--hub", url,
                 "--runners", str(count), "--prefix", f"{prefix}{p}", *extra],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
                cwd=ROOT,
            ))  # fmt: skip
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                self.stop()
                raise RuntimeError(f"a swarm process did not start (said {line!r})")

    def stop(self) -> list[dict[str, Any]]:
        out = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                text, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                text, _ = proc.communicate()
            for line in text.splitlines():
                if line.startswith("{"):
                    out.append(json.loads(line))
        return out


# -- part 1: many runners -------------------------------------------------------------------


def many_runners(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    (tmp / "runners").mkdir()
    with TetherStack(tmp / "runners", tmp, runner=False) as stack:
        assert stack.hub is not None
        pid = stack.hub.pid
        time.sleep(1)
        idle = window_cpu(pid, min(args.seconds, 5))
        print(f"  connecting {args.runners:,} runners ...", flush=True)
        swarm = Swarm(stack.url, args.runners, args.per_process, "r",
                      "--ramp", str(max(2.0, args.runners / 200)))  # fmt: skip
        try:
            wait_for("every runner to be registered",
                     lambda: len(runner_views(stack.url)) >= args.runners, 120)  # fmt: skip
            time.sleep(2)  # let every runner settle into its heartbeat rhythm
            cores, rss = [], []
            for r in range(args.rounds):
                print(f"  window {r + 1}/{args.rounds} ({args.seconds:g} s) ...", flush=True)
                cores.append(window_cpu(pid, args.seconds))
                rss.append(rss_mib(pid))
            views = runner_views(stack.url)
            lost = metric(stack.url, "tether_runners_lost_total")
        finally:
            reports = swarm.stop()
    round_trips = [x for r in reports for x in r["round_trips_ms"]]
    late = [x for r in reports for x in r["late_ms"]]
    return {
        "idle": idle,
        "cores": cores,
        "rss": rss,
        "connected": len(views),
        "max_gap_ms": max((v["heartbeat"]["max_gap_ms"] for v in views), default=0.0),
        "heartbeats": sum(v["heartbeat"]["count"] for v in views),
        "lost": int(lost),
        "dropped": sum(r["lost"] for r in reports),
        "round_trips": round_trips,
        "late": late,
    }


def window_cpu(pid: int, seconds: float) -> float:
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


# -- part 2: dispatch from a large store ------------------------------------------------------


def fill_store(path: Path, finished: int, queued: int) -> float:
    """Write ``finished`` succeeded and ``queued`` queued runs of the no-op task; seconds taken."""
    started = time.monotonic()
    store = SQLiteStore(str(path))
    store.open()  # the hub's own schema
    store.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    now = time.time() - (finished + queued) / 1000 - 60  # every run a millisecond apart, all past
    db.execute("BEGIN")
    chunk = 50_000
    for state, count in (("succeeded", finished), ("queued", queued)):
        for first in range(0, count, chunk):
            rows = []
            for i in range(first, min(count, first + chunk)):
                at = now + i / 1000
                run_id = f"{int(at * 1000):012x}{secrets.token_hex(10)}"
                done = state == "succeeded"
                rows.append((run_id, NOOP, "default", "[]", "{}", state, 1 if done else 0, at,
                             at, at if done else None, at + 0.001 if done else None,
                             "old-runner" if done else None, "null" if done else None))
            db.executemany(
                "INSERT INTO runs (id, function, queue, args, kwargs, state, attempt,"
                " created_at, not_before, started_at, finished_at, runner_id, result)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )  # fmt: skip
        now += count / 1000
    db.execute("COMMIT")
    db.close()
    return time.monotonic() - started


def dispatch_rate(args: argparse.Namespace, tmp: Path, big: bool) -> dict[str, Any]:
    data = tmp / ("big" if big else "empty")
    data.mkdir()
    db = data / "tether.db"
    filled = fill_store(db, args.finished, args.queued) if big else 0.0
    started = time.monotonic()
    with TetherStack(data, tmp, runner=False) as stack:
        recovery = time.monotonic() - started
        if not big:
            with httpx.Client(base_url=stack.url, timeout=120) as http:
                body = {"runs": [{"function": NOOP, "queue": "default"}] * 1000}
                for _ in range(0, args.queued, 1000):
                    http.post("/v1/runs/batch", json=body).raise_for_status()
            time.sleep(3)  # the hub checkpoints those inserts meanwhile, as the filled store is
        # The queue is drained in rounds + 1 equal chunks; the first one warms up (runners
        # connecting, slots filling), each of the others is one figure. Each chunk is timed by
        # the runs' own finished_at, the hub's clock when it took up their results (stored
        # before acknowledged): neither a busy hub's /metrics nor the light runners, which read
        # the hub's acknowledgements late when it sends them faster than they read, tell the
        # moment closely enough at these rates.
        chunk = args.queued // (args.rounds + 1)
        began = time.time()
        swarm = Swarm(stack.url, 4, 4, "w", "--mode", "work", "--slots", "32", "--ramp", "0.1")
        try:
            deadline = time.monotonic() + 600
            while metric(stack.url, "tether_runs_succeeded_total") < chunk * (args.rounds + 1):
                if time.monotonic() > deadline:
                    raise TimeoutError("the hub did not drain its queue within 600 s")
                time.sleep(0.1)
        finally:
            swarm.stop()
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as reader:
            finished = sorted(at for (at,) in reader.execute(
                "SELECT finished_at FROM runs WHERE state = 'succeeded' AND finished_at >= ?",
                (began,)))  # fmt: skip
        ends = [finished[chunk * (k + 1) - 1] for k in range(args.rounds + 1)]
        rates = [chunk / (b - a) for a, b in zip(ends, ends[1:], strict=False)]
    return {"rates": rates, "filled_s": filled, "recovery_s": recovery}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runners", type=int, default=1000)
    parser.add_argument("--per-process", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU window length")
    parser.add_argument("--rounds", type=int, default=3, help="windows per figure")
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--skip", default="", help="runners or store: leave that part out")
    parser.add_argument("--quick", action="store_true",
                        help="300 runners, 5 s windows; 100,000 + 20,000 runs in the store")
    args = parser.parse_args()
    if args.quick:
        args.runners, args.seconds, args.finished, args.queued = 300, 5.0, 100_000, 20_000
    print("scale: many runners held by one hub; dispatch from a large store;"
          f" median (min-max) of {args.rounds} windows")
    print(f"machine: {machine()}")
    print(f"tether:  {versions()}")
    with tempfile.TemporaryDirectory(prefix="tether-scale-") as tmp_name:
        tmp = Path(tmp_name)
        held = None if "runners" in args.skip else many_runners(args, tmp)
        empty = big = None
        if "store" not in args.skip:
            print("  dispatch, empty store ...", flush=True)
            empty = dispatch_rate(args, tmp, big=False)
            print(f"  dispatch, store of {args.finished:,} finished + {args.queued:,} queued"
                  " (filling it takes a while) ...", flush=True)  # fmt: skip
            big = dispatch_rate(args, tmp, big=True)
    print()
    if held is not None:
        rt, late = held["round_trips"], held["late"]
        print(f"{args.runners:,} light runners ({args.per_process} per process), heartbeat every"
              " 1 s, dead after 5 s of silence")  # fmt: skip
        header = (f"{'hub CPU, cores':>22} {'hub RSS MiB':>18} {'idle hub CPU':>13}"
                  f" {'connected':>10} {'heartbeats':>11}")  # fmt: skip
        print(header)
        print("-" * len(header))
        print(f"{spread(held['cores'], '{:.3f}'):>22} {spread(held['rss'], '{:.0f}'):>18}"
              f" {held['idle']:>13.3f} {held['connected']:>10,} {held['heartbeats']:>11,}")
        print()
        print(f"heartbeat round trip (runner sends -> heartbeat_ack back), {len(rt):,} heartbeats:"
              f" p50 {percentile(rt, 0.5):.2f} ms, p99 {percentile(rt, 0.99):.2f} ms,"
              f" max {max(rt, default=0):.1f} ms")  # fmt: skip
        print(f"runners' own sending lag behind schedule: p99 {percentile(late, 0.99):.2f} ms,"
              f" max {max(late, default=0):.1f} ms")  # fmt: skip
        print(f"largest gap between two heartbeats the hub saw from one runner:"
              f" {held['max_gap_ms']:.0f} ms (interval 1000 ms)")
        print(f"runners declared dead by the hub: {held['lost']};"
              f" connections the swarm lost: {held['dropped']}")
        print()
    if empty is not None and big is not None:
        print("dispatch rate: 4 light runners x 32 slots answering at once; runs succeeded per"
              f" second, {args.queued // (args.rounds + 1):,} runs per figure")  # fmt: skip
        header = f"{'store':<44} {'runs/s':>22} {'hub start':>10}"
        print(header)
        print("-" * len(header))
        print(f"{'empty (only the ' + format(args.queued, ',') + ' queued runs)':<44}"
              f" {spread(empty['rates']):>22} {empty['recovery_s']:>9.1f}s")
        label = f"{args.finished:,} finished + {args.queued:,} queued"
        print(f"{label:<44} {spread(big['rates']):>22} {big['recovery_s']:>9.1f}s")
        ratio = statistics.median(big["rates"]) / statistics.median(empty["rates"])
        print(f"large store / empty store: {ratio:.2f} (median runs/s);"
              f" filling the large store took {big['filled_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
