"""What runs inside an isolation unit (a subinterpreter or a spawned process).

The contract with the runner is bytes in, bytes out, both JSON:

    request   {"module": str, "qualname": str, "args": [...], "kwargs": {...}}
    outcome   {"ok": true, "value": ...}
            | {"ok": false, "error": {"type", "message", "traceback", "retryable"}}

:func:`run_step` never raises for anything the user's code does: every failure becomes an
outcome, so a unit can be reused after any step that returns. :func:`import_modules` loads a
unit's modules before its first step and says, in one line, why one refused.

This module is the first thing every new unit imports, so it imports nothing but
:mod:`tether.exceptions` and :mod:`tether._wire` (which import nothing) up front: in an isolated
subinterpreter every module costs several times what it costs in the main interpreter, and a
unit's start-up is what a step waits for when no unit is warm. :mod:`traceback`, :mod:`re` and
:mod:`asyncio` are imported where they are needed: on a failure, or for an ``async def`` step.
"""

from __future__ import annotations

import sys

from ._wire import dumps, loads
from .exceptions import Reject

TYPE_CHECKING = False  # typing is not imported: see tether.app
if TYPE_CHECKING:
    import re
    from collections.abc import Callable, Sequence
    from typing import Any

__all__ = [
    "REFUSAL_PATTERN",
    "describe",
    "encode_request",
    "error_outcome",
    "import_modules",
    "refusal",
    "resolve",
    "run_step",
]

# CPython's wording when a single-phase-init (or not per-interpreter-GIL) extension is imported
# in an isolated subinterpreter. Extensions wrap it in their own ImportError (numpy adds a page
# of advice around it), so it is searched for, never matched whole.
REFUSAL_PATTERN = r"module (?P<module>[\w.]+) does not support loading in subinterpreters"

_CO_ITERABLE_COROUTINE = 0x100  # a generator made awaitable by @types.coroutine


def encode_request(module: str, qualname: str, args: Any, kwargs: Any) -> bytes:
    return dumps({"module": module, "qualname": qualname, "args": args, "kwargs": kwargs})


def error_outcome(type_name: str, message: str, tb: str = "", *, retryable: bool) -> bytes:
    error = {"type": type_name, "message": message, "traceback": tb, "retryable": retryable}
    return dumps({"ok": False, "error": error})


def resolve(module: str, qualname: str) -> Callable[..., Any]:
    """Import ``module`` and return the plain function behind ``qualname``."""
    obj: Any = sys.modules.get(module)
    if obj is None:
        __import__(module)
        obj = sys.modules[module]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    # A decorated Task keeps the undecorated function in .fn; call that, not .delay.
    fn = getattr(obj, "fn", obj)
    if not callable(fn):
        raise TypeError(f"{module}.{qualname} is not callable")
    return fn  # type: ignore[no-any-return]


def run_step(request: bytes | str) -> bytes:
    """Decode a request, run the function, encode its outcome. Never raises."""
    try:
        req: Any = loads(request)
        fn = resolve(req["module"], req["qualname"])
        value = fn(*req["args"], **req["kwargs"])
        if _is_awaitable(value):
            import asyncio  # a third of a new unit's start-up: only for async steps

            value = asyncio.run(_await(value))
    except Reject as exc:
        return _failure(exc, retryable=False)
    except (Exception, SystemExit) as exc:  # a step's failure is data, not a crash
        return _failure(exc, retryable=True)
    try:
        return dumps({"ok": True, "value": value})
    except (TypeError, ValueError, RecursionError) as exc:
        name = f"{req['module']}.{req['qualname']}"
        return error_outcome(
            "TypeError",
            f"the result of {name} cannot be sent as JSON: {exc}",
            retryable=False,
        )


def import_modules(sys_path: Sequence[str], modules: Sequence[str]) -> tuple[str, str] | None:
    """Set ``sys.path`` and import ``modules`` in order; ``(module, reason)`` for the first
    that fails, None when all loaded."""
    sys.path[:] = list(sys_path)
    for name in modules:
        try:
            __import__(name)
        except (Exception, SystemExit) as exc:  # a module's import error is data, not a crash
            return name, describe(exc)
    return None


def describe(exc: BaseException) -> str:
    """One line saying why an import failed: ``"ImportError: module X does not support..."``.

    Walks the exception chain for CPython's refusal and prefers it to whatever text an
    extension wrapped it in; otherwise ``"Type: message"`` of ``exc`` itself.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = refusal(str(current))
        if found:
            return f"{type(current).__name__}: {found.group(0)}"
        current = current.__cause__ or current.__context__
    message = " ".join(str(exc).split())  # one line, even for multi-line messages
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def refusal(text: str) -> re.Match[str] | None:
    """CPython's refusal to load an extension in a subinterpreter, if ``text`` holds one."""
    import re

    return re.search(REFUSAL_PATTERN, text)


def _failure(exc: BaseException, *, retryable: bool) -> bytes:
    try:
        import traceback

        tb = traceback.format_exc()
    except Exception:  # a step that emptied sys.path, say: its error still goes back
        tb = ""
    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return error_outcome(name, str(exc), tb, retryable=retryable)


def _is_awaitable(value: object) -> bool:
    """:func:`inspect.isawaitable`, without importing :mod:`inspect` (and its dozen modules)."""
    if hasattr(type(value), "__await__"):
        return True
    code = getattr(value, "gi_code", None)
    return code is not None and bool(getattr(code, "co_flags", 0) & _CO_ITERABLE_COROUTINE)


async def _await(awaitable: Any) -> Any:
    return await awaitable
