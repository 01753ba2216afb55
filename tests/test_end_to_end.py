"""End to end: ``tether server`` and ``tether worker`` as real subprocesses on loopback,
driven through the CLI, the client and ``task.delay()``."""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path

import httpx
import pytest

import tether.client
from support import UNIT, Cluster, poll
from tether import AsyncClient, Client, TaskCancelled, TaskError

pytestmark = pytest.mark.slow


def test_cli_client_and_delay_round_trip(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")

    done = cluster.cli("submit", "apps.jobs.add", "2", "3", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5"

    queued = cluster.cli("submit", "apps.jobs.add", "40", "2")
    run_id = queued.stdout.strip()
    shown = cluster.cli("result", run_id, "--wait", "--timeout", str(20 * UNIT))
    assert (shown.returncode, shown.stdout.strip()) == (0, "42")

    with Client(cluster.url) as client:
        assert client.submit("apps.jobs.add", 1, y=2).get(timeout=20 * UNIT) == 3

    monkeypatch.setenv("TETHER_HUB", cluster.url)
    from apps.jobs import add

    assert add(1, 1) == 2  # still a plain function when called directly
    try:
        assert add.delay(20, 22).get(timeout=20 * UNIT) == 42
    finally:
        add.app.close()

    status = json.loads(cluster.cli("status", "--json").stdout)
    [runner] = status["runners"]
    assert runner["id"] == "runner1"
    assert runner["heartbeat"]["count"] > 0
    assert status["runs"]["succeeded"] == 4


@pytest.mark.anyio
async def test_delay_async(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    monkeypatch.setenv("TETHER_HUB", cluster.url)
    from apps.jobs import add

    try:
        handle = await add.delay_async(2, 3)
        assert await handle.get(timeout=20 * UNIT) == 5
    finally:
        await add.app.aclose()


def test_task_error_comes_back_with_type_message_and_traceback(cluster: Cluster) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    with Client(cluster.url) as client:
        with pytest.raises(TaskError) as caught:
            client.submit("apps.jobs.boom", "it broke").get(timeout=20 * UNIT)
    error = caught.value
    assert (error.type, error.message) == ("ValueError", "it broke")
    assert "raise ValueError(message)" in error.traceback
    assert "it broke" in str(error)

    failed = cluster.cli("submit", "apps.jobs.boom", "again", "--wait")
    assert failed.returncode == 1
    assert "ValueError: again" in failed.stderr


def test_call_submits_and_waits_in_one_request(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    with Client(cluster.url) as client:
        assert client.call("apps.jobs.add", 1, y=2) == 3
        with pytest.raises(TaskError, match="it broke"):
            client.call("apps.jobs.boom", "it broke")

        # Plain HTTP: ?wait=S answers with the whole run once it finished, or as it is when
        # S passes; a bad value is refused before anything is stored.
        runs = f"{cluster.url}/v1/runs"
        finished = httpx.post(runs, params={"wait": "20"}, json=run_of("add", 2, 3)).json()
        assert (finished["state"], finished["result"]) == ("succeeded", 5)
        assert httpx.get(f"{runs}/{finished['id']}").json() == finished
        started, release = tmp_path / "started", tmp_path / "release"
        body = run_of("wait_for", str(release), str(started))
        pending = httpx.post(runs, params={"wait": "0.05"}, json=body).json()
        assert pending["state"] in ("queued", "running") and "result" not in pending
        before = client.status()["runs"]
        bad = httpx.post(runs, params={"wait": "-1"}, json=run_of("add", 1, 1))
        assert bad.status_code == 400
        assert bad.json()["error"] == "wait must be a finite number >= 0, got '-1'"
        assert client.status()["runs"] == before
        release.write_text("go")
        assert client.wait(pending["id"], timeout=20 * UNIT)["result"] == "released"

        # A run longer than call()'s submit waits: it goes on waiting for it.
        monkeypatch.setattr(tether.client, "_CALL_WAIT", 0.1)
        started.unlink()
        release.unlink()
        slow = threading.Thread(
            target=lambda: poll("a step", started.exists) and release.write_text("go")
        )
        slow.start()
        assert client.call("apps.jobs.wait_for", str(release), str(started)) == "released"
        slow.join()


def test_runs_sent_together_travel_within_the_message_limit(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Two 40 kB arguments or results in one message would be 80 kB, over this hub's 64 KiB:
    # runs dispatched together, and outcomes that finish together, go in as many messages as
    # the limit asks for.
    cluster.hub(TETHER_MAX_MESSAGE_BYTES=str(64 * 1024))
    runner = cluster.runner("apps.jobs", slots=2)
    with Client(cluster.url) as client:
        results = client.submit_many("apps.jobs.text", [(40_000,)] * 12)
        assert [len(h.get(timeout=20 * UNIT)) for h in results] == [40_000] * 12
        # Both slots busy: the runs queue at the hub and go out together once they free.
        release = tmp_path / "release"
        blockers = [client.submit("apps.jobs.wait_for", str(release), str(tmp_path / f"s{i}"))
                    for i in range(2)]  # fmt: skip
        poll("both slots to be busy", lambda: all((tmp_path / f"s{i}").exists() for i in (0, 1)))
        arguments = [client.submit("apps.jobs.length", "y" * 40_000) for _ in range(12)]
        release.write_text("go")
        assert [h.get(timeout=20 * UNIT) for h in blockers] == ["released"] * 2
        assert [h.get(timeout=20 * UNIT) for h in arguments] == [40_000] * 12
        # A result that cannot fit a message at all is the run's error, not a connection the
        # hub closes (again after every reconnect), and the runner carries on.
        with pytest.raises(TaskError) as too_big:
            client.submit("apps.jobs.text", 100_000).get(timeout=20 * UNIT)
        assert too_big.value.type == "tether.ResultTooLarge"
        assert "100,022 bytes as JSON, over the hub's message limit of 65,536" in str(too_big.value)
        assert client.submit("apps.jobs.add", 1, 2).get(timeout=20 * UNIT) == 3
        assert "retrying" not in runner.output()


@pytest.mark.anyio
async def test_async_call(cluster: Cluster) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    async with AsyncClient(cluster.url) as client:
        assert await client.call("apps.jobs.add", 2, 3) == 5
        with pytest.raises(TaskError, match="again"):
            await client.call("apps.jobs.boom", "again")


def run_of(name: str, *args: object) -> dict[str, object]:
    return {"function": f"apps.jobs.{name}", "args": list(args), "kwargs": {}}


def test_a_function_at_its_concurrency_waits_without_blocking_a_free_slot(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.hub()
    cluster.runner("apps.jobs", slots=2)
    release = tmp_path / "release"
    first, second = tmp_path / "first", tmp_path / "second"
    with Client(cluster.url) as client:
        a = client.submit("apps.jobs.wait_alone", str(release), str(first))
        poll("the first step to start", first.exists)
        b = client.submit("apps.jobs.wait_alone", str(release), str(second))
        # The second slot is free, but wait_alone has concurrency=1: add goes past it.
        assert client.submit("apps.jobs.add", 1, 2).get(timeout=20 * UNIT) == 3
        assert not second.exists()
        release.write_text("go")
        assert [a.get(timeout=20 * UNIT), b.get(timeout=20 * UNIT)] == ["released"] * 2
        assert second.exists()


def test_a_run_cancelled_while_held_by_its_runner_never_starts(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.hub()
    cluster.runner("apps.jobs", slots=1)
    release, started, never = tmp_path / "release", tmp_path / "started", tmp_path / "never"
    with Client(cluster.url) as client:
        running = client.submit("apps.jobs.wait_for", str(release), str(started))
        poll("the step to start", started.exists)
        held = client.submit("apps.jobs.wait_for", str(release), str(never))
        poll("the runner to hold the second run",
             lambda: client.run(held.id)["state"] == "running")  # fmt: skip
        assert held.cancel()["state"] == "cancelled"
        release.write_text("go")
        assert running.get(timeout=20 * UNIT) == "released"
        # One slot, steps in the order they came: had the cancelled run stayed, it would
        # have started before this one.
        assert client.submit("apps.jobs.add", 2, 2).get(timeout=20 * UNIT) == 4
        assert not never.exists()
        with pytest.raises(TaskCancelled):
            held.get(timeout=20 * UNIT)


def test_retries_with_backoff_then_success_keeps_every_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.flaky", str(tmp_path / "count"), 2)
        assert handle.get(timeout=20 * UNIT) == 3
        view = handle.status()
    assert view["attempt"] == 3
    assert [e["message"] for e in view["errors"]] == [
        "attempt 1 fails on purpose",
        "attempt 2 fails on purpose",
    ]


def test_reject_fails_at_once_without_retrying(cluster: Cluster) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.refuse", "bad input")
        with pytest.raises(TaskError, match="bad input"):
            handle.get(timeout=20 * UNIT)
        assert handle.status()["attempt"] == 1


def test_unknown_function_and_bad_arguments_are_refused_clearly(cluster: Cluster) -> None:
    cluster.hub()
    unknown = cluster.cli("submit", "apps.jobs.nope", "1")
    assert unknown.returncode == 1
    assert "unknown function 'apps.jobs.nope'" in unknown.stderr
    with Client(cluster.url) as client:
        with pytest.raises(TypeError, match=r"argument 1 of apps.jobs.add \(set\)"):
            client.submit("apps.jobs.add", 1, {2})


def test_runner_killed_mid_step_finishes_on_a_second_runner_as_attempt_2(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.hub()
    first = cluster.runner("apps.jobs")
    marker = tmp_path / "started"
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.hold_first", str(marker))
        poll("the first attempt to start", marker.exists)
        second = cluster.runner("apps.jobs")
        first.signal(signal.SIGKILL)
        result = handle.get(timeout=30 * UNIT)
        view = handle.status()
    assert result == f"finished by pid {second.pid}"
    assert view["state"] == "succeeded"
    assert view["attempt"] == 2
    assert [e["type"] for e in view["errors"]] == ["tether.RunnerLost"]


def test_hub_restart_in_the_middle_of_a_batch_loses_no_run(cluster: Cluster) -> None:
    hub = cluster.hub()
    cluster.runner("apps.jobs", slots=2)
    count = 300
    with Client(cluster.url) as client:
        handles = client.submit_many("apps.jobs.add", [(i, 1) for i in range(count)])
        poll(
            "some runs to finish",
            lambda: client.run(handles[count // 4].id)["state"] == "succeeded",
        )
        hub.signal(signal.SIGKILL)
        hub.wait()
        cluster.hub()
        results = [h.get(timeout=60 * UNIT) for h in handles]
    assert results == [i + 1 for i in range(count)]
    status = json.loads(cluster.cli("status", "--json").stdout)
    assert status["runs"] == {"succeeded": count}


def test_sigterm_drains_in_flight_runs_and_exits_0(cluster: Cluster, tmp_path: Path) -> None:
    cluster.hub()
    runner = cluster.runner("apps.jobs")
    started, release = tmp_path / "started", tmp_path / "release"
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.wait_for", str(release), str(started))
        poll("the step to start", started.exists)
        runner.signal(signal.SIGTERM)
        poll("the hub to see the runner draining",
             lambda: any(r["draining"] for r in cluster.runners()))  # fmt: skip
        later = client.submit("apps.jobs.add", 1, 1)  # must not go to a draining runner
        release.write_text("go")
        assert handle.get(timeout=20 * UNIT) == "released"
        assert runner.wait() == 0
        assert client.run(later.id)["state"] == "queued"
        cluster.runner("apps.jobs")
        assert later.get(timeout=20 * UNIT) == 2


def test_worker_with_a_module_that_fails_to_import_exits_non_zero(cluster: Cluster) -> None:
    cluster.hub()
    runner = cluster.runner("apps.does_not_exist", wait=False)
    assert runner.wait() != 0
    output = runner.output()
    assert "cannot import task module 'apps.does_not_exist'" in output
    assert "No module named 'apps.does_not_exist'" in output
    assert cluster.runners() == []


def test_unreachable_hub_is_retried_and_reported_once_per_backoff_step(cluster: Cluster) -> None:
    runner = cluster.runner("apps.jobs", wait=False)
    poll("the backoff to reach its ceiling", lambda: "retrying in 5.0s" in runner.output(),
         timeout=30 * UNIT)  # fmt: skip
    lines = [line for line in runner.output().splitlines() if "retrying in" in line]
    steps = [re.search(r"retrying in ([\d.]+)s", line).group(1) for line in lines]  # type: ignore[union-attr]
    assert steps == ["0.1", "0.2", "0.4", "0.8", "1.6", "3.2", "5.0"]
    assert all("connection refused" in line for line in lines)
    cluster.hub()
    poll("the runner to connect once the hub is up", lambda: cluster.runner_ids() == {"runner1"})


def test_json_logs_have_one_line_per_run_state_change(cluster: Cluster) -> None:
    hub = cluster.hub("--log-format", "json")
    cluster.runner("apps.jobs")
    done = cluster.cli("submit", "apps.jobs.add", "1", "2", "--count", "120", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3"] * 120
    assert "submitting" in done.stderr and "waiting" in done.stderr  # progress for long work
    with Client(cluster.url) as client:
        run_id = client.submit("apps.jobs.add", 2, 2).id
        assert client.wait(run_id, timeout=20 * UNIT)["state"] == "succeeded"

    def states() -> list[dict[str, object]]:
        entries = [json.loads(line) for line in hub.output().splitlines() if line.startswith("{")]
        return [e for e in entries if e.get("run_id") == run_id]

    lines = poll("the run's last state change in the log", lambda: len(states()) == 3 and states())
    assert [e["state"] for e in lines] == ["queued", "running", "succeeded"]
    assert {e["function"] for e in lines} == {"apps.jobs.add"}
    assert [e["attempt"] for e in lines[1:]] == [1, 1]
    assert isinstance(lines[-1]["duration_ms"], float)
    assert all(e["logger"] == "tether.runs" and e["level"] == "info" for e in lines)
