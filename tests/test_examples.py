"""The examples, run as a user would run them: from their folder, through the ``tether``
command, with the README's claims checked against what the commands really print."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import TESTS, UNIT, Cluster, env, free_port, poll, run_tether
from support import check_table as table
from tether import Client

ROOT = TESTS.parent
DEPLOYMENT = ROOT / "examples" / "deployment"
FUNCTIONS = ("examples.deployment.tasks.checksum", "examples.deployment.tasks.render")


def user_env(**extra: str) -> dict[str, str]:
    """A user's environment: the repository root (which holds ``examples``) on the path."""
    return env(PYTHONPATH=str(ROOT), **extra)


def tether(*args: str, cwd: Path = DEPLOYMENT, **extra: str) -> subprocess.CompletedProcess[str]:
    return run_tether(*args, cwd=cwd, environ=user_env(**extra))


def readme_block(after: str) -> str:
    """The code block in the deployment README that starts with the line ``after``."""
    text = (DEPLOYMENT / "README.md").read_text()
    start = text.index(after + "\n") + len(after) + 1
    return text[start : text.index("```", start)]


# -- examples/deployment ---------------------------------------------------------------------


def test_deployment_check_shows_how_the_file_tunes_each_function() -> None:
    done = tether("worker", "examples.deployment.tasks", "--check")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"config file: {DEPLOYMENT / 'tether.toml'}"
    rows = table(done.stdout)
    assert list(rows) == list(FUNCTIONS)
    checksum, render = rows[FUNCTIONS[0]], rows[FUNCTIONS[1]]
    assert (checksum["isolation"], checksum["concurrency"], checksum["retries"]) == (
        "subinterpreter",
        "2 [file]",
        "0",
    )
    assert (render["isolation"], render["timeout"], render["retries"]) == (
        "process [file]",
        "30 [file]",
        "2 [file]",
    )
    assert re.search(
        r"^  modules +\[\"examples.deployment.tasks\"\] +arguments$", done.stdout, re.M
    )


def test_deployment_readme_shows_what_check_really_prints() -> None:
    done = tether("worker", "--check")  # the modules come from tether.toml
    assert done.returncode == 0, done.stderr
    shown = done.stdout.replace(str(DEPLOYMENT), "/path/to/examples/deployment")
    assert readme_block("$ tether worker --check") == shown


def test_deployment_environment_beats_the_file_and_flags_beat_both() -> None:
    by_env = json.loads(tether("worker", "--check", "--json", TETHER_SLOTS="8").stdout)
    assert by_env["settings"]["slots"] == {"value": 8, "source": "env TETHER_SLOTS"}
    assert by_env["settings"]["modules"] == {
        "value": ["examples.deployment.tasks"],
        "source": str(DEPLOYMENT / "tether.toml"),
    }
    by_flag = json.loads(
        tether("worker", "--check", "--json", "--slots", "2", TETHER_SLOTS="8").stdout
    )
    assert by_flag["settings"]["slots"] == {"value": 2, "source": "flag --slots"}

    shown = tether("config", "show", TETHER_SLOTS="8")
    assert shown.returncode == 0, shown.stderr
    path = str(DEPLOYMENT / "tether.toml")
    assert re.search(rf"^port = 7979 +# {re.escape(path)}$", shown.stdout, re.M)
    assert re.search(r"^slots = 8 +# env TETHER_SLOTS$", shown.stdout, re.M)

    wrong = tether("worker", "--check", TETHER_SLOTS="eight")
    assert wrong.returncode == 2
    assert readme_block("$ TETHER_SLOTS=eight tether worker --check") == wrong.stderr


