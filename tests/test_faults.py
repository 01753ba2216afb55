"""Faults injected on purpose, with real processes on loopback: nothing accepted is lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import Proxy, proxy_to
from support import UNIT, Cluster, Proc, poll
from tether import Client

pytestmark = pytest.mark.slow


def metric(cluster: Cluster, name: str) -> float:
    with cluster.http() as http:
        text = http.get("/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


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
         lambda: metric(cluster, "tether_runners_lost_total") == 1)  # fmt: skip
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
