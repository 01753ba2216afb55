"""Import a unit's modules and say, in one line, why one refused.

Runs *inside* units: isolated subinterpreters, spawned unit processes and the probe's child.
It therefore imports only the standard library, and it never imports anything on behalf of the
main interpreter of the runner (a module that refused to load in a subinterpreter and is then
imported in the main interpreter can abort the process at exit).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence
from typing import Final

__all__ = ["REFUSAL", "describe", "import_modules"]

# CPython's wording when a single-phase-init (or not per-interpreter-GIL) extension is imported
# in an isolated subinterpreter. Extensions wrap it in their own ImportError (numpy adds a page
# of advice around it), so it is searched for, never matched whole.
REFUSAL: Final = re.compile(
    r"module (?P<module>[\w.]+) does not support loading in subinterpreters"
)


def describe(exc: BaseException) -> str:
    """One line saying why an import failed: ``"ImportError: module X does not support..."``.

    Walks the exception chain for CPython's refusal and prefers it to whatever text an
    extension wrapped it in; otherwise ``"Type: message"`` of ``exc`` itself.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = REFUSAL.search(str(current))
        if found:
            return f"{type(current).__name__}: {found.group(0)}"
        current = current.__cause__ or current.__context__
    message = " ".join(str(exc).split())  # one line, even for multi-line messages
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def import_modules(sys_path: Sequence[str], modules: Sequence[str]) -> tuple[str, str] | None:
    """Set ``sys.path`` and import ``modules`` in order; ``(module, reason)`` for the first
    that fails, None when all loaded."""
    sys.path[:] = list(sys_path)
    importlib.invalidate_caches()
    for name in modules:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as exc:  # a module's import error is data, not a crash
            return name, describe(exc)
    return None
