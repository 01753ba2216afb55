"""One small adapter over whichever API provides isolated subinterpreters.

Python 3.13 has only the private ``_interpreters`` / ``_interpqueues`` modules; 3.14 made them
public as :mod:`concurrent.interpreters`. Everything else in Tether talks to
:class:`Interpreter` and never imports either API, so the next rename touches this file only.

An :class:`Interpreter` is always *isolated* (its own GIL: the whole point, a legacy shared-GIL
interpreter stalls the main one) and owns two queues, one each way. The owner queues bytes with
:meth:`Interpreter.send` (and may take them back with :meth:`Interpreter.retract` until they are
received); code running inside takes them with ``_tether_receive()``, which returns a read-only
memoryview of the owner's bytes (they are not copied: a megabyte argument would otherwise be
copied once more than it is decoded) or None when there is nothing, and answers with
``_tether_reply(data: bytes)``; both are defined by this adapter in the interpreter's
``__main__``. The owner reads the answer with :meth:`Interpreter.take_reply`. The queues never
block: waking the other side is the caller's business.

This module must never run code inside an interpreter on the calling thread of an event loop
(creating, ``exec`` and ``close`` block while the interpreter works; only the queue methods,
``send``, ``retract`` and ``take_reply``, never wait for it), and never leave an interpreter
alive at process exit: one left behind can crash the interpreter's finalisation, so every
interpreter is tracked and an ``atexit`` hook destroys those still idle.
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
_QUEUES_CODE_313: Final = """\
import _interpqueues as _tether_queues
import _interpreters  # must be loaded to receive a memoryview from another interpreter
del _interpreters
def _tether_reply(data, _qid={replies}, _put=_tether_queues.put):
    _put(_qid, data, 0, 1)
def _tether_receive(_qid={requests}, _count=_tether_queues.get_count, _get=_tether_queues.get):
    if not _count(_qid):
        return None
    try:
        return _get(_qid)[0]
    except Exception:  # the owner took it back since the count
        return None
del _tether_queues
"""
_QUEUES_CODE_314: Final = """\
from concurrent.interpreters import QueueEmpty as _tether_empty
def _tether_reply(data, _queue=_tether_reply_queue):
    _queue.put(data)
def _tether_receive(_queue=_tether_request_queue, _empty=_tether_empty):
    try:
        return _queue.get_nowait()
    except _empty:
        return None
del _tether_reply_queue, _tether_request_queue, _tether_empty
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
        """An isolated subinterpreter (own GIL) with a queue of bytes each way."""

        def __init__(self) -> None:
            try:
                self._interp = _api.create()  # isolated config by default
                self._replies = _api.create_queue()
                self._requests = _api.create_queue()
                self._interp.prepare_main(
                    _tether_reply_queue=self._replies, _tether_request_queue=self._requests
                )
            except Exception as exc:
                raise InterpreterError(f"cannot create a subinterpreter: {exc}") from exc
            self._closed = False
            with _live_lock:
                _live.add(self)
            failure = self.exec(_QUEUES_CODE_314)
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

        def send(self, data: bytes) -> None:
            try:
                self._requests.put(memoryview(data))
            except Exception as exc:
                raise InterpreterError(f"cannot send to subinterpreter: {exc}") from exc

        def retract(self) -> bool:
            try:
                self._requests.get_nowait()
            except Exception:  # QueueEmpty, or a queue already destroyed
                return False
            return True

        def take_reply(self) -> bytes | None:
            try:
                data = self._replies.get_nowait()
            except Exception:  # QueueEmpty, or a queue already destroyed
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

    def _take(qid: int) -> bytes | None:
        # Counting first avoids get()'s QueueEmpty, which 3.13 builds by importing test.support,
        # a package some distributions do not ship. The other side may still take the item in
        # between, and the queue may be gone with its interpreter: both mean nothing to take.
        try:
            if _interpqueues.get_count(qid) == 0:
                return None
            data, _fmt, _unbound = _interpqueues.get(qid)
        except Exception:
            return None
        return bytes(data)

    class Interpreter:
        """An isolated subinterpreter (own GIL) with a queue of bytes each way."""

        def __init__(self) -> None:
            try:
                self._id = _interpreters.create("isolated")
            except Exception as exc:
                raise InterpreterError(f"cannot create a subinterpreter: {exc}") from exc
            self._closed = False
            with _live_lock:
                _live.add(self)
            self._queues: list[int] = []
            try:
                self._replies = _interpqueues.create(0, _SHARED_ONLY, _UNBOUND_REMOVE)
                self._queues.append(self._replies)
                self._requests = _interpqueues.create(0, _SHARED_ONLY, _UNBOUND_REMOVE)
                self._queues.append(self._requests)
            except Exception as exc:
                self.close()
                raise InterpreterError(f"cannot create a subinterpreter queue: {exc}") from exc
            failure = self.exec(
                _QUEUES_CODE_313.format(replies=self._replies, requests=self._requests)
            )
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

        def send(self, data: bytes) -> None:
            """Queue ``data`` for ``_tether_receive()`` inside the interpreter.

            It crosses as a memoryview: ``data`` must not change until the interpreter is done
            with it, which bytes never do.
            """
            try:
                view = memoryview(data)
                _interpqueues.put(self._requests, view, _SHARED_ONLY, _UNBOUND_REMOVE)
            except Exception as exc:  # destroyed, or not shareable
                raise InterpreterError(f"cannot send to subinterpreter {self._id}: {exc}") from exc

        def retract(self) -> bool:
            """Take back the oldest bytes sent and not received yet; False if there were none."""
            return _take(self._requests) is not None

        def take_reply(self) -> bytes | None:
            """The oldest ``_tether_reply`` not read yet, or None if there is none."""
            return _take(self._replies)

        def is_running(self) -> bool:
            try:
                return not self._closed and _interpreters.is_running(self._id)
            except _interpreters.InterpreterNotFoundError:
                return False  # destroyed by another thread just now

        def close(self) -> None:
            """Destroy the interpreter and its queues; InterpreterError while it is running."""
            if self._closed:
                return
            self._destroy_interpreter()
            for qid in self._queues:
                try:
                    _interpqueues.destroy(qid)
                except Exception:  # QueueError: already gone, nothing left to free
                    pass
            self._queues.clear()

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
    # Runs after threading's shutdown stopped the subinterpreter backend's units and joined the
    # non-daemon threads, theirs included: whatever is still here is idle, created by hand and
    # never closed. An interpreter still running (some daemon thread's) cannot be destroyed;
    # finalisation has to cope with it.
    with _live_lock:
        leftovers = list(_live)
    for interp in leftovers:
        if not interp.is_running():
            try:
                interp.close()
            except InterpreterError:
                pass
