"""The Celery side of the peer benchmarks: one no-op task, Redis as broker and result backend.

Runs in the peers' virtual environment (``.venv-peers``), never in Tether's. The worker is
started by :mod:`driver` as ``celery -A celery_app worker --pool prefork --concurrency 2``.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")

app = Celery("celery_app", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    result_expires=3600,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)


@app.task(name="celery_app.noop")
def noop() -> None:
    """Nothing: what is left is the cost of getting there and back."""
