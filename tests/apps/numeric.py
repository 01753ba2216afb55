"""A task module over numpy, a C extension that refuses to load in an isolated subinterpreter.

Its one task is (wrongly) configured ``isolation="subinterpreter"``: ``tether worker
apps.numeric --check`` must refuse it, naming the function, numpy's extension module and the
fix. ``--set apps.numeric.mean.isolation=process`` (or the config file) makes it valid.
"""

from __future__ import annotations

import numpy

from tether import Tether

app = Tether()


@app.task(isolation="subinterpreter")
def mean(values: list[float]) -> float:
    return float(numpy.mean(numpy.asarray(values, dtype=float)))
