"""One function per isolation choice.

This module imports only the standard library and ``tether`` at the top, so it loads in an
isolated subinterpreter: ``count_primes`` may run there and ``auto`` picks it for ``summarize``.
numpy refuses subinterpreters, so ``mean`` runs in a process and imports numpy only when it
runs; importing numpy up here would make this whole module process-only (see numeric.py).
"""

from __future__ import annotations

import statistics

from tether import Tether

app = Tether()


@app.task(isolation="subinterpreter")
def count_primes(limit: int) -> int:
    """Pure-Python CPU work that holds its GIL; in a subinterpreter, not the runner's."""
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, int(n**0.5) + 1)))


@app.task(isolation="process")
def mean(values: list[float]) -> float:
    import numpy  # here, not at the top: this module must stay subinterpreter-safe

    return float(numpy.mean(values))


@app.task  # isolation="auto": decided at start-up by probing this module
def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "stdev": statistics.stdev(values)}
