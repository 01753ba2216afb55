"""The ``subinterpreter`` backend: steps run in a pool of isolated subinterpreters.

Each unit is an isolated interpreter (its own GIL, so a step holding it in C code never delays
the main interpreter's heartbeats) that imported :mod:`tether._step` and the ``preload`` modules
once, when it was created. A step crosses as request bytes and comes back as outcome bytes
through the unit's two queues (see :mod:`._interpreters`); nothing else is shared.

Each unit has an OS thread of its own for its whole life. The thread creates the interpreter,
then stays *inside* it, in a small serve loop that blocks on a pipe, the unit's *wake* pipe: one
byte per request queued, end of file to stop. It answers each step by queueing the outcome and
writing one byte to the *done* pipe, which the event loop watches with ``add_reader``. A warm
step therefore costs two pipe wake-ups, and the unit's thread takes the main interpreter's GIL
only to create and destroy its interpreter; measured here, a step costs a third or less of what
a hop through ``anyio.to_thread.run_sync`` and back did (``benchmarks/isolation_overhead.py``).
Watching a pipe is the one place this backend reaches below anyio: it needs anyio's *asyncio*
backend on a selector event loop, which the runner's connection thread uses. Timeouts,
cancellation and the pool's slots are still anyio's.

A running step cannot be stopped from outside (``destroy`` refuses, signals reach only the main
thread), so a step that times out or is cancelled is *abandoned*: ``run`` returns at once, the
unit leaves the pool, and its thread destroys it when the step finally ends.
:attr:`SubinterpreterBackend.abandoned` counts those, so the runner can drain and restart itself
(``os.execv``, which ends every thread without finalising anything) if they pile up. A step
that had not been received yet is taken back instead, and its unit stays in the pool.

At exit, every unit is stopped and its thread waited for: an idle unit ends at once, a busy one
when its step ends (the exit waited just as long when steps ran on anyio's worker threads). Unit
threads are therefore not daemon threads: CPython 3.13 must not finalise while a thread is
inside a subinterpreter, and a daemon thread whose step ends during finalisation aborts the
process ("Py_EndInterpreter: not the last thread") or crashes it. A non-daemon thread that
nobody stops would hang the exit instead, so :func:`threading._register_atexit` (what
:mod:`concurrent.futures` uses for its workers) stops the units just before the interpreter
joins its threads, which is also before any ``atexit`` hook runs.

This module must never execute a step, create or destroy an interpreter on the event loop's
thread (all of them block: a step for as long as it runs, create/destroy for ~10 ms each), and
never hand a unit a second step while the first may still be running in it.
"""

from __future__ import annotations

import _tracemalloc
import asyncio
import atexit
import enum
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Final

import anyio
import anyio.to_thread

from ..._step import error_outcome
from ...app import FunctionSpec
from ...exceptions import IsolationError
from . import Backend, lower_priority, start_units
from ._interpreters import Interpreter, InterpreterError

__all__ = ["SubinterpreterBackend"]

_log = logging.getLogger(__name__)

# Run once per unit, in its __main__. Only strings cross: sys.path and the preload modules come
# as "\0"-joined strings (no path or module name holds one), read before anything is imported so
# that tether itself is found where the runner found it. The answer is JSON: null, or
# [module, reason] for the first preload module that failed.
_INIT: Final = """\
import os as _os, sys as _sys
_sys.path[:] = _tether_path.split("\\0") if _tether_path else []
from tether._step import import_modules as _tether_import_modules, run_step as _tether_run_step
from tether._wire import dumps as _tether_dumps
_tether_reply(_tether_dumps(_tether_import_modules(
    _sys.path, [name for name in _tether_preload.split("\\0") if name])))
def _tether_serve(wake, done, _read=_os.read, _write=_os.write, _receive=_tether_receive,
                  _reply=_tether_reply, _run=_tether_run_step):
    while _read(wake, 4096):  # a byte per request queued; end of file: stop
        while (view := _receive()) is not None:
            try:  # decoded straight from the owner's bytes, which were not copied
                request = str(view, "utf-8")
            except UnicodeDecodeError:
                request = bytes(view)  # run_step answers with the error
            del view
            _reply(_run(request))
            del request
            try:
                _write(done, b"!")
            except OSError:  # the owner no longer listens: it abandoned the step
                pass
del _os, _sys, _tether_path, _tether_preload
del _tether_run_step, _tether_import_modules, _tether_dumps
"""
# Run by each unit's thread once, for the unit's whole life. run_step never raises for user
# code, so an ExecFailure here is our bug (or a step raising what run_step lets through).
_SERVE: Final = "_tether_serve(_tether_wake, _tether_done)\n"


