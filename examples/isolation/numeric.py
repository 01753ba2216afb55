"""A module that imports numpy at the top: ``auto`` resolves its functions to ``process``."""

from __future__ import annotations

import numpy

from tether import Tether

app = Tether()


@app.task
def zscores(values: list[float]) -> list[float]:
    data = numpy.asarray(values, dtype=float)
    return [float(z) for z in (data - data.mean()) / data.std()]
