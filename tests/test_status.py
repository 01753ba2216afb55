"""``tether status``: what a live hub knows about its runners, their heartbeats, the functions
they serve and where those run, queue depths and runs by state, as text, JSON and ``--watch``.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from support import TESTS, UNIT, Cluster, env, free_port, poll
from tether import Client, TaskError
from tether.cli import main


def status_json(cluster: Cluster) -> dict[str, Any]:
    done = cluster.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def status_text(cluster: Cluster) -> str:
    done = cluster.cli("status")
    assert done.returncode == 0, done.stderr
    return done.stdout


def runner_row(text: str) -> list[str]:
    [row] = [line.split() for line in text.splitlines() if line.startswith("  runner1 ")]
    return row


@pytest.mark.slow
def test_status_shows_runners_heartbeats_functions_queues_and_runs(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.hub()
    runner = cluster.runner("apps.jobs", slots=2)
    started, release = tmp_path / "started", tmp_path / "release"
    with Client(cluster.url) as client:
        assert client.submit("apps.jobs.add", 2, 3).get(timeout=20 * UNIT) == 5
        with pytest.raises(TaskError):
            client.submit("apps.jobs.boom", "on purpose").get(timeout=20 * UNIT)
        # No runner serves add on "nightly": the run waits there, counted in that queue.
        client.apply("apps.jobs.add", [1, 1], queue="nightly")
        holding = client.submit("apps.jobs.wait_for", str(release), str(started))
        poll("the held step to start", started.exists)

        busy = poll(
            "the hub to count the held step",
            lambda: (s := status_json(cluster))["runs"].get("running") and s,
        )
        [seen] = busy["runners"]
        assert (seen["id"], seen["host"], seen["pid"]) == (
            "runner1",
            socket.gethostname(),
            runner.pid,
        )
        assert (seen["slots"], seen["free_slots"], seen["draining"]) == (2, 1, False)
        heartbeat = seen["heartbeat"]
        assert heartbeat["interval_ms"] == 100
        assert heartbeat["count"] > 0
        assert 0 <= heartbeat["last_age_ms"] < 1500  # under the hub's heartbeat timeout
        assert heartbeat["max_gap_ms"] >= heartbeat["p99_gap_ms"] > 0
        assert busy["runs"] == {"succeeded": 1, "failed": 1, "queued": 1, "running": 1}
        assert busy["queues"]["nightly"] == 1
        functions = busy["functions"]
        assert {"apps.jobs.add", "apps.jobs.boom", "apps.jobs.flaky"} <= set(functions)
        add = functions["apps.jobs.add"]
        assert add["isolation"] == "subinterpreter"
        assert add["reason"] == "auto: apps.jobs loads in an isolated subinterpreter"
        assert add["options"]["configured_isolation"] == "auto"
        assert (
            functions["apps.jobs.boom"]["isolation"],
            functions["apps.jobs.boom"]["reason"],
        ) == ("process", "configured")
        assert functions["apps.jobs.flaky"]["retries"] == 3

        text = status_text(cluster)
        assert text.splitlines()[0] == "runners: 1"
        header = text.splitlines()[1].split()
        assert header == "id host pid busy/slots hb ms last ms max gap".split()
        row = runner_row(text)
        assert row[:5] == ["runner1", socket.gethostname()[:16], str(runner.pid), "1/2", "100"]
        last_ms, max_gap = float(row[5]), float(row[6])
        assert 0 <= last_ms < 1500 and max_gap > 0
        assert f"functions: {len(functions)}" in text.splitlines()
        assert re.search(
            r"^  apps\.jobs\.add +subinterpreter +auto: apps\.jobs loads in an"
            r" isolated subinterpreter$",
            text,
            re.M,
        )
        assert re.search(r"^  apps\.jobs\.boom +process +configured$", text, re.M)
        assert re.search(r"^queues: (.*, )?nightly=1(, .*)?$", text, re.M)
        assert "runs: failed=1, queued=1, running=1, succeeded=1" in text.splitlines()

        release.write_text("go")
        assert holding.get(timeout=20 * UNIT) == "released"
    idle = poll(
        "the slot to be free again",
        lambda: runner_row(t) if "0/2" in runner_row(t := status_text(cluster)) else None,
    )
    assert idle[3] == "0/2"
    assert status_json(cluster)["runs"] == {"succeeded": 2, "failed": 1, "queued": 1}


class Lines:
    """A child's stdout, read line by line on a thread, so the test can poll it."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert popen.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(popen.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def count(self, text: str) -> int:
        return sum(1 for line in list(self.lines) if line == text)


@pytest.mark.slow
def test_status_watch_refreshes_until_interrupted(cluster: Cluster) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    watch = subprocess.Popen(
        [sys.executable, "-m", "tether", "status", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(TETHER_HUB=cluster.url),
        cwd=TESTS,
    )
    try:
        out = Lines(watch)
        poll("two refreshes", lambda: out.count("runners: 1") >= 2)
        assert out.count("runs: -") >= 2  # nothing has run yet
        with Client(cluster.url) as client:
            assert client.submit("apps.jobs.add", 1, 2).get(timeout=20 * UNIT) == 3
        poll("a refresh that shows the run", lambda: out.count("runs: succeeded=1"))
        watch.send_signal(signal.SIGINT)  # Ctrl-C ends the watch cleanly
        assert watch.wait(20 * UNIT) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
        watch.wait()
        for stream in (watch.stdout, watch.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.slow
def test_status_json_watch_prints_one_document_per_refresh(cluster: Cluster) -> None:
    cluster.hub()
    watch = subprocess.Popen(
        [sys.executable, "-m", "tether", "status", "--json", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env(TETHER_HUB=cluster.url),
        cwd=TESTS,
    )
    try:
        out = Lines(watch)
        poll("two documents", lambda: out.count("}") >= 2)  # each ends with an unindented }
        first = "\n".join(out.lines[: out.lines.index("}") + 1])
        assert json.loads(first) == {"runners": [], "functions": {}, "queues": {}, "runs": {}}
    finally:
        watch.kill()
        watch.wait()
        if watch.stdout is not None:
            watch.stdout.close()


@pytest.mark.slow
def test_status_finds_the_hub_in_the_config_file(cluster: Cluster, tmp_path: Path) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    (tmp_path / "tether.toml").write_text(f'[worker]\nhub = "{cluster.url}"\n')
    found = subprocess.run(
        [sys.executable, "-m", "tether", "status", "--json"],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
        timeout=30 * UNIT,
    )
    assert found.returncode == 0, found.stderr
    assert [r["id"] for r in json.loads(found.stdout)["runners"]] == ["runner1"]

    elsewhere = f"http://127.0.0.1:{free_port()}"  # TETHER_HUB beats the file
    refused = subprocess.run(
        [sys.executable, "-m", "tether", "status"],
        capture_output=True,
        text=True,
        env=env(TETHER_HUB=elsewhere),
        cwd=tmp_path,
        timeout=30 * UNIT,
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"Error: cannot reach the hub at {elsewhere}")


def test_status_against_no_hub_is_one_clear_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "tether", "status", "--hub", url],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
        timeout=30 * UNIT,
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"Error: cannot reach the hub at {url}")


def test_status_watch_must_not_be_negative() -> None:
    result = CliRunner().invoke(main, ["status", "--watch", "-1"])
    assert result.exit_code == 2
    assert "Invalid value for '--watch'" in result.stderr
