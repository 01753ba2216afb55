"""Hostile steps for benchmarks/liveness.py: work that starves a heartbeat thread if it shares
an interpreter (and so a GIL) with it.

Imported by the runner's main interpreter, its isolated subinterpreters and its spawned
processes: standard library and ``tether`` only.
"""

from __future__ import annotations

import re
import time

from tether import Tether

app = Tether()

# Each kind holds the GIL for one "chunk" of about CHUNK seconds at a time.
CHUNK = 2.0
_calibrated: dict[str, int] = {}


def _c_sum(n: int) -> None:
    sum(range(n))  # one C call: no bytecode boundary, so the GIL is never offered


def _regex(n: int) -> None:
    # Catastrophic backtracking inside the C regex engine, which holds the GIL throughout.
    re.match(r"(a+)+$", "a" * n + "b")


def _python(n: int) -> None:
    x = 0
    for i in range(n):  # pure bytecode: the GIL is offered every switch interval
        x += i


def _alloc(n: int) -> None:
    # n allocations of 256 MiB, each zeroed and touched in C: large, but bounded, so that the
    # machine is not pushed into reclaiming memory (which would stall every process alike).
    for _ in range(n):
        block = bytearray(256 * 1024 * 1024)
        block[::4096] = b"\x01" * len(block[::4096])
        del block


_KINDS = {"c_sum": _c_sum, "regex": _regex, "python": _python, "alloc": _alloc}
_START = {"c_sum": 1_000_000, "regex": 16, "python": 100_000, "alloc": 1}


def _size_for(kind: str) -> int:
    """The size of ``kind`` that takes about CHUNK seconds here (measured once per unit)."""
    if kind not in _calibrated:
        n = _START[kind]
        while True:
            started = time.perf_counter()
            _KINDS[kind](n)
            took = time.perf_counter() - started
            if took > CHUNK / 8:
                break
            n = n + 1 if kind == "regex" else n * 2
        if kind == "regex":  # each extra character doubles the work
            while took < CHUNK / 1.5:
                n, took = n + 1, took * 2
        else:
            n = int(n * CHUNK / took)
        _calibrated[kind] = n
    return _calibrated[kind]


@app.task
def hog(seconds: float, kinds: list[str]) -> dict[str, int]:
    """Cycle through ``kinds`` of GIL-hostile work, a chunk at a time, for ``seconds``."""
    done: dict[str, int] = {kind: 0 for kind in kinds}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for kind in kinds:
            _KINDS[kind](_size_for(kind))
            done[kind] += 1
            if time.monotonic() >= deadline:
                break
    return done
