"""Import the user's task modules in the runner's main interpreter and collect their tasks.

An import that fails stops the runner before anything starts, with the import error shown:
a runner never comes up half-working.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ..app import FunctionSpec, Task, registered_tasks
from ..exceptions import ConfigError

__all__ = ["LoadError", "load_tasks"]


class LoadError(ConfigError):
    """A task module could not be imported."""


def load_tasks(modules: Sequence[str]) -> dict[str, FunctionSpec]:
    """Import ``modules`` (the working directory first on ``sys.path``, as ``python -m``
    would) and return the spec of every task they define, by name."""
    if not modules:
        raise LoadError("no task modules given: name at least one, e.g. `tether worker app.tasks`")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    before = set(registered_tasks())
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # SystemExit from a module counts as a failed import too
            if isinstance(exc, KeyboardInterrupt):
                raise
            detail = "".join(traceback.format_exception(exc)).rstrip()
            raise LoadError(f"cannot import task module {name!r}:\n{detail}") from exc
    tasks: dict[str, Task[..., Any]] = registered_tasks()
    found = {
        name: task.spec
        for name, task in tasks.items()
        if name not in before or _module_of(task.spec, modules)
    }
    if not found:
        raise LoadError(
            f"no tasks found in {', '.join(modules)}: decorate functions with @app.task"
        )
    return found


def _module_of(spec: FunctionSpec, modules: Sequence[str]) -> bool:
    return any(spec.module == m or spec.module.startswith(m + ".") for m in modules)
