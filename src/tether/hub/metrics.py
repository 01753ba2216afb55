"""The hub's Prometheus metrics (``GET /metrics``), named the way the Prometheus docs and
celery-exporter do: ``tether_`` prefix, ``_total`` counters, ``_seconds`` units.

Each hub has its own registry, so several hubs in one process (tests, benchmarks) never share
counters. Gauges that mirror scheduler state are filled when scraped, not on every change.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "FunctionMetrics", "HubMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
_GAP_BUCKETS = (0.01, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class FunctionMetrics:
    """One function's labelled children, looked up once: ``labels()`` takes a lock and builds
    a key on every call, which the hub would otherwise pay several times per run."""

    __slots__ = ("submitted", "started", "succeeded", "failed", "retried", "lost", "cancelled",
                 "duration", "queue_wait")  # fmt: skip

    def __init__(self, metrics: HubMetrics, function: str) -> None:
        self.submitted: Counter = metrics.submitted.labels(function)
        self.started: Counter = metrics.started.labels(function)
        self.succeeded: Counter = metrics.succeeded.labels(function)
        self.failed: Counter = metrics.failed.labels(function)
        self.retried: Counter = metrics.retried.labels(function)
        self.lost: Counter = metrics.lost.labels(function)
        self.cancelled: Counter = metrics.cancelled.labels(function)
        self.duration: Histogram = metrics.duration.labels(function)
        self.queue_wait: Histogram = metrics.queue_wait.labels(function)


class HubMetrics:
    def __init__(self) -> None:
        self._functions: dict[str, FunctionMetrics] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["function"], registry=r)

        self.submitted = counter("tether_runs_submitted_total", "Runs accepted by the API.")
        self.started = counter("tether_runs_started_total", "Attempts dispatched to a runner.")
        self.succeeded = counter("tether_runs_succeeded_total", "Runs that succeeded.")
        self.failed = counter("tether_runs_failed_total", "Runs that failed for good.")
        self.retried = counter("tether_runs_retried_total", "Attempts queued again to retry.")
        self.lost = counter(
            "tether_runs_lost_total", "Attempts whose runner died or stopped extending."
        )
        self.cancelled = counter("tether_runs_cancelled_total", "Runs cancelled.")
        self.fenced = Counter(
            "tether_results_fenced_total", "Results ignored: not the current attempt.", registry=r
        )
        self.duration = Histogram(
            "tether_run_duration_seconds",
            "Time a step ran, as its runner measured it.",
            ["function"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "tether_run_queue_wait_seconds",
            "Time from when a run could start to its dispatch.",
            ["function"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.heartbeat_gap = Histogram(
            "tether_heartbeat_gap_seconds",
            "Gaps between consecutive heartbeats received from a runner.",
            buckets=_GAP_BUCKETS,
            registry=r,
        )
        self.runners_lost = Counter(
            "tether_runners_lost_total", "Runners declared dead by heartbeat timeout.", registry=r
        )
        self.runners = Gauge("tether_runners_connected", "Connected runners.", registry=r)
        self.queue_depth = Gauge(
            "tether_queue_depth", "Runs ready to start, by queue.", ["queue"], registry=r
        )
        self.runs_in_state = Gauge(
            "tether_runs_unfinished", "Unfinished runs held by the hub, by state.", ["state"],
            registry=r,
        )  # fmt: skip

    def function(self, name: str) -> FunctionMetrics:
        """The counters and histograms of one function."""
        found = self._functions.get(name)
        if found is None:
            found = self._functions[name] = FunctionMetrics(self, name)
        return found

    def render(
        self,
        *,
        runners: int,
        queue_depths: dict[str, int],
        unfinished: Callable[[], dict[str, int]],
    ) -> bytes:
        self.runners.set(runners)
        self.queue_depth.clear()
        for queue, depth in queue_depths.items():
            self.queue_depth.labels(queue).set(depth)
        for state, count in unfinished().items():
            self.runs_in_state.labels(state).set(count)
        return generate_latest(self.registry)
