"""Liveness under hostile steps: does a busy runner still look alive to its hub?

One hub, the same hostile steps, three runner configurations side by side:

* ``subinterpreter`` and ``process``: Tether's isolation backends;
* ``baseline``: the same runner with its steps on threads of its own main interpreter (what
  Celery's threads pool, taskiq, dramatiq and arq do), built only for this benchmark.

Every slot runs a step that, for ``--seconds``, cycles through C calls that hold the GIL for
about two seconds each (``sum(range(N))``, a catastrophically backtracking ``re``), large
allocations, and a pure-Python loop. Figures are read from the hub (``GET /v1/runners`` and
``/metrics``), never from the runner's own view: heartbeat interval, max and p99 gap, runs
completed, and false deaths (the hub declared the runner dead while it was alive).

    python benchmarks/liveness.py [--seconds 60] [--interval 0.1] [--timeout 1.0] [--slots 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from _common import free_port, hub_up, machine, spawn, stop, wait_for

KINDS = ["c_sum", "regex", "alloc", "python"]


def runners_lost(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tether_runners_lost_total":
                return float(sample.value)
    return 0.0


def runner_view(url: str, runner_id: str) -> dict[str, Any] | None:
    try:
        runners = httpx.get(f"{url}/v1/runners", timeout=5).json()["runners"]
    except httpx.HTTPError:
        return None
    return next((r for r in runners if r["id"] == runner_id), None)


def measure(url: str, config: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    runner_id = f"liveness-{config}"
    common = ["--hub", url, "--slots", str(args.slots), "--runner-id", runner_id]
    if config == "baseline":
        command = ["benchmarks/_baseline_runner.py", "hostile", *common]
    else:
        command = ["-m", "tether", "worker", "hostile", *common, "--log-level", "warning",
                   "--set", f"hostile.hog.isolation={config}"]  # fmt: skip
    lost_before = runners_lost(url)
    proc = spawn(command, logs / f"{config}.log")
    try:
        wait_for(f"the {config} runner to connect", lambda: runner_view(url, runner_id))
        with httpx.Client(base_url=url, timeout=30) as http:
            body = {"function": "hostile.hog", "args": [args.seconds, KINDS]}
            ids = [http.post("/v1/runs", json=body).json()["id"] for _ in range(args.slots)]
            started = time.monotonic()
            # A starved baseline may never finish: give up after twice the work's length.
            deadline = started + args.seconds * 2 + 30
            done: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                views = [http.get(f"/v1/runs/{i}/wait", params={"timeout": "1"}).json()
                         for i in ids]  # fmt: skip
                done = [v for v in views if v["state"] in ("succeeded", "failed")]
                if len(done) == len(ids):
                    break
            elapsed = time.monotonic() - started
        view = wait_for("the runner to be connected", lambda: runner_view(url, runner_id), 60)
        heartbeat = view["heartbeat"]
        chunks: dict[str, int] = {}
        for v in done:
            for kind, n in (v.get("result") or {}).items():
                chunks[kind] = chunks.get(kind, 0) + n
        return {
            "config": config,
            "interval_ms": heartbeat["interval_ms"],
            "max_gap_ms": heartbeat["max_gap_ms"],
            "p99_gap_ms": heartbeat["p99_gap_ms"],
            "heartbeats": heartbeat["count"],
            "runs": f"{sum(v['state'] == 'succeeded' for v in done)}/{len(ids)}",
            "false_deaths": int(runners_lost(url) - lost_before),
            "elapsed_s": elapsed,
            "chunks": chunks,
        }
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="hostile work per slot")
    parser.add_argument("--interval", type=float, default=0.1, help="heartbeat interval (s)")
    parser.add_argument("--timeout", type=float, default=1.0, help="heartbeat timeout (s)")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--configs", default="subinterpreter,process,baseline")
    args = parser.parse_args()

    print("liveness: heartbeats seen by the hub while every slot runs hostile steps")
    print(f"machine:  {machine()}")
    print(f"workload: {args.slots} slots x {args.seconds:g} s of {', '.join(KINDS)} chunks"
          f" (~2 s each, GIL held throughout in C); heartbeat every {args.interval * 1000:g} ms,"
          f" declared dead after {args.timeout * 1000:g} ms of silence")  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="tether-liveness-") as tmp:
        logs = Path(tmp)
        hub = spawn(["-m", "tether", "server", "--port", str(port), "--data-dir", tmp,
                     "--heartbeat-interval", str(args.interval),
                     "--heartbeat-timeout", str(args.timeout), "--log-level", "warning"],
                    logs / "hub.log")  # fmt: skip
        rows = []
        try:
            wait_for("the hub to start", lambda: hub_up(url))
            for config in args.configs.split(","):
                print(f"  running {config} ...", flush=True)
                rows.append(measure(url, config, args, logs))
        finally:
            stop(hub)
    print()
    header = (f"{'configuration':<16} {'interval':>9} {'max gap':>10} {'p99 gap':>10}"
              f" {'heartbeats':>11} {'runs done':>10} {'false deaths':>13}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<16} {r['interval_ms']:>6} ms {r['max_gap_ms']:>7.1f} ms"
              f" {r['p99_gap_ms']:>7.1f} ms {r['heartbeats']:>11} {r['runs']:>10}"
              f" {r['false_deaths']:>13}")  # fmt: skip
    print()
    for r in rows:
        shown = ", ".join(f"{k} x{n}" for k, n in sorted(r["chunks"].items()))
        print(f"{r['config']}: hostile chunks completed: {shown or '-'}"
              f" ({r['elapsed_s']:.1f} s wall)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
