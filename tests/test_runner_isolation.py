"""The runner's isolation, end to end: real hubs and runners as subprocesses, real
subinterpreters and processes, judged by what the hub sees."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from support import UNIT, Cluster, poll
from tether import Client, TaskError

pytestmark = pytest.mark.slow


def test_gil_holding_steps_never_cost_the_runner_a_heartbeat(cluster: Cluster) -> None:
    # A 50 ms heartbeat, declared dead after 500 ms; each step holds its GIL in C for ~2 s.
    cluster.hub(heartbeat_interval=0.05, heartbeat_timeout=0.5)
    cluster.runner("apps.jobs", slots=2)
    [session] = [r["session_id"] for r in cluster.runners()]
    with Client(cluster.url) as client:
        handles = [
            client.submit("apps.jobs.gil_in_subinterpreter", 2.0),
            client.submit("apps.jobs.gil_in_process", 2.0),
        ]
        chunks = [h.get(timeout=30 * UNIT) for h in handles]
    assert all(n >= 1 for n in chunks)
    [runner] = cluster.runners()
    assert runner["session_id"] == session  # never dropped, never reconnected
    assert cluster.metric("tether_runners_lost_total") == 0
    assert runner["heartbeat"]["max_gap_ms"] < 500
    assert runner["heartbeat"]["count"] >= 2.0 / 0.05 * 0.8


def test_a_timed_out_subinterpreter_step_is_reported_at_once_and_the_runner_restarts(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.hub()
    runner = cluster.runner("apps.jobs", extra=["--max-abandoned", "1"])
    [before] = cluster.runners()
    started, release = tmp_path / "started", tmp_path / "release"
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.stuck_in_subinterpreter", str(release), str(started))
        with pytest.raises(TaskError) as caught:
            handle.get(timeout=20 * UNIT)
        assert caught.value.type == "tether.StepTimeout"
        assert "cannot be interrupted" in caught.value.message
        assert not release.exists()  # reported while the step itself still runs
        # One abandoned unit reaches --max-abandoned 1: the runner drains and re-executes
        # itself (same pid, same id, a new connection).
        after = poll(
            "the runner to come back after re-executing itself",
            lambda: [r for r in cluster.runners() if r["session_id"] != before["session_id"]],
        )
        assert (after[0]["id"], after[0]["pid"]) == (before["id"], before["pid"])
        assert client.submit("apps.jobs.add", 1, 2).get(timeout=20 * UNIT) == 3
    assert "re-executing the runner" in runner.output()


def test_a_timed_out_process_step_is_killed_and_the_runner_carries_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    [before] = cluster.runners()
    started, release = tmp_path / "started", tmp_path / "release"
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.stuck_in_process", str(release), str(started))
        with pytest.raises(TaskError) as caught:
            handle.get(timeout=20 * UNIT)
        assert caught.value.type == "tether.StepTimeout"
        unit_pid = int(started.read_text())
        poll("the timed-out unit process to be gone", lambda: not _alive(unit_pid))
        assert client.submit("apps.jobs.add", 2, 2).get(timeout=20 * UNIT) == 4
    [after] = cluster.runners()
    assert after["session_id"] == before["session_id"]


def test_a_segfault_in_a_process_step_fails_that_run_only(cluster: Cluster) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    with Client(cluster.url) as client:
        with pytest.raises(TaskError) as caught:
            client.submit("apps.jobs.segfault").get(timeout=20 * UNIT)
        assert caught.value.type == "tether.UnitCrashed"
        assert "SIGSEGV" in caught.value.message
        assert client.submit("apps.jobs.add", 3, 4).get(timeout=20 * UNIT) == 7


def test_a_segfault_in_a_subinterpreter_step_ends_its_runner_and_the_run_moves(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.hub()
    first = cluster.runner("apps.jobs")
    second = cluster.runner("apps.jobs")
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.segfault_first", str(tmp_path / "marker"))
        result = handle.get(timeout=30 * UNIT)
        view = handle.status()
    crashed = [r for r in (first, second) if not r.alive()]
    [survivor] = [r for r in (first, second) if r.alive()]
    assert [r.popen.returncode for r in crashed] == [-signal.SIGSEGV]
    assert result == f"survived in pid {survivor.pid}"
    assert (view["state"], view["attempt"]) == ("succeeded", 2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
