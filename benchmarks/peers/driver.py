"""Drives one peer task runner (Celery or taskiq) for Tether's benchmarks.

Runs with the peers' virtual environment (``.venv-peers``, see ``scripts/bootstrap-peers.sh``),
never with Tether's. It starts the peer's worker, warms it up, then answers commands, one JSON
object per line on stdin, with one JSON object per line on stdout (logs go to stderr)::

    {"op": "throughput", "n": 5000, "mode": "single"}  ->  {"submit_s": .., "total_s": ..}
    {"op": "latency", "n": 300}                          ->  {"trips_ms": [...]}
    {"op": "quit"}

Both peers use Redis on loopback as broker and result backend, with the worker of each one's
usual production shape: Celery prefork with concurrency 2; taskiq one worker process with two
concurrent tasks. What each figure times:

* ``throughput``: from the first submit to the moment all ``n`` results are stored in Redis
  (the last result waited for the peer's own way, then one ``EXISTS`` over every result key,
  repeated each millisecond until it counts ``n``); ``submit_s`` stops when the last submit
  call returned. ``single``: one message per call (Celery ``delay()`` in a loop; taskiq
  ``kiq()`` with up to 32 calls in flight, as Tether's producer). ``batch``: Celery
  ``group(...).apply_async()``; taskiq has no batch API, so all ``kiq()`` calls at once.
* ``latency``: submit one run and wait for its result, ``n`` times in a row (Celery
  ``delay().get()``, which waits on the result backend's pub/sub; taskiq ``kiq()`` then
  ``wait_result(check_interval=0.001)``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lanes import bounded

HERE = Path(__file__).resolve().parent
IN_FLIGHT = 32  # single submits in flight at once, as Tether's producer uses
POLL = 0.001  # seconds between result checks where a peer can only poll


def log(text: str) -> None:
    print(f"driver: {text}", file=sys.stderr, flush=True)


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["BENCH_REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    return env


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class CeleryPeer:
    name = "celery"

    def __init__(self, redis_url: str, log_path: Path) -> None:
        import celery_app

        self.redis_url = redis_url
        self.log_path = log_path
        self.app = celery_app.app
        self.noop = celery_app.noop
        self.redis = self.app.backend.client
        self.proc: subprocess.Popen[bytes] | None = None

    def version(self) -> str:
        return f"celery {metadata.version('celery')} (prefork, concurrency 2), kombu" \
               f" {metadata.version('kombu')}, redis-py {metadata.version('redis')}"  # fmt: skip

    def start(self) -> int:
        self.app.control.purge()
        command = [sys.executable, "-m", "celery", "-A", "celery_app", "worker",
                   "--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING",
                   "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                         env=worker_env(self.redis_url), cwd=HERE)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the celery worker exited; see {self.log_path}")
            try:
                self.noop.delay().get(timeout=2)
                break
            except Exception as exc:  # not up yet: a timeout, a connection error
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the celery worker did not answer: {exc}") from exc
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_worker(self.proc)

    def throughput(self, n: int, mode: str) -> dict[str, Any]:
        from celery import group

        started = time.perf_counter()
        if mode == "single":
            results = [self.noop.delay() for _ in range(n)]
        else:
            results = list(group(self.noop.s() for _ in range(n)).apply_async().results)
        submitted = time.perf_counter()
        results[-1].get(timeout=600)
        keys = [f"celery-task-meta-{r.id}" for r in results]
        while self.redis.exists(*keys) < n:
            time.sleep(POLL)
        finished = time.perf_counter()
        ok = sum(json.loads(v)["status"] == "SUCCESS" for v in self.redis.mget(keys))
        self.redis.delete(*keys)
        return {"submit_s": submitted - started, "total_s": finished - started, "ok": ok}

    def latency(self, n: int) -> dict[str, Any]:
        trips = []
        for _ in range(n):
            started = time.perf_counter()
            result = self.noop.delay()
            result.get(timeout=30)
            trips.append((time.perf_counter() - started) * 1000)
            result.forget()
        return {"trips_ms": trips}


class TaskiqPeer:
    name = "taskiq"

    def __init__(self, redis_url: str, log_path: Path) -> None:
        import redis.asyncio
        import taskiq_app

        self.redis_url = redis_url
        self.log_path = log_path
        self.broker = taskiq_app.broker
        self.noop = taskiq_app.noop
        self.redis = redis.asyncio.Redis.from_url(redis_url)
        self.proc: subprocess.Popen[bytes] | None = None

    def version(self) -> str:
        return f"taskiq {metadata.version('taskiq')} (1 worker process, 2 async tasks)," \
               f" taskiq-redis {metadata.version('taskiq-redis')}," \
               f" redis-py {metadata.version('redis')}"  # fmt: skip

    def spawn(self) -> None:
        """Start the worker (before the event loop: it only has to be running by start())."""
        import redis

        redis.Redis.from_url(self.redis_url).delete("taskiq_bench")  # left from an aborted run
        command = [
            sys.executable,
            "-m",
            "taskiq",
            "worker",
            "taskiq_app:broker",
            "--workers",
            "1",
            "--max-async-tasks",
            "2",
            "--log-level",
            "WARNING",
        ]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                         env=worker_env(self.redis_url), cwd=HERE)  # fmt: skip

    async def start(self) -> int:
        assert self.proc is not None
        await self.broker.startup()
        task = await self.noop.kiq()
        deadline = time.monotonic() + 60
        while not await task.is_ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the taskiq worker exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError("the taskiq worker did not answer within 60 s")
            await asyncio.sleep(0.05)
        return self.proc.pid

    async def stop(self) -> None:
        await self.broker.shutdown()
        if self.proc is not None:
            stop_worker(self.proc)

    async def throughput(self, n: int, mode: str) -> dict[str, Any]:
        started = time.perf_counter()
        if mode == "single":
            tasks = await bounded([self.noop.kiq] * n, IN_FLIGHT)
        else:
            tasks = await asyncio.gather(*(self.noop.kiq() for _ in range(n)))
        submitted = time.perf_counter()
        await tasks[-1].wait_result(check_interval=POLL, timeout=600)
        keys = [t.task_id for t in tasks]
        while await self.redis.exists(*keys) < n:  # noqa: ASYNC110 - polling Redis is the point
            await asyncio.sleep(POLL)
        finished = time.perf_counter()
        load = self.broker.result_backend.serializer.loadb
        ok = sum(not load(v)["is_err"] for v in await self.redis.mget(keys))
        await self.redis.delete(*keys)
        return {"submit_s": submitted - started, "total_s": finished - started, "ok": ok}

    async def latency(self, n: int) -> dict[str, Any]:
        trips = []
        keys = []
        for _ in range(n):
            started = time.perf_counter()
            task = await self.noop.kiq()
            await task.wait_result(check_interval=POLL, timeout=30)
            trips.append((time.perf_counter() - started) * 1000)
            keys.append(task.task_id)
        await self.redis.delete(*keys)
        return {"trips_ms": trips}


async def serve_async(peer: TaskiqPeer) -> None:
    loop = asyncio.get_running_loop()
    pid = await peer.start()
    reply({"ready": True, "version": peer.version(), "worker_pid": pid})
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            if command["op"] == "throughput":
                reply(await peer.throughput(command["n"], command["mode"]))
            elif command["op"] == "latency":
                reply(await peer.latency(command["n"]))
            else:
                break
    finally:
        await peer.stop()


def serve_sync(peer: CeleryPeer) -> None:
    pid = peer.start()
    reply({"ready": True, "version": peer.version(), "worker_pid": pid})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "throughput":
                reply(peer.throughput(command["n"], command["mode"]))
            elif command["op"] == "latency":
                reply(peer.latency(command["n"]))
            else:
                break
    finally:
        peer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("system", choices=["celery", "taskiq"])
    parser.add_argument("--redis", required=True, help="redis://host:port/db for this peer")
    parser.add_argument("--log", required=True, type=Path, help="the worker's log file")
    args = parser.parse_args()
    os.environ["BENCH_REDIS_URL"] = args.redis
    sys.path.insert(0, str(HERE))
    try:
        if args.system == "celery":
            serve_sync(CeleryPeer(args.redis, args.log))
        else:
            peer = TaskiqPeer(args.redis, args.log)
            peer.spawn()
            asyncio.run(serve_async(peer))
    except Exception as exc:
        reply({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
