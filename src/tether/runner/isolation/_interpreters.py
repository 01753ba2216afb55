"""One small adapter over whichever API provides isolated subinterpreters.

Python 3.13 has only the private ``_interpreters`` / ``_interpqueues`` modules; 3.14 made them
public as :mod:`concurrent.interpreters`. Everything else in Tether talks to
:class:`Interpreter` and never imports either API, so the next rename touches this file only.

An :class:`Interpreter` is always *isolated* (its own GIL: the whole point, a legacy shared-GIL
interpreter stalls the main one) and owns one reply queue. Code running inside it answers with
``_tether_reply(data: bytes)``, which this adapter defines in the interpreter's ``__main__``;
the owner reads the answer with :meth:`Interpreter.take_reply`.

This module must never run code inside an interpreter on the calling thread of an event loop
(every method blocks while the interpreter runs), and never leave an interpreter alive at
process exit: one left behind can crash the interpreter's finalisation, so every interpreter is
tracked and an ``atexit`` hook destroys those still idle.
"""

from __future__ import annotations

import atexit
import dataclasses
import sys
import threading
from typing import Any, Final

__all__ = ["API", "ExecFailure", "Interpreter", "InterpreterError", "live_interpreters"]


class InterpreterError(RuntimeError):
    """The interpreter API refused an operation (create, destroy, an unshareable value)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExecFailure:
    """An exception that escaped code executed in an interpreter, as the API reports it.

    Only the exception's description crosses: the exception object itself lives and dies in the
    interpreter that raised it.
    """

    type_name: str
    message: str
    formatted: str  # "ValueError: x"
    traceback: str  # the full display, traceback included

    @classmethod
    def from_excinfo(cls, excinfo: Any) -> ExecFailure:
        return cls(
            type_name=str(excinfo.type.__name__),
            message=str(excinfo.msg),
            formatted=str(excinfo.formatted),
            traceback=str(getattr(excinfo, "errdisplay", None) or excinfo.formatted),
        )


# Defined in every interpreter's __main__ right after creation. Kept as source text because
# only code (never objects) can be handed to another interpreter.
_REPLY_CODE_313: Final = """\
import _interpqueues as _tether_queues
def _tether_reply(data, _qid={qid}, _put=_tether_queues.put):
    _put(_qid, data, 0, 1)
del _tether_queues
"""
_REPLY_CODE_314: Final = """\
def _tether_reply(data, _queue=_tether_reply_queue):
    _queue.put(data)
