"""Run one step inside an isolation unit (a subinterpreter or a spawned process).

The contract with the runner is bytes in, bytes out, both JSON:

    request   {"module": str, "qualname": str, "args": [...], "kwargs": {...}}
    outcome   {"ok": true, "value": ...}
            | {"ok": false, "error": {"type", "message", "traceback", "retryable"}}

:func:`run_step` never raises for anything the user's code does: every failure becomes an
outcome, so a unit can be reused after any step that returns.

This module imports only the standard library and :mod:`tether.exceptions`: it is the first
thing imported inside every isolated subinterpreter, where most C extensions refuse to load.
"""

from __future__ import annotations

import importlib
import inspect
import json
import traceback
from collections.abc import Callable
from typing import Any

from .exceptions import Reject

__all__ = ["encode_request", "error_outcome", "resolve", "run_step"]


def encode_request(module: str, qualname: str, args: Any, kwargs: Any) -> bytes:
    return json.dumps(
        {"module": module, "qualname": qualname, "args": args, "kwargs": kwargs},
        separators=(",", ":"),
    ).encode()


def error_outcome(type_name: str, message: str, tb: str = "", *, retryable: bool) -> bytes:
    error = {"type": type_name, "message": message, "traceback": tb, "retryable": retryable}
    return json.dumps({"ok": False, "error": error}, separators=(",", ":")).encode()


def resolve(module: str, qualname: str) -> Callable[..., Any]:
    """Import ``module`` and return the plain function behind ``qualname``."""
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    # A decorated Task keeps the undecorated function in .fn; call that, not .delay.
    fn = getattr(obj, "fn", obj)
    if not callable(fn):
        raise TypeError(f"{module}.{qualname} is not callable")
    return fn  # type: ignore[no-any-return]


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def run_step(request: bytes) -> bytes:
    """Decode a request, run the function, encode its outcome. Never raises."""
    try:
        req = json.loads(request)
        fn = resolve(req["module"], req["qualname"])
        value = fn(*req["args"], **req["kwargs"])
        if inspect.isawaitable(value):
            # An async step gets an event loop of its own, inside this unit. Imported here, not
            # above: asyncio is a third of a new unit's start-up, and most steps never need it.
            import asyncio

            value = asyncio.run(_await(value))
    except Reject as exc:
        return error_outcome(_type_name(exc), str(exc), traceback.format_exc(), retryable=False)
    except (Exception, SystemExit) as exc:  # a step's failure is data, not a crash
        return error_outcome(_type_name(exc), str(exc), traceback.format_exc(), retryable=True)
    try:
        return json.dumps({"ok": True, "value": value}, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        name = f"{req['module']}.{req['qualname']}"
        return error_outcome(
            "TypeError",
            f"the result of {name} cannot be sent as JSON: {exc}",
            retryable=False,
        )


async def _await(awaitable: Any) -> Any:
    return await awaitable
