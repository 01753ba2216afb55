"""Shared by throughput.py, latency.py and scale.py: Tether's processes, the peers, figures.

A Tether stack is a real ``tether server`` and ``tether worker`` as subprocesses, as a user runs
them. A peer (Celery, taskiq) is driven by ``benchmarks/peers/driver.py`` running in its own
virtual environment (``.venv-peers``), which :func:`start_peers` bootstraps on first use; the
peers need Redis on loopback, which :func:`ensure_redis` starts when it is not running.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from _common import HERE, ROOT, free_port, hub_up, spawn, stop, wait_for

PEERS = ("celery", "taskiq")
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
REDIS_PORT = 6379
REDIS_DB = {"celery": 14, "taskiq": 15}  # high numbers: keep out of anyone else's way
NOOP = "noop_tasks.noop"


# -- figures ---------------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """``median (min-max)`` of several runs."""
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def print_systems(tether: str, peers: dict[str, Peer], skipped: list[str], width: int) -> None:
    """The lines that say what ran: Tether (``tether`` and the package versions), each peer,
    each peer skipped and why; labels padded to ``width``."""
    print()
    print(f"{'tether:':<{width}} {tether}")
    print(f"{'':<{width}} {versions()}")
    for name, peer in peers.items():
        print(f"{name + ':':<{width}} {peer.version}; Redis on loopback, no persistence")
    for line in skipped:
        print(line)
    print()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) by the nearest-rank method."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def versions() -> str:
    from importlib import metadata

    names = ["tether", "starlette", "uvicorn", "websockets", "httpx"]
    for optional in ("uvloop", "httptools", "orjson"):
        try:
            metadata.version(optional)
            names.append(optional)
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(f"{n} {metadata.version(n)}" for n in names)


# -- Tether ----------------------------------------------------------------------------------


class TetherStack:
    """A hub and (optionally) one runner of the no-op task, as subprocesses."""

    def __init__(
        self,
        data_dir: Path,
        logs: Path,
        *,
        slots: int = 2,
        runner: bool = True,
        hub_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.logs = logs
        self.slots = slots
        self.with_runner = runner
        self.hub_args = list(hub_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hub: subprocess.Popen[bytes] | None = None
        self.runner: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TetherStack:
        try:
            self.hub = spawn(["-m", "tether", "server", "--port", str(self.port),
                              "--data-dir", str(self.data_dir), "--log-level", "warning",
                              *self.hub_args], self.logs / "hub.log")  # fmt: skip
            wait_for("the hub to start", lambda: hub_up(self.url), 120)
            if self.with_runner:
                self.start_runner()
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_runner(self) -> None:
        self.runner = spawn(["-m", "tether", "worker", "noop_tasks", "--hub", self.url,
                             "--slots", str(self.slots), "--runner-id", "bench-runner",
                             "--log-level", "warning"], self.logs / "runner.log")  # fmt: skip
        wait_for("the runner to connect", self._runner_connected, 60)

    def _runner_connected(self) -> bool:
        try:
            runners = httpx.get(f"{self.url}/v1/runners", timeout=5).json()["runners"]
        except httpx.HTTPError:
            return False
        return any(r["id"] == "bench-runner" for r in runners)

    def __exit__(self, *exc: object) -> None:
        for proc in (self.runner, self.hub):
            if proc is not None:
                stop(proc)

    def succeeded(self) -> int:
        return int(httpx.get(f"{self.url}/v1/status", timeout=30).json()["runs"].get(
            "succeeded", 0))  # fmt: skip


# -- peers -----------------------------------------------------------------------------------


def ensure_redis() -> str | None:
    """None when Redis answers on loopback (starting it if needed), else why it cannot."""
    if _redis_ping():
        return None
    server = shutil.which("redis-server")
    if server is None:
        return "redis-server is not installed (apt-get install redis-server)"
    result = subprocess.run(
        [server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(REDIS_PORT),
         "--save", "", "--appendonly", "no"],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        return f"redis-server did not start: {(result.stderr or result.stdout).strip()}"
    try:
        wait_for("Redis to answer", _redis_ping, 10)
    except TimeoutError as exc:
        return str(exc)
    return None


def _redis_ping() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ensure_peers_venv() -> str | None:
    """None when .venv-peers is ready (bootstrapping it if needed), else why it is not."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "bootstrap-peers.sh")], capture_output=True, text=True
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return "cannot set up .venv-peers: " + " | ".join(tail)
    return None


class Peer:
    """One peer's driver process: commands in, JSON figures out."""

    def __init__(self, name: str, logs: Path) -> None:
        self.name = name
        url = f"redis://127.0.0.1:{REDIS_PORT}/{REDIS_DB[name]}"
        self.stderr = (logs / f"{name}-driver.log").open("ab")
        self.proc = subprocess.Popen(
            [str(PEERS_PYTHON), str(HERE / "peers" / "driver.py"), name, "--redis", url,
             "--log", str(logs / f"{name}-worker.log")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )  # fmt: skip
        hello = self._read()
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(hello.get("error", "the driver did not start"))
        self.version: str = hello["version"]
        self.worker_pid: int = hello["worker_pid"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} driver exited (see {self.stderr.name})")
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def start_peers(names: Sequence[str], logs: Path) -> tuple[dict[str, Peer], list[str]]:
    """Start the named peers; returns those that started and one line per peer skipped."""
    peers: dict[str, Peer] = {}
    skipped: list[str] = []
    if not names:
        return peers, skipped
    why = ensure_peers_venv() or ensure_redis()
    if why is not None:
        return peers, [f"{name}: skipped: {why}" for name in names]
    for name in names:
        print(f"  starting {name} ...", flush=True)
        try:
            peers[name] = Peer(name, logs)
        except (RuntimeError, OSError, ValueError) as exc:
            skipped.append(f"{name}: skipped: {exc}")
    return peers, skipped


def peer_names(arg: str) -> list[str]:
    names = [n for n in arg.split(",") if n and n != "none"]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        sys.exit(f"unknown peer {unknown[0]!r}: choose from {', '.join(PEERS)} or none")
    return names
