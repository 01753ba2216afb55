"""The ``process`` backend: steps run in a pool of spawned Python processes.

Each unit is ``python -m tether.runner.isolation._child`` started with :class:`subprocess.Popen`
(a fresh interpreter: never ``fork``, which hangs or aborts a child of a process that holds
subinterpreters or threads), talking over two dedicated pipes in length-prefixed frames (see
:mod:`._child`). Its stdout and stderr are the runner's, so users see their prints.

Unlike a subinterpreter, a process can be stopped: a step that times out or is cancelled has its
process killed (SIGKILL) and the pool starts a replacement when it next needs one. A unit that
dies on its own mid-step (a segfault, ``os._exit``) fails that step only, as
``tether.UnitCrashed``.

This module must never block the event loop (all pipe I/O, spawning and reaping happen on worker
threads), never fork, and never leave a child unreaped.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import ClassVar, Final

import anyio
import anyio.to_thread

from ..._step import error_outcome
from ...app import FunctionSpec
from ...exceptions import IsolationError
from . import Backend
from ._child import child_environment, describe_exit, read_frame, write_frame

__all__ = ["ProcessBackend"]

_log = logging.getLogger(__name__)

_CHILD_MODULE: Final = "tether.runner.isolation._child"


class _State(enum.Enum):
    IDLE = "idle"  # in the pool, or checked out but not yet handed to a thread
    QUEUED = "queued"  # a step was handed to a worker thread that has not started it
    RUNNING = "running"  # a worker thread is exchanging frames with it
    KILLED = "killed"  # SIGKILLed mid-step; the step's thread reaps it


class _Unit:
    """One spawned child and the parent's ends of its two pipes."""

    __slots__ = (
        "_closed",
        "fresh",
        "from_child",
        "proc",
        "retired",
        "runs",
        "state",
        "ticket",
        "to_child",
    )

    def __init__(self, proc: subprocess.Popen[bytes], to_child: int, from_child: int) -> None:
        self.proc = proc
        self.to_child = to_child
        self.from_child = from_child
        self.runs = 0
        self.state = _State.IDLE
        # Which hand-over the unit is QUEUED for: a thread whose step was cancelled before it
        # started must not send that stale step to a unit already handed to the next one.
        self.ticket = 0
        # Set (under the backend lock) by the thread that will close it; never pooled again.
        self.retired = False
        self.fresh = False  # started for one fresh=True step: never pooled
        self._closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        # Popen.kill is a no-op once the child was reaped, so a late kill cannot hit a
        # recycled pid.
        self.proc.kill()

    def close(self, grace: float = 1.0) -> int:
        """Close the pipes, stop the child, reap it; its return code. Blocks: worker threads.

        Closing our end of its input is the polite stop (the child exits at end of file);
        SIGTERM after ``grace`` seconds, SIGKILL a second later.
        """
        if self._closed:
            return self.proc.wait()
        self._closed = True
        _close_fd(self.to_child)
        try:
            try:
                return self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
            try:
                return self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            return self.proc.wait()
        finally:
            # Only now: the child may still be writing its last frame until it is gone.
            _close_fd(self.from_child)


class _Spawning:
    """A unit being started on a worker thread, shared with the event loop that may give up."""

    __slots__ = ("abandoned", "done", "unit")

    def __init__(self) -> None:
        self.abandoned = False  # the event loop stopped waiting
        self.done = False  # the thread handed the unit over (whether or not anyone took it)
        self.unit: _Unit | None = None


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # already closed


