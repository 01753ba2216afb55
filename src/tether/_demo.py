"""``tether demo``: a hub and a runner as real subprocesses, the quickstart tasks run through
them, results printed, everything stopped cleanly. Run it from the repository root (it serves
``examples.quickstart.tasks``)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import click

from .client import Client
from .exceptions import HubUnavailable, TaskError

MODULE = "examples.quickstart.tasks"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _poll(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], name: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    click.echo(f"  {name} exited with code {proc.returncode}")


def run_demo(batch: int = 200) -> int:
    sys.path.insert(0, os.getcwd())
    if importlib.util.find_spec("examples") is None:
        click.echo("tether demo: run it from the repository root (examples/ not found)", err=True)
        return 2
    port = _free_port()
    hub_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tether"]
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as data_dir:
        click.echo(f"starting a hub on {hub_url} (SQLite in {data_dir})")
        hub = subprocess.Popen(
            [*command, "server", "--port", str(port), "--data-dir", data_dir,
             "--heartbeat-interval", "0.2", "--heartbeat-timeout", "2", "--log-level", "warning"]
        )  # fmt: skip
        runner = None
        try:
            client = Client(hub_url)

            def hub_up() -> bool:
                try:
                    client.runners()
                    return True
                except HubUnavailable:
                    return False

            _poll("the hub starting", hub_up)
            click.echo(f"starting a runner for {MODULE} (4 slots)")
            runner = subprocess.Popen(
                [*command, "worker", MODULE, "--hub", hub_url, "--slots", "4",
                 "--log-level", "warning"]
            )  # fmt: skip
            _poll("the runner connecting", lambda: len(client.runners()) == 1)
            for fn in client.runners()[0]["functions"]:
                click.echo(f"  {fn['name']}: {fn['isolation']} ({fn['reason']})")
            _show(client)
            click.echo(f"\nsubmitting {batch} runs of add in one batch")
            handles = client.submit_many(f"{MODULE}.add", [(i, i) for i in range(batch)])
            start = time.perf_counter()
            with click.progressbar(handles, label="  results") as bar:
                total = sum(h.get(timeout=60) for h in bar)
            elapsed = time.perf_counter() - start
            click.echo(f"  sum of results: {total} (expected {sum(2 * i for i in range(batch))})")
            click.echo(f"  {batch} runs finished in {elapsed:.2f}s")
            runner_view = client.runners()[0]
            hb = runner_view["heartbeat"]
            click.echo(
                f"\nheartbeats seen by the hub: {hb['count']}, every {hb['interval_ms']} ms,"
                f" largest gap {hb['max_gap_ms']:.1f} ms"
            )
            client.close()
        finally:
            click.echo("\nstopping")
            if runner is not None:
                _stop(runner, "runner")
            _stop(hub, "hub")
    return 0


def _show(client: Client) -> None:
    calls: list[tuple[str, list[Any]]] = [
        ("add", [2, 3]),
        ("greet", ["world"]),
        ("digest", ["tether", 200_000]),
        ("divide", [7, 2]),
        ("divide", [1, 0]),
    ]
    handles = [(name, args, client.apply(f"{MODULE}.{name}", args)) for name, args in calls]
    click.echo("")
    for name, args, handle in handles:
        shown = f"{name}({', '.join(map(repr, args))})"
        try:
            click.echo(f"  {shown} = {handle.get(timeout=60)!r}")
        except TaskError as exc:
            click.echo(f"  {shown} raised {exc.type}: {exc.message}")
