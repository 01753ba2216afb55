"""The hub's Prometheus metrics (``GET /metrics``), named the way the Prometheus docs and
celery-exporter do: ``tether_`` prefix, ``_total`` counters, ``_seconds`` units.

Each hub has its own registry, so several hubs in one process (tests, benchmarks) never share
counters. Gauges that mirror scheduler state are filled when scraped, not on every change.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "FunctionMetrics", "HubMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
_GAP_BUCKETS = (0.01, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Tally:
    """A counter the event loop adds to: a plain number, read when scraped."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Timings:
    """A histogram the event loop adds to: counts per bucket and a sum, read when scraped."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_DURATION_BUCKETS) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds


class FunctionMetrics:
    """One function's counters and histograms, kept as plain numbers.

    The scheduler adds to these several times per run, always on the event loop; a
    prometheus_client child takes a lock and checks its state on every call (about 4% of the
    hub's loop under load, measured with perf), so they are turned into samples only when
    ``/metrics`` is scraped (:class:`_FunctionCollector`)."""

    __slots__ = ("submitted", "started", "succeeded", "failed", "retried", "lost", "cancelled",
                 "duration", "queue_wait")  # fmt: skip

    def __init__(self) -> None:
        self.submitted = _Tally()
        self.started = _Tally()
        self.succeeded = _Tally()
        self.failed = _Tally()
        self.retried = _Tally()
        self.lost = _Tally()
        self.cancelled = _Tally()
        self.duration = _Timings()
        self.queue_wait = _Timings()


# name, help, and the FunctionMetrics attribute each family is read from
_COUNTERS = (
    ("tether_runs_submitted", "Runs accepted by the API.", "submitted"),
    ("tether_runs_started", "Attempts dispatched to a runner.", "started"),
    ("tether_runs_succeeded", "Runs that succeeded.", "succeeded"),
    ("tether_runs_failed", "Runs that failed for good.", "failed"),
    ("tether_runs_retried", "Attempts queued again to retry.", "retried"),
    ("tether_runs_lost", "Attempts whose runner died or stopped extending.", "lost"),
    ("tether_runs_cancelled", "Runs cancelled.", "cancelled"),
)
_HISTOGRAMS = (
    ("tether_run_duration_seconds", "Time a step ran, as its runner measured it.", "duration"),
    ("tether_run_queue_wait_seconds", "Time from when a run could start to its dispatch.",
     "queue_wait"),
)  # fmt: skip
_BOUNDS = [*(repr(float(b)) for b in _DURATION_BUCKETS), "+Inf"]


class _FunctionCollector(Collector):
    """Every function's numbers as Prometheus families, labelled ``function``."""

    def __init__(self, functions: dict[str, FunctionMetrics]) -> None:
        self._functions = functions

    def collect(self) -> Iterator[Metric]:
        functions = list(self._functions.items())
        for name, doc, attr in _COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["function"])
            for function, metrics in functions:
                counter.add_metric([function], getattr(metrics, attr).value)
            yield counter
        for name, doc, attr in _HISTOGRAMS:
            histogram = HistogramMetricFamily(name, doc, labels=["function"])
            for function, metrics in functions:
                timings: _Timings = getattr(metrics, attr)
                cumulative = list(itertools.accumulate(timings.counts))
                histogram.add_metric(
                    [function], list(zip(_BOUNDS, cumulative, strict=True)), timings.sum
                )
            yield histogram


class HubMetrics:
    def __init__(self) -> None:
        self._functions: dict[str, FunctionMetrics] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        r.register(_FunctionCollector(self._functions))
        self.fenced = Counter(
            "tether_results_fenced_total", "Results ignored: not the current attempt.", registry=r
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
            found = self._functions[name] = FunctionMetrics()
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