del _tether_reply_queue
"""

_live: set[Interpreter] = set()
_live_lock = threading.Lock()


def live_interpreters() -> int:
    """How many interpreters this process created and has not destroyed yet."""
    with _live_lock:
        return len(_live)


if sys.version_info >= (3, 14):  # pragma: no cover - no 3.14 on the build image
    # --- Python 3.14+: the public API (PEP 734). Untested here; keep it this short. ---------
    from concurrent import interpreters as _api

    API: Final = "concurrent.interpreters"

    class Interpreter:
        """An isolated subinterpreter (own GIL) with one reply queue."""

        def __init__(self) -> None:
            try:
                self._interp = _api.create()  # isolated config by default
                self._queue = _api.create_queue()
                self._interp.prepare_main(_tether_reply_queue=self._queue)
            except Exception as exc:
                raise InterpreterError(f"cannot create a subinterpreter: {exc}") from exc
            self._closed = False
            with _live_lock:
                _live.add(self)
            failure = self.exec(_REPLY_CODE_314)
            if failure is not None:
                self.close()
                raise InterpreterError(f"cannot prepare a subinterpreter: {failure.formatted}")

        @property
        def id(self) -> int:
            return self._interp.id

        def exec(self, code: str, shared: dict[str, Any] | None = None) -> ExecFailure | None:
            try:
                if shared:
                    self._interp.prepare_main(shared)
                self._interp.exec(code)
            except _api.ExecutionFailed as exc:
                return ExecFailure.from_excinfo(exc.excinfo)
            except _api.NotShareableError as exc:
                raise InterpreterError(str(exc)) from exc
            return None

        def take_reply(self) -> bytes | None:
            try:
                data = self._queue.get_nowait()
            except _api.QueueEmpty:
                return None
            return bytes(data)

        def is_running(self) -> bool:
            return not self._closed and self._interp.is_running()

        def close(self) -> None:
            if self._closed:
                return
            try:
                self._interp.close()
            except Exception as exc:
                raise InterpreterError(f"cannot destroy subinterpreter: {exc}") from exc
            self._closed = True
            with _live_lock:
                _live.discard(self)

else:
    # --- Python 3.13: the private modules the public API was later built on. ---------------
    import _interpqueues
    import _interpreters

    API: Final = "_interpreters"

    # _interpqueues.create(maxsize, fmt, unboundop): unbounded; fmt 0 = shareable objects only
    # (bytes), never pickled; unboundop 1 = drop items left by an interpreter destroyed before
    # they were read, instead of keeping placeholders around.
    _SHARED_ONLY: Final = 0
    _UNBOUND_REMOVE: Final = 1

    class Interpreter:
        """An isolated subinterpreter (own GIL) with one reply queue."""

        def __init__(self) -> None:
            try:
                self._id = _interpreters.create("isolated")
            except Exception as exc:
                raise InterpreterError(f"cannot create a subinterpreter: {exc}") from exc
            self._closed = False
            with _live_lock:
                _live.add(self)
            try:
                self._qid = _interpqueues.create(0, _SHARED_ONLY, _UNBOUND_REMOVE)
            except Exception as exc:
                self._destroy_interpreter()
                raise InterpreterError(f"cannot create a subinterpreter queue: {exc}") from exc
            failure = self.exec(_REPLY_CODE_313.format(qid=self._qid))
            if failure is not None:
                self.close()
                raise InterpreterError(f"cannot prepare a subinterpreter: {failure.formatted}")

        @property
        def id(self) -> int:
            return self._id

        def exec(self, code: str, shared: dict[str, Any] | None = None) -> ExecFailure | None:
            """Run ``code`` in the interpreter's ``__main__`` (blocks until it ends)."""
            try:
                excinfo = _interpreters.exec(self._id, code, shared or {})
            except (_interpreters.InterpreterError, _interpreters.NotShareableError) as exc:
                raise InterpreterError(str(exc)) from exc
            return None if excinfo is None else ExecFailure.from_excinfo(excinfo)

        def take_reply(self) -> bytes | None:
            """The oldest ``_tether_reply`` not read yet, or None if there is none."""
            # Checking first avoids get()'s QueueEmpty, which 3.13 builds by importing
            # test.support, a package some distributions do not ship.
            if _interpqueues.get_count(self._qid) == 0:
                return None
            data, _fmt, _unbound = _interpqueues.get(self._qid)
            return bytes(data)

        def is_running(self) -> bool:
            return not self._closed and _interpreters.is_running(self._id)

        def close(self) -> None:
            """Destroy the interpreter and its queue; InterpreterError while it is running."""
            if self._closed:
                return
            self._destroy_interpreter()
            try:
                _interpqueues.destroy(self._qid)
            except _interpqueues.QueueError:
                pass  # already gone: nothing left to free

        def _destroy_interpreter(self) -> None:
            try:
                _interpreters.destroy(self._id)
            except _interpreters.InterpreterNotFoundError:
                pass
            except Exception as exc:
                raise InterpreterError(f"cannot destroy subinterpreter {self._id}: {exc}") from exc
            self._closed = True
            with _live_lock:
                _live.discard(self)


@atexit.register
def _destroy_leftovers() -> None:
    # Runs after threading's shutdown has joined the (non-daemon) worker threads, so whatever
    # is still here is idle: a backend that was never closed. An interpreter still running
    # (a daemon thread's) cannot be destroyed; finalisation will have to cope with it.
    with _live_lock:
        leftovers = list(_live)
    for interp in leftovers:
        if not interp.is_running():
            try:
                interp.close()
            except InterpreterError:
                pass
