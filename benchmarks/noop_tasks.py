"""The no-op task Tether's throughput, latency and scale benchmarks run.

Imported by the runner's main interpreter and its isolated subinterpreters: the standard
library and ``tether`` only.
"""

from __future__ import annotations

from tether import Tether

app = Tether()


@app.task(isolation="subinterpreter")
def noop() -> None:
    """Nothing: what is left is the cost of getting there and back."""
