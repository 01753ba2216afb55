"""The taskiq side of the peer benchmarks: one no-op task on taskiq-redis.

Runs in the peers' virtual environment (``.venv-peers``), never in Tether's. The broker is
taskiq-redis's ``ListQueueBroker`` (a Redis list, BRPOP) with ``RedisAsyncResultBackend``; the
worker is started by :mod:`driver` as one process with two concurrent tasks.
"""

from __future__ import annotations

import os

from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")

broker = ListQueueBroker(REDIS_URL, queue_name="taskiq_bench").with_result_backend(
    RedisAsyncResultBackend(REDIS_URL, result_ex_time=3600)
)


@broker.task(task_name="taskiq_app.noop")
async def noop() -> None:
    """Nothing: what is left is the cost of getting there and back."""
