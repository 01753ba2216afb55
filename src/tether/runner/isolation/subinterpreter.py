"""The ``subinterpreter`` backend: steps run in a pool of isolated subinterpreters.

Each unit is an isolated interpreter (its own GIL, so a step holding it in C code never delays
the main interpreter's heartbeats) that imported :mod:`tether._step` and the ``preload`` modules
once, when it was created. A step crosses as request bytes and comes back as outcome bytes
through the unit's reply queue; nothing else is shared.

A running subinterpreter cannot be stopped from outside (``destroy`` refuses, signals reach only
the main thread), so a step that times out or is cancelled is *abandoned*: ``run`` returns at
once, the unit leaves the pool, and the worker thread still executing it destroys it when the
step finally ends. :attr:`SubinterpreterBackend.abandoned` counts those, so the runner can drain
and restart itself if they pile up.

This module must never execute a step, create or destroy an interpreter on the event loop's
thread (all of them block: a step for as long as it runs, create/destroy for ~8 ms each), and
never hand a unit to a second step while the first may still be running in it.
"""

from __future__ import annotations

import _tracemalloc
import enum
import json
import logging
import threading
from collections.abc import Sequence
from typing import Final

import anyio
import anyio.to_thread

from ..._step import error_outcome
from ...app import FunctionSpec
from ...exceptions import IsolationError
from . import Backend
from ._interpreters import Interpreter, InterpreterError

__all__ = ["SubinterpreterBackend"]

_log = logging.getLogger(__name__)

# Run once per unit, in its __main__. Only strings cross, so the configuration comes as JSON.
# The answer is JSON too: null, or [module, reason] for the first preload module that failed.
_INIT: Final = """\
import json as _json, sys as _sys
_cfg = _json.loads(_tether_init)
_sys.path[:] = _cfg["sys_path"]
from tether._step import run_step as _tether_run_step
from tether.runner.isolation._preload import import_modules as _tether_import_modules
_tether_reply(_json.dumps(_tether_import_modules(_cfg["sys_path"], _cfg["preload"])).encode())
def _tether_call(payload, _run=_tether_run_step, _reply=_tether_reply):
    _reply(_run(payload))
del _json, _sys, _cfg, _tether_init, _tether_run_step, _tether_import_modules
"""
# Run once per step. run_step never raises for user code, so an ExecFailure here is our bug.
_CALL: Final = "_tether_call(_tether_payload)\ndel _tether_payload\n"


class _State(enum.Enum):
    IDLE = "idle"  # in the pool, or checked out but not yet handed to a thread
    QUEUED = "queued"  # a step was handed to a worker thread that has not started it
    RUNNING = "running"  # a worker thread is executing a step in it
    ABANDONED = "abandoned"  # out of the pool; its thread destroys it when the step ends


class _Unit:
    __slots__ = ("interp", "retired", "runs", "state", "ticket")

    def __init__(self, interp: Interpreter) -> None:
        self.interp = interp
        self.runs = 0
        self.state = _State.IDLE
        # Which hand-over the unit is QUEUED for: a thread whose step was cancelled before it
        # started must not run that stale step on a unit already handed to the next one.
        self.ticket = 0
        # Set (under the backend lock) by the thread that will destroy it; never pooled again.
        self.retired = False


