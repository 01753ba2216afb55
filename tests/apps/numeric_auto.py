"""A numpy task left on ``isolation="auto"``: the probe finds that numpy refuses isolated
subinterpreters, so it resolves to ``process``, with the refusal as its reason."""

from __future__ import annotations

import numpy

from tether import Tether

app = Tether()


@app.task
def norm(values: list[float]) -> float:
    return float(numpy.linalg.norm(numpy.asarray(values, dtype=float)))
