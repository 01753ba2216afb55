"""The ``auto`` probe: which modules load in an isolated subinterpreter?

Many C extensions (numpy, pydantic-core, orjson, ...) refuse to load in an isolated
subinterpreter. ``isolation="auto"`` asks :func:`probe_modules` at start-up and picks
``subinterpreter`` for a function whose module loads there, ``process`` otherwise::

    >>> probe_modules(["app.tasks", "app.numeric"], sys.path)
    {'app.tasks': None,
     'app.numeric': 'ImportError: module numpy._core._multiarray_umath does not support
                     loading in subinterpreters'}

The imports happen in a throw-away child process (``python -m tether.runner.isolation.probe``)
that creates one fresh isolated subinterpreter per module. This module must never import a
probed module in the runner, nor in the child's main interpreter: a module that failed to load
in a subinterpreter and is then imported in the main interpreter can abort the process at exit.
A child that crashes, hangs or dies is turned into a reason for the module it was importing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Final

from ..._step import refusal
from ._child import child_environment, describe_exit

__all__ = ["DEFAULT_TIMEOUT", "probe_modules", "refusing_extension"]

DEFAULT_TIMEOUT: Final = 60.0  # seconds for the whole probe; heavy imports can take a while

_PROBE_MODULE: Final = "tether.runner.isolation.probe"

# Runs in each fresh subinterpreter of the child, sys.path first (as a unit's _INIT does).
# Answers null, or [module, reason].
_PROBE_CODE: Final = """\
import sys as _sys
_sys.path[:] = _tether_path.split("\\0") if _tether_path else []
from tether._step import import_modules as _import_modules
from tether._wire import dumps as _dumps
_tether_reply(_dumps(_import_modules(_sys.path, [_tether_module])))
"""


def refusing_extension(reason: str | None) -> str | None:
    """The extension module named in a refusal, e.g. ``"numpy._core._multiarray_umath"`` from
    ``"... module numpy._core._multiarray_umath does not support loading in subinterpreters"``;
    None when ``reason`` is not such a refusal."""
    found = refusal(reason or "")
    return found.group("module") if found else None


def probe_modules(
    modules: Sequence[str], sys_path: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, str | None]:
    """For each module: None if it imports in an isolated subinterpreter, else why not.

    Blocks for as long as the imports take (up to ``timeout`` seconds in all): call it from
    the runner's main thread at start-up, or through a worker thread.
    """
    wanted = list(dict.fromkeys(modules))
    results: dict[str, str | None] = {}
    deadline = time.monotonic() + timeout
    remaining = wanted
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0:
            for module in remaining:
                results[module] = f"not probed: the probe ran out of its {timeout:g} s"
            break
        answered, ending = _run_child(remaining, sys_path, left)
        results.update(answered)
        remaining = [module for module in remaining if module not in answered]
        if remaining:
            # The child answers in order, so it was importing the first unanswered module when
            # it ended; the others get a new child.
            culprit, *remaining = remaining
            results[culprit] = f"the probe process {ending} while importing {culprit}"
    return {module: results[module] for module in wanted}


def _run_child(
    modules: Sequence[str], sys_path: Sequence[str], timeout: float
) -> tuple[dict[str, str | None], str]:
    """Probe ``modules`` in one child: the answers it gave, and how it ended."""
    request = json.dumps({"modules": list(modules), "sys_path": list(sys_path)}).encode()
    try:
        child = subprocess.run(
            [sys.executable, "-m", _PROBE_MODULE],
            input=request,
            capture_output=True,
            timeout=timeout,
            env=child_environment(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # run() killed and reaped it
        out, err = exc.stdout or b"", exc.stderr or b""
        ending = f"timed out after {timeout:.3g} s"
    except OSError as exc:
        return {}, f"could not start ({exc})"
    else:
        out, err = child.stdout, child.stderr
        ending = f"ended ({describe_exit(child.returncode)})"
    answered: dict[str, str | None] = {}
    for line in out.decode(errors="replace").splitlines():
        try:
            answer = json.loads(line)
            answered[answer["module"]] = answer["reason"]
        except (ValueError, KeyError, TypeError):
            continue  # a partial last line from a child that died mid-write
    last = [line for line in err.decode(errors="replace").splitlines() if line.strip()][-1:]
    if last:
        ending += f"; its last words: {last[0].strip()}"
    return answered, ending


# --- the child ----------------------------------------------------------------------------


def _probe_one(module: str, sys_path: Sequence[str]) -> str | None:
    from ._interpreters import Interpreter, InterpreterError

    try:
        interp = Interpreter()
    except InterpreterError as exc:
        return str(exc)
    try:
        shared = {"_tether_path": "\0".join(sys_path), "_tether_module": module}
        failure = interp.exec(_PROBE_CODE, shared)
        if failure is not None:
            return failure.formatted
        reply = interp.take_reply()
        if reply is None:
            return "the probe's subinterpreter did not answer"
        refused = json.loads(reply)
        return None if refused is None else str(refused[1])
    finally:
        try:
            interp.close()
        except InterpreterError:
            pass  # e.g. the module left threads running; this process is about to exit


def _main() -> int:
    request = json.loads(sys.stdin.buffer.read())
    # Answers go to the original stdout, one JSON line per module, flushed at once so the parent
    # knows how far a crashing child got. Whatever the modules print goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    for module in request["modules"]:
        reason = _probe_one(module, request["sys_path"])
        answers.write(json.dumps({"module": module, "reason": reason}) + "\n")
        answers.flush()
    answers.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
