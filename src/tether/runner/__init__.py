"""The runner: the worker process that holds one connection to the hub and runs steps.

Submodules: ``loader`` (imports task modules), ``connection`` (the anyio-managed connection
thread), ``worker`` (the supervising main thread), ``isolation`` (where steps run).

This package's ``__init__`` imports nothing, so that ``python -m tether.runner.isolation...``
children and isolated subinterpreters stay light.
"""

from __future__ import annotations

__all__: list[str] = []
