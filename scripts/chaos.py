"""``make chaos``: a bounded soak that breaks things on purpose and counts what survived.

A hub and three runners (one reached through a TCP proxy that can partition it) run as real
subprocesses. A producer submits steadily while faults are injected at random: runners killed
with SIGKILL or drained with SIGTERM and restarted, the hub killed with SIGKILL and restarted,
the proxied runner cut off without a close. At the end every answered submit must be finished
exactly once in the store. Executions are counted from the steps' own log, so the report
shows how often at-least-once delivery ran a step twice (after a runner was killed between
finishing a step and its result being stored).

    python scripts/chaos.py [--minutes 2] [--seed N]
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from proxy import Proxy, proxy_to  # noqa: E402
from support import Cluster, Proc, poll  # noqa: E402
from tether import Client, HubUnavailable, WaitTimeout  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="how long to inject faults")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rate", type=float, default=40.0, help="submits per second")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="tether-chaos-") as tmp:
        return soak(Path(tmp), args, rng, seed)


def soak(tmp: Path, args: argparse.Namespace, rng: random.Random, seed: int) -> int:
    cluster = Cluster(tmp)
    executions = tmp / "executions.log"
    faults: collections.Counter[str] = collections.Counter()
    answered: dict[str, str] = {}  # run id -> key
    refused = 0
    stop = threading.Event()
    print(f"chaos: {args.minutes:g} min of faults, {args.rate:g} submits/s, seed {seed}")
    hub = cluster.hub(heartbeat_interval=0.2, heartbeat_timeout=1.5)
    with proxy_to(cluster.port) as proxy:
        runners: dict[str, Proc] = {}

        def start(name: str) -> None:
            hub_url = f"http://127.0.0.1:{proxy.port}" if name == "proxied" else cluster.url
            proc = cluster.runner("apps.chaos", slots=2, wait=False,
                                  extra=["--hub", hub_url, "--runner-id", name])  # fmt: skip
            runners[name] = proc

        for name in ("a", "b", "proxied"):
            start(name)
        poll("three runners", lambda: len(cluster.runner_ids()) == 3, timeout=60)

        def produce() -> None:
            nonlocal refused
            with Client(cluster.url, timeout=3) as client:
                while not stop.is_set():
                    key = uuid.uuid4().hex
                    function = rng.choice(["apps.chaos.in_subinterpreter", "apps.chaos.in_process"])
                    try:
                        handle = client.submit(function, str(executions), key, 0.2)
                        answered[handle.id] = key
                    except HubUnavailable:
                        refused += 1
                    stop.wait(1 / args.rate)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(2, 6))
            fault = rng.choice(["runner SIGKILL", "runner SIGTERM", "hub SIGKILL", "partition"])
            faults[fault] += 1
            print(f"  {time.strftime('%H:%M:%S')} {fault}", flush=True)
            if fault == "hub SIGKILL":
                hub.signal(signal.SIGKILL)
                hub.wait()
                hub = cluster.hub(heartbeat_interval=0.2, heartbeat_timeout=1.5)
            elif fault == "partition":
                partition(proxy, rng)
            else:
                name = rng.choice(["a", "b"])
                runners[name].signal(
                    signal.SIGKILL if fault == "runner SIGKILL" else signal.SIGTERM
                )
                runners[name].wait(timeout=60)
                start(name)
        stop.set()
        producer.join()
        print("faults stopped; waiting for every answered run to finish ...", flush=True)
        states = collections.Counter[str]()
        unfinished = []
        with Client(cluster.url) as client:
            for run_id in answered:
                try:
                    states[client.wait(run_id, timeout=120)["state"]] += 1
                except WaitTimeout:
                    unfinished.append(run_id)
        cluster.close()

    counts = collections.Counter(executions.read_text().split()) if executions.exists() else {}
    keys = set(answered.values())
    executed_twice = sum(1 for key in keys if counts.get(key, 0) > 1)
    never_executed = sum(1 for key in keys if counts.get(key, 0) == 0)
    lost = len(unfinished) + states["failed"] + states["cancelled"]
    print()
    print(f"runs submitted (answered)       {len(answered)}")
    print(f"submits refused (hub down)      {refused}")
    print(f"runs finished (succeeded)       {states['succeeded']}")
    print(f"runs failed                     {states['failed']}")
    print(f"runs lost (not finished)        {len(unfinished)}")
    print(f"runs executed more than once    {executed_twice}  (at-least-once after a kill)")
    print(f"succeeded but no execution seen {never_executed if states['succeeded'] else 0}")
    print("faults injected                 " + ", ".join(f"{k} x{n}" for k, n in faults.items()))
    return 1 if lost or never_executed else 0


def partition(proxy: Proxy, rng: random.Random) -> None:
    proxy.partition()
    time.sleep(rng.uniform(0.5, 3.0))  # the length of the outage is the fault itself
    proxy.heal()


if __name__ == "__main__":
    sys.exit(main())