class Started:
    """``tether`` subprocesses started from a folder; killed at teardown if still running."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def __call__(self, *args: str, cwd: Path, **extra: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"{args[0]}-{len(self.procs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "tether", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=user_env(**extra),
                cwd=cwd,
            )
        self.procs.append((popen, log))
        return popen

    def output(self, popen: subprocess.Popen[bytes]) -> str:
        return next(log.read_text() for p, log in self.procs if p is popen)

    def close(self) -> None:
        for popen, _ in reversed(self.procs):
            if popen.poll() is None:
                popen.kill()
            popen.wait()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Started]:
    procs = Started(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


def runners(url: str) -> list[dict[str, Any]]:
    try:
        return list(httpx.get(f"{url}/v1/runners", timeout=2).json()["runners"])
    except httpx.HTTPError:
        return []


@pytest.mark.slow
def test_deployment_serves_a_run_end_to_end(started: Started, tmp_path: Path) -> None:
    """The README's commands, in the example's folder. The environment moves the port and the
    data off the file's values, so the test cannot collide with anything on 7979."""
    url = f"http://127.0.0.1:{free_port()}"
    moved = {
        "TETHER_PORT": url.rsplit(":", 1)[1],
        "TETHER_HUB": url,
        "TETHER_DATA_DIR": str(tmp_path / "data"),
    }
    hub = started("server", cwd=DEPLOYMENT, **moved)
    worker = started("worker", cwd=DEPLOYMENT, **moved)
    seen = poll(
        "the runner to connect",
        lambda: runners(url) or hub.poll() is not None or worker.poll() is not None,
    )
    assert hub.poll() is None, started.output(hub)
    assert worker.poll() is None, started.output(worker)
    [runner] = seen
    assert runner["slots"] == 4  # from the file
    assert runner["heartbeat"]["interval_ms"] == 500  # the file's [server] heartbeat_interval

    done = tether("submit", FUNCTIONS[0], "hello", "--wait", **moved)
    assert done.returncode == 0, done.stderr
    data = b"hello"
    for _ in range(10_000):
        data = hashlib.sha256(data).digest()
    assert json.loads(done.stdout) == data.hex()
    rendered = tether(
        "submit",
        FUNCTIONS[1],
        "$who runs $what",
        "-k",
        'values={"who": "tether", "what": "this"}',
        "--wait",
        **moved,
    )
    assert rendered.stdout.strip() == '"tether runs this"', rendered.stderr

    status = tether("status", **moved)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "runners: 1"
    assert lines[2].split()[3:5] == ["0/4", "500"]
    assert re.search(rf"^  {re.escape(FUNCTIONS[0])} +subinterpreter +auto: ", status.stdout, re.M)
    assert re.search(rf"^  {re.escape(FUNCTIONS[1])} +process +configured$", status.stdout, re.M)
    assert "runs: succeeded=2" in lines

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30 * UNIT) == 0, started.output(worker)
    hub.send_signal(signal.SIGTERM)
    assert hub.wait(30 * UNIT) == 0, started.output(hub)
    assert (tmp_path / "data" / "tether.db").exists()
    assert not (DEPLOYMENT / ".tether").exists()  # TETHER_DATA_DIR beat the file's data_dir


# -- examples/isolation ----------------------------------------------------------------------

WHERE = {
    "examples.isolation.numeric.zscores": ("auto", "process"),
    "examples.isolation.tasks.count_primes": ("subinterpreter", "subinterpreter"),
    "examples.isolation.tasks.mean": ("process", "process"),
    "examples.isolation.tasks.summarize": ("auto", "subinterpreter"),
}


def test_isolation_show_prints_where_each_function_runs_and_why() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.isolation.show"],
        capture_output=True,
        text=True,
        env=user_env(),
        cwd=ROOT,
        timeout=60 * UNIT,
    )
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert re.split(r"\s{2,}", header) == ["function", "configured", "runs in", "why"]
    rows = {
        cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line, maxsplit=3) for line in lines)
    }
    assert {name: (row[0], row[1]) for name, row in rows.items()} == WHERE
    assert rows["examples.isolation.tasks.count_primes"][2] == "configured"
    assert rows["examples.isolation.tasks.summarize"][2] == (
        "auto: examples.isolation.tasks loads in an isolated subinterpreter"
    )
    numeric = rows["examples.isolation.numeric.zscores"][2]
    assert numeric.startswith(
        "auto: examples.isolation.numeric cannot load in an isolated"
        " subinterpreter (ImportError: module numpy."
    )
    assert numeric.endswith("does not support loading in subinterpreters)")


@pytest.mark.slow
def test_isolation_tasks_run_where_show_says(cluster: Cluster) -> None:
    cluster.hub()
    cluster.runner(
        "examples.isolation.tasks",
        "examples.isolation.numeric",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]),
    )
    with Client(cluster.url) as client:

        def run(function: str, *args: Any) -> Any:
            return client.submit(f"examples.isolation.{function}", *args).get(timeout=20 * UNIT)

        assert run("tasks.count_primes", 100) == 25
        assert run("tasks.mean", [1, 2, 3, 4]) == 2.5
        summary = run("tasks.summarize", [1, 2, 3, 4])
        assert summary == {"median": 2.5, "stdev": pytest.approx(1.2909944)}
        assert run("numeric.zscores", [1, 2, 3]) == pytest.approx([-1.2247449, 0.0, 1.2247449])
    [runner] = cluster.runners()
    served = {
        f["name"]: (f["options"]["configured_isolation"], f["isolation"])
        for f in runner["functions"]
    }
    assert served == WHERE
