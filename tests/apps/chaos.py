"""Tasks for ``make chaos`` (scripts/chaos.py): each execution appends its key to a log, so
the soak can count how often every accepted run was actually executed."""

from __future__ import annotations

import os
import random
import time

from tether import Tether

app = Tether()


def _record(log: str, key: str, seconds: float) -> str:
    time.sleep(random.uniform(0, seconds))
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{key}\n".encode())  # one write with O_APPEND: lines never interleave
    finally:
        os.close(fd)
    return key


@app.task(isolation="subinterpreter", retries=2, backoff=0.05)
def in_subinterpreter(log: str, key: str, seconds: float) -> str:
    return _record(log, key, seconds)


@app.task(isolation="process", retries=2, backoff=0.05)
def in_process(log: str, key: str, seconds: float) -> str:
    return _record(log, key, seconds)