class SubinterpreterBackend(Backend):
    """A pool of ``size`` isolated subinterpreters, each driven by a worker thread per step."""

    name = "subinterpreter"

    def __init__(self, *, size: int, sys_path: Sequence[str], preload: Sequence[str]) -> None:
        super().__init__(size=size, sys_path=sys_path, preload=preload)
        # Guards every unit's state/ticket/retired and the sets below: worker threads finishing
        # (possibly abandoned) steps race with the event loop timing them out.
        self._lock = threading.Lock()
        self._idle: list[_Unit] = []
        self._units: set[_Unit] = set()  # live and owned by the pool: idle or busy
        self._abandoned: set[_Unit] = set()
        self._slots = anyio.Semaphore(size)
        self._limiter = anyio.CapacityLimiter(size)
        self._closed = False

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
        units: list[_Unit] = []
        errors: list[Exception] = []

        async def create_one() -> None:
            try:
                units.append(await anyio.to_thread.run_sync(self._create_unit))
            except Exception as exc:  # collected: the first one is raised below, once
                errors.append(exc)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.size):
                    tg.start_soon(create_one)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._destroy_all(units)
            raise
        if errors:
            with anyio.CancelScope(shield=True):
                await self._destroy_all(units)
            error = errors[0]
            if isinstance(error, IsolationError):
                raise error
            raise IsolationError(f"cannot start a subinterpreter unit: {error}") from error
        with self._lock:
            self._units.update(units)
            self._idle.extend(units)

    async def run(self, request: bytes, spec: FunctionSpec) -> bytes:
        async with self._slots:
            if self._closed:  # checked after the wait too: aclose() may have run meanwhile
                raise RuntimeError("the subinterpreter backend is closed")
            try:
                unit = await self._checkout()
            except IsolationError as exc:
                return error_outcome("tether.UnitError", str(exc), retryable=True)
            retire = spec.max_runs is not None and unit.runs + 1 >= spec.max_runs
            with self._lock:
                unit.ticket += 1
                unit.state = _State.QUEUED
                ticket = unit.ticket
            try:
                with anyio.move_on_after(spec.timeout) as deadline:
                    outcome = await anyio.to_thread.run_sync(
                        self._step,
                        unit,
                        ticket,
                        request,
                        retire,
                        abandon_on_cancel=True,
                        limiter=self._limiter,
                    )
            except anyio.get_cancelled_exc_class():
                await self._abandon(unit)
                raise
            if deadline.cancelled_caught:
                await self._abandon(unit)
                return error_outcome(
                    "tether.StepTimeout",
                    f"the step exceeded its timeout of {spec.timeout:g} s; a subinterpreter"
                    " cannot be interrupted, so its unit was abandoned and will be destroyed"
                    " when the step ends",
                    retryable=True,
                )
            await self._checkin(unit)
            if outcome is None:  # defensive: only run() abandons a unit, and it stopped waiting
                return error_outcome(
                    "tether.UnitError", "the subinterpreter unit gave no outcome", retryable=True
                )
            return outcome

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._units.difference_update(idle)
        # Busy units are left to their threads: _step retires them once the backend is closed.
        await self._destroy_all(idle)

    # --- the pool (event loop side) -------------------------------------------------------

    async def _checkout(self) -> _Unit:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        # Lazily replaces a unit that was recycled, abandoned or broken.
        unit = await anyio.to_thread.run_sync(self._create_unit)
        with self._lock:
            self._units.add(unit)
        return unit

    async def _checkin(self, unit: _Unit) -> None:
        with self._lock:
            if unit.retired:
                self._units.discard(unit)  # its thread destroys it
                return
            if not self._closed:
                self._idle.append(unit)
                return
            self._units.discard(unit)
        # Closed while the step ran, after its thread checked. Shielded: this also runs on the
        # way out of a cancelled run().
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._destroy, unit)

    async def _abandon(self, unit: _Unit) -> None:
        """The caller stopped waiting for ``unit`` (timeout or cancellation)."""
        with self._lock:
            if unit.state is _State.RUNNING:
                unit.state = _State.ABANDONED
                self._units.discard(unit)
                self._abandoned.add(unit)
                _log.warning(
                    "abandoned subinterpreter %s: its step cannot be interrupted", unit.interp.id
                )
                return
            # QUEUED: the thread has not started the step and now never will (the ticket no
            # longer matches). IDLE: the step ended just as the deadline struck.
            unit.state = _State.IDLE
            unit.ticket += 1
        await self._checkin(unit)

    async def _destroy_all(self, units: Sequence[_Unit]) -> None:
        async with anyio.create_task_group() as tg:
            for unit in units:
                tg.start_soon(anyio.to_thread.run_sync, self._destroy, unit)

    # --- worker threads ---------------------------------------------------------------------

    def _create_unit(self) -> _Unit:
        try:
            interp = Interpreter()
        except InterpreterError as exc:
            raise IsolationError(str(exc)) from exc
        config = json.dumps({"sys_path": self.sys_path, "preload": self.preload})
        try:
            failure = interp.exec(_INIT, {"_tether_init": config})
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
        return _Unit(interp)

    def _step(self, unit: _Unit, ticket: int, request: bytes, retire: bool) -> bytes | None:
        """Execute one step in ``unit``; None if it was abandoned (nobody reads the result)."""
        with self._lock:
            if unit.state is not _State.QUEUED or unit.ticket != ticket:
                return None  # cancelled before this thread picked it up
            unit.state = _State.RUNNING
        problem: str | None = None
        reply: bytes | None = None
        try:
            failure = unit.interp.exec(_CALL, {"_tether_payload": request})
        except InterpreterError as exc:
            problem = f"the subinterpreter refused the step: {exc}"
        else:
            if failure is not None:
                problem = f"the step shim failed in the subinterpreter: {failure.traceback}"
            else:
                reply = unit.interp.take_reply()
                if reply is None:
                    problem = "the subinterpreter finished the step without an outcome"
        with self._lock:
            unit.runs += 1
            abandoned = unit.state is _State.ABANDONED
            if not abandoned:
                unit.state = _State.IDLE
                unit.retired = retire or problem is not None or self._closed
        if abandoned:
            self._destroy(unit)
            with self._lock:
                self._abandoned.discard(unit)
            return None
        if unit.retired:
            self._destroy(unit)
        if problem is not None:
            _log.error("subinterpreter %s: %s", unit.interp.id, problem)
            return error_outcome("tether.UnitError", problem, retryable=True)
        return reply

    def _destroy(self, unit: _Unit) -> None:
        try:
            unit.interp.close()
        except InterpreterError:
            # Only while it runs, which the states rule out; the atexit hook in _interpreters
            # gets another go at it.
            _log.exception("cannot destroy subinterpreter %s", unit.interp.id)