class ProcessBackend(Backend):
    """A pool of ``size`` spawned unit processes."""

    name = "process"
    # A unit that has not imported its modules by then is killed and start() fails.
    start_timeout: ClassVar[float] = 60.0
    # How long aclose() waits for the threads that close killed or starting units.
    close_timeout: ClassVar[float] = 10.0

    def __init__(self, *, size: int, sys_path: Sequence[str], preload: Sequence[str]) -> None:
        super().__init__(size=size, sys_path=sys_path, preload=preload)
        # Guards every unit's state/ticket/retired and the collections below: worker threads
        # finishing steps race with the event loop timing them out or cancelling them.
        self._lock = threading.Lock()
        self._all_closed = threading.Condition(self._lock)  # notified as _units shrinks
        self._idle: list[_Unit] = []
        self._units: set[_Unit] = set()  # every child not reaped yet, pooled, busy or fresh
        self._slots = anyio.Semaphore(size)
        self._limiter = anyio.CapacityLimiter(size)
        self._closed = False

    async def start(self) -> None:
        units: list[_Unit] = []
        errors: list[Exception] = []

        async def start_one() -> None:
            try:
                units.append(await self._start_unit())
            except Exception as exc:  # collected: the first one is raised below, once
                errors.append(exc)

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.size):
                    tg.start_soon(start_one)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close_all(units)
            raise
        if errors:
            with anyio.CancelScope(shield=True):
                await self._close_all(units)
            error = errors[0]
            if isinstance(error, IsolationError):
                raise error
            raise IsolationError(f"cannot start a unit process: {error}") from error
        with self._lock:
            self._idle.extend(units)

    async def run(self, request: bytes, spec: FunctionSpec) -> bytes:
        async with self._slots:
            if self._closed:  # checked after the wait too: aclose() may have run meanwhile
                raise RuntimeError("the process backend is closed")
            try:
                # fresh=True: a process of its own for this step, never taken from the pool
                # and discarded after it (it still takes a slot: size bounds concurrency).
                unit = await (self._start_unit(fresh=True) if spec.fresh else self._checkout())
            except IsolationError as exc:
                return error_outcome("tether.UnitError", str(exc), retryable=True)
            retire = spec.fresh or (spec.max_runs is not None and unit.runs + 1 >= spec.max_runs)
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
                await self._stop(unit)
                raise
            if deadline.cancelled_caught:
                await self._stop(unit)
                return error_outcome(
                    "tether.StepTimeout",
                    f"the step exceeded its timeout of {spec.timeout:g} s;"
                    f" the process running it (pid {unit.pid}) was killed",
                    retryable=True,
                )
            await self._checkin(unit)
            if outcome is None:  # aclose() killed it while the step ran
                return error_outcome(
                    "tether.UnitCrashed",
                    "the process backend was closed while the step ran; its process was killed",
                    retryable=True,
                )
            return outcome

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            for unit in self._units.difference(idle):
                # Busy or still starting: SIGKILL. The thread driving it sees end of file,
                # answers its run() (if anyone still waits) and closes the unit.
                if unit.state is _State.RUNNING:
                    unit.state = _State.KILLED
                unit.kill()
        await self._close_all(idle)
        if not await anyio.to_thread.run_sync(self._wait_all_closed, self.close_timeout):
            _log.error("unit processes still running after aclose(): %s", self._pids())

    # --- the pool (event loop side) ---------------------------------------------------------

    async def _checkout(self) -> _Unit:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return await self._start_unit()  # lazily replaces a recycled, killed or crashed unit

    async def _checkin(self, unit: _Unit) -> None:
        with self._lock:
            if unit.retired or unit.state is _State.KILLED:
                return  # its thread closes it
            if not self._closed and not unit.fresh:
                self._idle.append(unit)
                return
        # A fresh unit whose step never started, or the backend closed while the step ran
        # (after its thread checked): the child is idle and exits at end of file. Shielded:
        # this also runs on the way out of a cancelled run().
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_unit, unit)

    async def _stop(self, unit: _Unit) -> None:
        """The caller stopped waiting for ``unit`` (timeout or cancellation): kill its step."""
        with self._lock:
            if unit.state is _State.RUNNING:
                unit.state = _State.KILLED
                unit.kill()
                _log.warning(
                    "killed unit process %s: its step timed out or was cancelled", unit.pid
                )
                return
            # QUEUED: the thread has not sent the step and now never will (the ticket no longer
            # matches). IDLE: the step ended just as the deadline struck.
            unit.state = _State.IDLE
            unit.ticket += 1
        await self._checkin(unit)

    async def _start_unit(self, *, fresh: bool = False) -> _Unit:
        spawning = _Spawning()
        try:
            with anyio.move_on_after(self.start_timeout):
                unit = await anyio.to_thread.run_sync(self._spawn, spawning, abandon_on_cancel=True)
                unit.fresh = fresh
                return unit
        except anyio.get_cancelled_exc_class():
            await self._abandon_spawn(spawning)
            raise
        await self._abandon_spawn(spawning)
        raise IsolationError(
            f"a unit process did not import its modules within {self.start_timeout:g} s"
        )

    async def _abandon_spawn(self, spawning: _Spawning) -> None:
        with self._lock:
            spawning.abandoned = True
            unit, done = spawning.unit, spawning.done
            if unit is not None and not done:
                unit.kill()  # the thread starting it sees end of file and closes it
        if unit is not None and done:
            # The thread finished just as we gave up: nobody else will close this one.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close_unit, unit)

    async def _close_all(self, units: Sequence[_Unit]) -> None:
        async def close(unit: _Unit) -> None:
            await anyio.to_thread.run_sync(self._close_unit, unit)

        async with anyio.create_task_group() as tg:
            for unit in units:
                tg.start_soon(close, unit)

    # --- worker threads ---------------------------------------------------------------------

    def _spawn(self, spawning: _Spawning) -> _Unit:
        child_read, to_child = os.pipe()
        from_child, child_write = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", _CHILD_MODULE, str(child_read), str(child_write)],
                pass_fds=(child_read, child_write),
                stdin=subprocess.DEVNULL,
                env=child_environment(),
            )
        except OSError as exc:
            _close_fd(to_child)
            _close_fd(from_child)
            raise IsolationError(f"cannot start a unit process: {exc}") from exc
        finally:
            # The child holds its own copies; ours would hide its death (no end of file).
            _close_fd(child_read)
            _close_fd(child_write)
        unit = _Unit(proc, to_child, from_child)
        with self._lock:
            self._units.add(unit)
            spawning.unit = unit
            if spawning.abandoned:
                unit.kill()  # the handshake below sees end of file and closes it
        config = json.dumps({"sys_path": self.sys_path, "preload": self.preload}).encode()
        try:
            write_frame(to_child, config)
            reply = read_frame(from_child)
        except OSError:
            reply = None
        if reply is None:
            returncode = self._close_unit(unit, grace=1.0)
            raise IsolationError(
                f"a unit process ended while starting ({describe_exit(returncode)});"
                " its stderr, above, says why"
            )
        answer = json.loads(reply)
        if not answer.get("ok"):
            self._close_unit(unit, grace=1.0)
            raise IsolationError(
                f"module {answer['module']} cannot be imported in a unit process:"
                f" {answer['reason']}"
            )
        with self._lock:
            spawning.done = not spawning.abandoned
        if not spawning.done:  # started fine, but nobody is waiting for it any more
            self._close_unit(unit)
            raise IsolationError("the unit process was started for a caller that left")
        return unit

    def _step(self, unit: _Unit, ticket: int, request: bytes, retire: bool) -> bytes | None:
        """Exchange one step with ``unit``; None if it was killed (nobody reads the result)."""
        with self._lock:
            if unit.state is not _State.QUEUED or unit.ticket != ticket:
                return None  # cancelled before this thread picked it up
            closed = self._closed
            unit.state = _State.KILLED if closed else _State.RUNNING
        if closed:  # aclose() ran since the hand-over (and killed it): do not even try
            self._close_unit(unit, grace=0.0)
            return None
        reply: bytes | None
        try:
            write_frame(unit.to_child, request)
            reply = read_frame(unit.from_child)
        except OSError:  # BrokenPipeError: it died before reading the request
            reply = None
        with self._lock:
            unit.runs += 1
            killed = unit.state is _State.KILLED
            if not killed:
                unit.state = _State.IDLE
                unit.retired = retire or reply is None or self._closed
        if killed:
            self._close_unit(unit, grace=0.0)
            return None
        if reply is None:
            returncode = self._close_unit(unit, grace=1.0)
            how = describe_exit(returncode)
            _log.error("unit process %s died during a step (%s)", unit.pid, how)
            return error_outcome(
                "tether.UnitCrashed",
                f"the process running the step (pid {unit.pid}) died ({how}); the step was lost",
                retryable=True,
            )
        if unit.retired:
            self._close_unit(unit)
        return reply

    def _close_unit(self, unit: _Unit, grace: float = 1.0) -> int:
        try:
            return unit.close(grace)
        finally:
            with self._lock:
                self._units.discard(unit)
                self._all_closed.notify_all()

    def _wait_all_closed(self, timeout: float) -> bool:
        with self._all_closed:
            return self._all_closed.wait_for(lambda: not self._units, timeout)

    def _pids(self) -> list[int]:
        with self._lock:
            return sorted(unit.pid for unit in self._units)