class _Unit:
    """One interpreter, the thread that lives in it, and the two pipes that wake them.

    The thread owns the far ends of the pipes (``_wake_in``, ``_done_out``) and closes them
    when it ends, after destroying the interpreter; the owner's ends (``wake``, ``done``) are
    closed by :meth:`disown`. End of file on ``done`` therefore means: the unit is gone.

    Once in a pool, an event loop watches ``done`` (:meth:`listen`) until the unit leaves it,
    rather than once per step: that saves two ``epoll_ctl`` calls and their bookkeeping a step.
    """

    __slots__ = (
        "_done_out",
        "_fds_lock",
        "_wake_in",
        "call",
        "done",
        "ended",
        "failure",
        "interp",
        "loop",
        "runs",
        "thread",
        "wake",
    )

    def __init__(self) -> None:
        self._wake_in, self.wake = os.pipe()
        self.done, self._done_out = os.pipe()
        # The owner's ends never block: it writes from, and the event loop reads on, the loop's
        # own thread. (The thread's ends are separate open files and stay blocking.)
        os.set_blocking(self.wake, False)
        os.set_blocking(self.done, False)
        self._fds_lock = threading.Lock()
        self.interp: Interpreter | None = None  # set by the thread once created
        self.thread: threading.Thread | None = None
        self.runs = 0
        self.ended = False  # the thread left the interpreter (and then destroyed it)
        self.failure: str | None = None  # why the serve loop ended, if not asked to
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop watching ``done``
        self.call: _Call | None = None  # the step whose outcome is awaited

    def start(
        self,
        init: dict[str, str],
        on_ready: Callable[[Exception | None], None],
        on_end: Callable[[_Unit], None],
    ) -> None:
        """Start the unit's thread; it calls ``on_ready`` once its interpreter is initialised
        (or could not be) and ``on_end`` once that interpreter is destroyed."""
        self.thread = threading.Thread(
            target=self._live,
            args=(init, on_ready, on_end),
            name=f"tether-subinterpreter-{next(_thread_ids)}",
            daemon=_DAEMON,
        )
        with _alive_lock:
            _alive.add(self)
        try:
            self.thread.start()
            if self.thread.native_id is not None:
                lower_priority(self.thread.native_id)
        except RuntimeError as exc:  # out of threads, or the interpreter is shutting down
            with _alive_lock:
                _alive.discard(self)
            self.disown()
            _close_fd(self._wake_in)
            _close_fd(self._done_out)
            raise IsolationError(f"cannot start a thread for a subinterpreter unit: {exc}") from exc

    def submit(self, request: bytes) -> None:
        """Queue a step and wake the thread; InterpreterError if the unit is gone."""
        assert self.interp is not None
        self.interp.send(request)
        try:
            with self._fds_lock:  # never a closed, perhaps reused, descriptor
                os.write(self.wake, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups the thread has yet to read: it will wake
        except OSError as exc:  # the thread is gone
            raise InterpreterError(f"the subinterpreter unit ended: {exc}") from exc

    def ask(self, call: _Call, request: bytes) -> None:
        """Hand ``request`` to the unit; ``call`` is answered on the listening loop."""
        self.call = call
        try:
            self.submit(request)
        except InterpreterError:  # its thread ended and took the queues with it
            self.call = None
            call.answer(None)

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch ``done`` on ``loop`` (its own thread) until :meth:`disown`."""
        self.loop = loop
        loop.add_reader(self.done, self._on_done)

    def stop(self) -> None:
        """Close ``wake`` (idempotent): the thread leaves once its step, if any, ends."""
        with self._fds_lock:
            wake, self.wake = self.wake, -1
        _close_fd(wake)

    def disown(self) -> None:
        """Stop listening and close the owner's ends (idempotent); on the listening loop."""
        if self.loop is not None:
            self.loop.remove_reader(self.done)
            self.loop = None
        self.call = None
        self.stop()
        with self._fds_lock:
            done, self.done = self.done, -1
        _close_fd(done)

    def _on_done(self) -> None:
        try:
            signal = os.read(self.done, 4096)
        except BlockingIOError:
            return
        except OSError:
            signal = b""
        if not signal and self.loop is not None:  # end of file stays readable: stop watching
            self.loop.remove_reader(self.done)
            self.loop = None
        call = self.call
        if call is None:
            return  # a byte left by a step whose caller left just as it ended, or the end
        assert self.interp is not None
        reply = self.interp.take_reply()
        if reply is not None or not signal:  # its outcome, or its thread ended instead
            self.call = None
            call.answer(reply)
        # else: a byte left over by an earlier step; this one is still running

    def join(self) -> None:
        if self.thread is not None and self.thread.ident is not None:
            self.thread.join()

    def _live(
        self,
        init: dict[str, str],
        on_ready: Callable[[Exception | None], None],
        on_end: Callable[[_Unit], None],
    ) -> None:
        try:
            try:
                self.interp = _create_interpreter(init)
            except BaseException as exc:
                if not isinstance(exc, Exception):  # a future cannot carry these
                    exc = IsolationError(f"cannot start a subinterpreter unit: {exc!r}")
                on_ready(exc)
                return
            on_ready(None)
            try:
                failure = self.interp.exec(
                    _SERVE, {"_tether_wake": self._wake_in, "_tether_done": self._done_out}
                )
            except InterpreterError as exc:
                self.failure = f"the subinterpreter refused to serve steps: {exc}"
            else:
                if failure is not None:
                    self.failure = (
                        f"the step shim failed in the subinterpreter: {failure.traceback}"
                    )
            if self.failure is not None:
                _log.error("subinterpreter %s: %s", self.interp.id, self.failure)
        finally:
            self._destroy()
            self.ended = True
            try:
                on_end(self)
            finally:
                # Only now: end of file on the owner's end says the interpreter is gone.
                _close_fd(self._wake_in)
                _close_fd(self._done_out)
                with _alive_lock:
                    _alive.discard(self)

    def _destroy(self) -> None:
        if self.interp is None:
            return
        try:
            self.interp.close()
        except InterpreterError:
            # Only while it runs, which cannot be: this thread was running it. The atexit hook
            # in _interpreters gets another go at it.
            _log.exception("cannot destroy subinterpreter %s", self.interp.id)


def unit_init(sys_path: Sequence[str], preload: Sequence[str]) -> dict[str, str]:
    """What :data:`_INIT` reads in a new unit: its ``sys.path`` and the modules to preload."""
    return {"_tether_path": "\0".join(sys_path), "_tether_preload": "\0".join(preload)}


def _create_interpreter(init: dict[str, str]) -> Interpreter:
    try:
        interp = Interpreter()
    except InterpreterError as exc:
        raise IsolationError(str(exc)) from exc
    try:
        failure = interp.exec(_INIT, init)
        reply = interp.take_reply() if failure is None else None
    except BaseException:
        interp.close()
        raise
    if failure is not None or reply is None:
        interp.close()
        detail = failure.traceback if failure is not None else "it did not answer"
        raise IsolationError(f"cannot start a subinterpreter unit: {detail}")
    refused = json.loads(reply)
    if refused is not None:
        interp.close()
        module, reason = refused
        raise IsolationError(
            f"module {module} cannot be imported in an isolated subinterpreter: {reason}"
            " (run its functions with isolation='process')"
        )
    return interp


def _close_fd(fd: int) -> None:
    if fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass  # already closed


# Every unit whose thread is alive, in any backend: what is stopped and waited for at exit.
_alive: set[_Unit] = set()
_alive_lock = threading.Lock()
_thread_ids = itertools.count(1)


def _stop_units_at_exit() -> None:
    with _alive_lock:
        units = list(_alive)
    for unit in units:
        unit.stop()  # only: the event loop (if any still runs) owns the rest
    for unit in units:
        if unit.thread is not None and unit.thread.ident is not None:
            unit.thread.join(timeout=0.5)  # an idle unit ends in milliseconds
    busy = [unit for unit in units if unit.thread is not None and unit.thread.is_alive()]
    if busy:
        _log.warning(
            "waiting for %d subinterpreter step(s) to end before exiting: a running"
            " subinterpreter cannot be stopped, and exiting under it would crash the process",
            len(busy),
        )
    for unit in busy:
        unit.join()


_register_shutdown = getattr(threading, "_register_atexit", None)
# Without it (no such Python yet): daemon threads, stopped by an atexit hook registered after
# _interpreters' own, so that it runs first (last in, first out).
_DAEMON: Final = _register_shutdown is None
if _register_shutdown is not None:
    _register_shutdown(_stop_units_at_exit)
else:  # pragma: no cover
    atexit.register(_stop_units_at_exit)


class _Left(enum.Enum):
    """What became of a step whose caller stopped waiting."""

    NOT_STARTED = "not started"  # taken back before the unit received it
    ENDED = "ended"  # it ended just then: its outcome (or its unit's end) is in
    ABANDONED = "abandoned"  # still running: its unit leaves the pool


class _Call:
    """One step handed to a unit; answered on the event loop that listens to the unit."""

    __slots__ = ("answered", "done", "reply")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.answered = False
        self.reply: bytes | None = None  # None once answered: the unit ended without an outcome

    def answer(self, reply: bytes | None) -> None:
        self.answered = True
        self.reply = reply
        if not self.done.done():
            self.done.set_result(None)


def _answer_soon(
    loop: asyncio.AbstractEventLoop, done: asyncio.Future[None], error: Exception | None
) -> None:  # on a unit's thread
    def settle() -> None:
        if done.done():  # the caller stopped waiting
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the loop is closed: nobody is waiting any more


class SubinterpreterBackend(Backend):
    """A pool of ``size`` isolated subinterpreters, each with a thread living in it."""

    name = "subinterpreter"

    def __init__(self, *, size: int, sys_path: Sequence[str], preload: Sequence[str]) -> None:
        super().__init__(size=size, sys_path=sys_path, preload=preload)
        # Guards _abandoned and _retiring: unit threads ending race with the event loop. _idle
        # and the units' runs, calls and listening belong to the event loop alone.
        self._lock = threading.Lock()
        self._idle: list[_Unit] = []
        self._abandoned: set[_Unit] = set()
        self._retiring: set[_Unit] = set()  # recycled, their threads destroying them
        # fast_acquire: a free slot is taken without a trip through the event loop.
        self._slots = anyio.Semaphore(size, fast_acquire=True)
        self._closed = False
        self._init = unit_init(self.sys_path, self.preload)

    @property
    def abandoned(self) -> int:
        with self._lock:
            return len(self._abandoned)

    async def start(self) -> None:
        if _tracemalloc.is_tracing():
            # CPython 3.13 frees memory tracemalloc still points at when an interpreter is
            # destroyed, and crashes at exit (python/cpython#134604, #144172).
            raise IsolationError(
                "subinterpreters cannot be used while tracemalloc is tracing (-X tracemalloc"
                " or PYTHONTRACEMALLOC): CPython crashes at exit; stop tracing or use"
                " isolation='process'"
            )
        self._idle.extend(
            await start_units(
                self.size, self._start_unit, self._destroy_all, "a subinterpreter unit"
            )
        )

    async def run(self, request: bytes, spec: FunctionSpec) -> bytes:
        async with self._slots:
            if self._closed:  # checked after the wait too: aclose() may have run meanwhile
                raise RuntimeError("the subinterpreter backend is closed")
            try:
                unit = await self._checkout()
            except IsolationError as exc:
                return error_outcome("tether.UnitError", str(exc), retryable=True)
            retire = spec.max_runs is not None and unit.runs + 1 >= spec.max_runs
            call = _Call(asyncio.get_running_loop())
            unit.ask(call, request)
            try:
                if spec.timeout is None:
                    await call.done
                else:
                    with anyio.move_on_after(spec.timeout) as deadline:
                        await call.done
                    if deadline.cancelled_caught and not call.answered:
                        left = self._leave(unit, call)
                        if left is not _Left.ENDED:
                            return await self._timed_out(unit, call, retire, spec.timeout, left)
            except anyio.get_cancelled_exc_class():
                if call.answered or self._leave(unit, call) is not _Left.ABANDONED:
                    with anyio.CancelScope(shield=True):
                        await self._finish(unit, call, retire)
                raise
            outcome = await self._finish(unit, call, retire)
            assert outcome is not None  # answered: an outcome or the unit's end
            return outcome

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        # Busy units are left to their run(): _finish retires them once the backend is closed.
        with self._lock:
            retiring = list(self._retiring)
        await self._destroy_all([*idle, *retiring])

    # --- the pool (event loop side) -------------------------------------------------------

    async def _checkout(self) -> _Unit:
        while self._idle:
            unit = self._idle.pop()
            if not unit.ended:
                return unit
            await self._retire(unit)  # its serve loop failed while it was idle
        # Lazily replaces a unit that was recycled, abandoned or broken.
        return await self._start_unit()

    async def _finish(self, unit: _Unit, call: _Call, retire: bool) -> bytes | None:
        """Pool or retire ``unit`` after ``call``; the step's outcome (None if never started)."""
        if call.answered and call.reply is None:  # the unit ended instead of answering
            await self._retire(unit)
            return error_outcome(
                "tether.UnitError",
                unit.failure or "the subinterpreter unit ended without an outcome",
                retryable=True,
            )
        if call.answered:
            unit.runs += 1
        if self._closed:
            await self._retire(unit)  # before answering: once aclose() returns, all are gone
        elif call.answered and retire and self._retiring_count() < self.size:
            self._recycle(unit)
        elif call.answered and retire:  # as many are being destroyed as the pool holds
            await self._retire(unit)
        else:
            self._idle.append(unit)
        return call.reply

    async def _timed_out(
        self, unit: _Unit, call: _Call, retire: bool, timeout: float, left: _Left
    ) -> bytes:
        message = f"the step exceeded its timeout of {timeout:g} s"
        if left is _Left.ABANDONED:
            message += (
                "; a subinterpreter cannot be interrupted, so its unit was abandoned and will"
                " be destroyed when the step ends"
            )
        else:  # it never started: its unit goes back to the pool
            with anyio.CancelScope(shield=True):
                await self._finish(unit, call, retire)
        return error_outcome("tether.StepTimeout", message, retryable=True)

    def _leave(self, unit: _Unit, call: _Call) -> _Left:
        """The caller stopped waiting for ``call``: take the step back, or let it go."""
        unit.call = None
        assert unit.interp is not None
        if unit.interp.retract():
            return _Left.NOT_STARTED  # a wake-up byte stays behind: the thread finds nothing
        reply = unit.interp.take_reply()
        with self._lock:
            if reply is None and not unit.ended:
                self._abandoned.add(unit)  # until its thread ends: see _unit_ended
                abandoned = True
            else:
                abandoned = False
        if not abandoned:
            call.answered, call.reply = True, reply
            return _Left.ENDED
        unit.disown()  # its thread stops as soon as the step ends
        _log.warning("abandoned subinterpreter %s: its step cannot be interrupted", unit.interp.id)
        return _Left.ABANDONED

    def _recycle(self, unit: _Unit) -> None:
        """Let ``unit`` go after its last step: its thread destroys the interpreter (a millisecond
        or two) while the step's outcome is already on its way; aclose() waits for it. At most
        ``size`` at a time: past that, a step waits for its unit's end as it used to."""
        unit.disown()
        with self._lock:
            if not unit.ended:
                self._retiring.add(unit)  # until its thread ends: see _unit_ended

    def _retiring_count(self) -> int:
        with self._lock:
            return len(self._retiring)

    async def _retire(self, unit: _Unit) -> None:
        """Stop ``unit`` and wait until its thread destroyed the interpreter. Shielded."""
        unit.disown()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(unit.join)

    async def _start_unit(self) -> _Unit:
        """A new unit, its interpreter created and initialised by its own thread."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        try:
            unit = _Unit()
        except OSError as exc:  # out of file descriptors
            raise IsolationError(f"cannot create a subinterpreter unit: {exc}") from exc
        unit.start(self._init, lambda error: _answer_soon(loop, ready, error), self._unit_ended)
        try:
            await ready
        except BaseException:  # it failed, or the caller left: its thread ends by itself
            unit.disown()
            raise
        unit.listen(loop)
        return unit

    async def _destroy_all(self, units: Sequence[_Unit]) -> None:
        """Stop the (idle) units and wait until each thread destroyed its interpreter."""
        if not units:
            return
        for unit in units:
            unit.disown()

        def join_all() -> None:
            for unit in units:
                unit.join()

        await anyio.to_thread.run_sync(join_all)

    def _unit_ended(self, unit: _Unit) -> None:  # on the unit's thread, interpreter destroyed
        with self._lock:
            self._abandoned.discard(unit)
            self._retiring.discard(unit)
