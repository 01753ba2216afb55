"""Faults injected on purpose, with real processes on loopback: nothing accepted is lost."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import Proxy, proxy_to
from support import UNIT, Cluster, Proc, poll
from tether import Client, HubUnavailable, TaskError

pytestmark = pytest.mark.slow


@pytest.fixture
def partitioned(cluster: Cluster) -> Iterator[tuple[Cluster, Proxy, Proc]]:
    """A hub, and a runner that reaches it only through a proxy."""
    cluster.hub(heartbeat_interval=0.1, heartbeat_timeout=1.0)
    with proxy_to(cluster.port) as proxy:
        runner = cluster.runner(
            "apps.jobs", wait=False, extra=["--hub", f"http://127.0.0.1:{proxy.port}"]
        )
        poll("the runner to connect through the proxy", cluster.runner_ids)
        yield cluster, proxy, runner


def cut_off(cluster: Cluster, proxy: Proxy, runner: Proc) -> None:
    """Partition, and wait until both sides have noticed through missed heartbeats."""
    proxy.partition()
    poll("the hub to declare the runner dead",
         lambda: cluster.metric("tether_runners_lost_total") == 1)  # fmt: skip
    poll("the runner to notice the silent hub", lambda: "hub went silent" in runner.output())


def test_after_a_partition_a_still_running_step_is_given_back_to_its_runner(
    partitioned: tuple[Cluster, Proxy, Proc], tmp_path: Path
) -> None:
    cluster, proxy, runner = partitioned
    started, release = tmp_path / "started", tmp_path / "release"
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.wait_for", str(release), str(started))
        poll("the step to start", started.exists)
        cut_off(cluster, proxy, runner)
        proxy.heal()
        poll("the runner to reconnect", cluster.runner_ids)
        release.write_text("go")
        assert handle.get(timeout=30 * UNIT) == "released"
        view = handle.status()
    assert (view["state"], view["attempt"]) == ("succeeded", 1)  # not run a second time
    assert proxy.connections >= 2


def test_a_result_finished_while_cut_off_is_delivered_after_reconnecting(
    partitioned: tuple[Cluster, Proxy, Proc], tmp_path: Path
) -> None:
    cluster, proxy, runner = partitioned
    started, release, done = tmp_path / "started", tmp_path / "release", tmp_path / "done"
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.finish_when", str(release), str(started), str(done))
        poll("the step to start", started.exists)
        cut_off(cluster, proxy, runner)
        release.write_text("go")
        poll("the step to finish while cut off", done.exists)
        assert client.run(handle.id)["state"] == "queued"  # the hub took it back meanwhile
        proxy.heal()
        assert handle.get(timeout=30 * UNIT) == "released"
        view = handle.status()
    assert (view["state"], view["attempt"]) == ("succeeded", 1)
    assert [e["type"] for e in view["errors"]] == ["tether.RunnerLost"]


def test_hub_killed_under_steady_load_loses_no_answered_submit(cluster: Cluster) -> None:
    hub = cluster.hub()
    cluster.runner("apps.jobs", slots=2)
    answered: list[tuple[str, int]] = []  # (run id, argument) of every answered submit
    refused = 0
    stop = threading.Event()

    def produce() -> None:
        nonlocal refused
        with Client(cluster.url, timeout=2) as client:
            i = 0
            while not stop.is_set():
                try:
                    answered.append((client.submit("apps.jobs.add", i, 1).id, i))
                    i += 1
                except HubUnavailable:
                    refused += 1  # not answered: the producer knows it was not accepted
                    stop.wait(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        poll("a steady stream of submits", lambda: len(answered) >= 100)
        hub.signal(signal.SIGKILL)
        hub.wait()
        killed_at = len(answered)
        cluster.hub()
        poll("submits to be answered again", lambda: len(answered) >= killed_at + 100)
    finally:
        stop.set()
        producer.join()
    with Client(cluster.url) as client:
        views = [client.wait(run_id, timeout=60 * UNIT) for run_id, _ in answered]
    assert [v["state"] for v in views] == ["succeeded"] * len(answered)
    assert [v["result"] for v in views] == [i + 1 for _, i in answered]
    assert refused > 0  # the hub really was down for a while
    runs = json.loads(cluster.cli("status", "--json").stdout)["runs"]
    # A submit the hub stored but died before answering is a run the producer was told nothing
    # about (it counted a refusal): it runs as well (maybe not yet), but there are no more of
    # those than refusals, and no other runs at all.
    assert runs.get("succeeded", 0) >= len(answered)
    assert sum(runs.values()) <= len(answered) + refused


def test_lease_extensions_keep_a_step_longer_than_its_lease(cluster: Cluster) -> None:
    cluster.hub("--lease", "0.6")  # extended every 0.2 s by the runner
    cluster.runner("apps.jobs")
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.nap", 2.0)
        assert handle.get(timeout=20 * UNIT) == 2.0
        view = handle.status()
    assert (view["attempt"], view.get("errors")) == (1, None)


def test_a_success_the_store_refuses_is_asked_for_again_and_stands(cluster: Cluster) -> None:
    """The waiter hears of a success while it is written. If that write fails, the hub closes
    the runner's connection; the runner, never acknowledged, sends the result again once it
    reconnects, and the store ends up saying what the waiter was told, from the one attempt."""
    cluster.hub()
    cluster.runner("apps.jobs")
    db = sqlite3.connect(cluster.tmp / "data" / "tether.db", timeout=10)
    # A real refusal by the real database: any success recorded for add() aborts.
    db.execute(
        "CREATE TRIGGER refuse_success BEFORE UPDATE OF state ON runs"
        " WHEN NEW.state = 'succeeded' AND NEW.function = 'apps.jobs.add'"
        " BEGIN SELECT RAISE(ABORT, 'refused on purpose'); END"
    )
    db.commit()
    with cluster.http() as http:
        told = http.post("/v1/runs", params={"wait": "20"}, json={
            "function": "apps.jobs.add", "args": [20, 22], "kwargs": {}}).json()  # fmt: skip
        assert (told["state"], told["result"], told["attempt"]) == ("succeeded", 42, 1)
        stored = http.get(f"/v1/runs/{told['id']}").json()
        assert stored["state"] == "running"  # refused: the store has not taken it
        db.execute("DROP TRIGGER refuse_success")
        db.commit()
        db.close()
        poll("the store to take the result sent again",
             lambda: http.get(f"/v1/runs/{told['id']}").json()["state"] == "succeeded")  # fmt: skip
        stored = http.get(f"/v1/runs/{told['id']}").json()
    assert (stored["result"], stored["attempt"], stored.get("errors", [])) == (42, 1, [])
    assert "asking runner runner1 for it again" in cluster.procs[0].output()


def test_a_failure_the_store_refuses_is_asked_for_again_too(cluster: Cluster) -> None:
    cluster.hub()
    cluster.runner("apps.jobs")
    db = sqlite3.connect(cluster.tmp / "data" / "tether.db", timeout=10)
    db.execute(
        "CREATE TRIGGER refuse_failure BEFORE UPDATE OF state ON runs"
        " WHEN NEW.state = 'failed' BEGIN SELECT RAISE(ABORT, 'refused on purpose'); END"
    )
    db.commit()
    with Client(cluster.url) as client:
        handle = client.submit("apps.jobs.boom", "kept")
        poll("the hub to ask for the outcome again",
             lambda: "asking runner runner1 for it again" in cluster.procs[0].output())  # fmt: skip
        assert client.run(handle.id)["state"] == "running"
        db.execute("DROP TRIGGER refuse_failure")
        db.commit()
        db.close()
        with pytest.raises(TaskError, match="kept") as caught:
            handle.get(timeout=20 * UNIT)
        assert caught.value.type == "ValueError"
        assert client.run(handle.id)["attempt"] == 1  # sent again, not run again
