"""Tasks for the end-to-end tests. Imported by runners (main interpreter), their isolated
subinterpreters and spawned processes, so: standard library and ``tether`` only.

Steps that must be observed mid-flight coordinate through files (a marker they create, a file
they wait for), so that tests poll conditions instead of sleeping.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tether import Reject, Tether

app = Tether()


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(isolation="subinterpreter")
def hold_first(marker: str, limit: float = 60.0) -> str:
    """The first attempt creates ``marker`` and blocks (until its runner is killed); any later
    attempt finds the marker and finishes at once."""
    path = Path(marker)
    if path.exists():
        return f"finished by pid {os.getpid()}"
    path.write_text(str(os.getpid()))
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return "not killed"


@app.task(isolation="subinterpreter")
def wait_for(release: str, started: str, limit: float = 60.0) -> str:
    """Create ``started``, then finish once ``release`` exists."""
    Path(started).write_text(str(os.getpid()))
    deadline = time.monotonic() + limit
    while not Path(release).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return "released"


@app.task(isolation="subinterpreter", concurrency=1)
def wait_alone(release: str, started: str) -> str:
    """:func:`wait_for`, at most one at a time on a runner."""
    return wait_for.fn(release, started)


@app.task(isolation="process", retries=3, backoff=0.05)
def flaky(counter: str, failures: int) -> int:
    """Fail the first ``failures`` attempts (counted in a file), then return the attempt."""
    path = Path(counter)
    count = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(count))
    if count <= failures:
        raise ValueError(f"attempt {count} fails on purpose")
    return count


@app.task(isolation="process", retries=3)
def refuse(reason: str) -> None:
    raise Reject(reason)


@app.task(isolation="process")
def boom(message: str) -> None:
    raise ValueError(message)


def _hold_gil(seconds: float) -> int:
    """Hold the GIL in C calls (``sum`` over a range runs without a bytecode boundary)."""
    chunks = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(range(20_000_000))
        chunks += 1
    return chunks


@app.task(isolation="subinterpreter")
def gil_in_subinterpreter(seconds: float) -> int:
    return _hold_gil(seconds)


@app.task(isolation="process")
def gil_in_process(seconds: float) -> int:
    return _hold_gil(seconds)


@app.task(isolation="subinterpreter", timeout=0.5)
def stuck_in_subinterpreter(release: str, started: str) -> str:
    return str(wait_for.fn(release, started))


@app.task(isolation="process", timeout=0.5)
def stuck_in_process(release: str, started: str) -> str:
    return str(wait_for.fn(release, started))


@app.task(isolation="process")
def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


@app.task(isolation="subinterpreter")
def segfault_first(marker: str) -> str:
    """The first attempt takes its whole runner down; a later one finishes."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        import ctypes

        ctypes.string_at(0)
    return f"survived in pid {os.getpid()}"


@app.task(isolation="subinterpreter")
def finish_when(release: str, started: str, done: str) -> str:
    """:func:`wait_for`, and create ``done`` just before returning."""
    result = str(wait_for.fn(release, started))
    Path(done).write_text(result)
    return result


@app.task(isolation="subinterpreter")
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(isolation="subinterpreter")
def text(size: int) -> str:
    return "x" * size


@app.task(isolation="subinterpreter")
def length(text: str) -> int:
    return len(text)
