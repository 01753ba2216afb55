"""Helpers shared by the tests: time units, polling, and real hub/runner subprocesses.

Every wait is a poll on a condition with a deadline, never a fixed sleep. Deadlines are
multiples of ``UNIT``, scaled by ``TETHER_TEST_TIMEOUT_FACTOR`` so that a slow machine can
stretch them without editing tests.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

FACTOR = float(os.environ.get("TETHER_TEST_TIMEOUT_FACTOR", "1"))
UNIT = 1.0 * FACTOR  # seconds
TESTS = Path(__file__).parent


def poll[T](
    what: str, check: Callable[[], T], timeout: float = 20 * UNIT, every: float = 0.02
) -> T:
    """Return ``check()``'s first truthy value; AssertionError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    """The environment for a child: tests/ on the path so it imports tests' task modules."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    base["PYTHONPATH"] = os.pathsep.join([str(TESTS), base.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    base["PYTHONUNBUFFERED"] = "1"
    base.update(extra)
    return base


def run_tether(
    *args: str,
    cwd: Path = TESTS,
    environ: dict[str, str] | None = None,
    timeout: float = 60 * UNIT,
) -> subprocess.CompletedProcess[str]:
    """``tether ARGS...`` run to completion as a subprocess, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        env=env() if environ is None else environ,
        cwd=cwd,
        timeout=timeout,
    )


class Proc:
    """A ``tether`` subprocess whose output is kept in a file for assertions and post-mortems."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path, **env_extra: str) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tether", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env(**env_extra),
            cwd=TESTS,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 30 * UNIT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit; output:\n{self.output()}") from None

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        self.popen.wait()
        self._log.close()

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(30 * UNIT)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
        finally:
            self._log.close()


class Cluster:
    """Hubs and runners started as real ``tether`` subprocesses; all stopped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.ca: str | None = None  # CA bundle for a hub serving https
        self.token: str | None = None  # producer token for a hub that needs one
        self._hubs = 0
        self._runners = 0

    def hub(self, *extra: str, heartbeat_interval: float = 0.1, heartbeat_timeout: float = 1.5,
            **env_extra: str) -> Proc:  # fmt: skip
        self._hubs += 1
        proc = Proc(
            f"hub{self._hubs}",
            ["server", "--port", str(self.port), "--data-dir", str(self.tmp / "data"),
             "--heartbeat-interval", str(heartbeat_interval),
             "--heartbeat-timeout", str(heartbeat_timeout), *extra],
            self.tmp, **env_extra,
        )  # fmt: skip
        self.procs.append(proc)
        poll(f"{proc.name} to serve", lambda: not proc.alive() or self.healthy())
        assert proc.alive(), proc.output()
        return proc

    def http(self) -> httpx.Client:
        verify = ssl.create_default_context(cafile=self.ca) if self.ca else True
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, verify=verify, headers=headers, timeout=5)

    def healthy(self) -> bool:
        try:
            with self.http() as http:
                return http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def runner(self, *modules: str, slots: int = 2, wait: bool = True, extra: Sequence[str] = (),
               **env_extra: str) -> Proc:  # fmt: skip
        self._runners += 1
        runner_id = f"runner{self._runners}"
        proc = Proc(
            runner_id,
            ["worker", *modules, "--hub", self.url, "--slots", str(slots),
             "--runner-id", runner_id, "--drain-grace", str(20 * UNIT), *extra],
            self.tmp, **env_extra,
        )  # fmt: skip
        self.procs.append(proc)
        if wait:
            poll(
                f"{runner_id} to connect",
                lambda: not proc.alive() or runner_id in self.runner_ids(),
            )
            assert proc.alive(), proc.output()
        return proc

    def runners(self) -> list[dict[str, Any]]:
        try:
            with self.http() as http:
                response = http.get("/v1/runners")
        except httpx.HTTPError:
            return []
        return list(response.json()["runners"]) if response.status_code == 200 else []

    def runner_ids(self) -> set[str]:
        return {r["id"] for r in self.runners()}

    def metric(self, name: str) -> float:
        """The sum of a metric's samples in the hub's ``/metrics`` (0 if it has none)."""
        with self.http() as http:
            text = http.get("/metrics").text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        )

    def run(self, run_id: str) -> dict[str, Any]:
        with self.http() as http:
            return dict(http.get(f"/v1/runs/{run_id}").json())

    def cli(self, *args: str, timeout: float = 60 * UNIT) -> subprocess.CompletedProcess[str]:
        return run_tether(*args, environ=env(TETHER_HUB=self.url), timeout=timeout)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


async def apoll[T](
    what: str, check: Callable[[], Awaitable[T]], timeout: float = 20 * UNIT, every: float = 0.01
) -> T:
    """:func:`poll` for async checks (an HTTP call to an in-process hub, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await anyio.sleep(every)


def check_table(text: str) -> dict[str, dict[str, str]]:
    """The function table of ``tether worker --check``'s text: row name -> column -> cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("function "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows
