"""The ``process`` backend: steps run in a pool of spawned Python processes.

Each unit is ``python -m tether.runner.isolation._child`` started with :class:`subprocess.Popen`
(a fresh interpreter: never ``fork``, which hangs or aborts a child of a process that holds
subinterpreters or threads), talking over two dedicated pipes in length-prefixed frames (see
:mod:`._child`). Its stdout and stderr are the runner's, so users see their prints.

A step's frames are written and read on the event loop itself, with no thread in between: the
parent's ends of a unit's pipes are non-blocking and watched with the running loop's
``add_reader``/``add_writer``, so a warm step costs the loop one wake-up when the outcome
arrives (a hop to a worker thread and back through ``anyio.to_thread`` cost about 0.15 ms more;
see ``benchmarks/isolation_overhead.py``). This is the one place the backend reaches below
anyio, so it needs anyio's *asyncio* backend on a selector event loop, which the runner's
connection thread uses; timeouts, cancellation and the pool's slots are still anyio's.
Spawning, closing and reaping a unit block, so they happen on threads.

Unlike a subinterpreter, a process can be stopped: a step that times out or is cancelled has its
process killed (SIGKILL) and the pool starts a replacement when it next needs one. A unit that
dies on its own mid-step (a segfault, ``os._exit``) fails that step only, as
``tether.UnitCrashed``.

This module must never block the event loop (non-blocking pipes there; spawning, closing and
reaping on threads), never fork, and never leave a child unreaped.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar, Final

import anyio
import anyio.to_thread

from ..._step import error_outcome
from ...app import FunctionSpec
from ...exceptions import IsolationError
from . import Backend, start_units
from ._child import (
    advance,
    child_environment,
    describe_exit,
    frame_views,
    read_frame,
    write_frame,
)

__all__ = ["ProcessBackend"]

_log = logging.getLogger(__name__)

_CHILD_MODULE: Final = "tether.runner.isolation._child"
_HEADER: Final = 4
# The first read of an outcome asks for this much: a small outcome arrives whole in one read
# (header and all), and the buffer stays under malloc's mmap threshold.
_FIRST_READ: Final = 64 * 1024


class _State(enum.Enum):
    IDLE = "idle"  # in the pool, or checked out with no frame in flight
    RUNNING = "running"  # a step's frames are being exchanged with it
    KILLED = "killed"  # SIGKILLed mid-step (timeout, cancellation, aclose); run() reaps it


class _Unit:
    """One spawned child and the parent's ends of its two pipes.

    Once in service, an event loop watches ``from_child`` (:meth:`listen`) until the unit is
    closed, rather than once per step: that saves two ``epoll_ctl`` calls and their
    bookkeeping a step, and notices a child that dies while idle.
    """

    __slots__ = (
        "_closed",
        "_on_lost",
        "exchange",
        "fresh",
        "from_child",
        "loop",
        "lost",
        "proc",
        "runs",
        "state",
        "to_child",
    )

    def __init__(self, proc: subprocess.Popen[bytes], to_child: int, from_child: int) -> None:
        self.proc = proc
        self.to_child = to_child
        self.from_child = from_child
        self.runs = 0
        self.state = _State.IDLE  # only the event loop reads or changes it
        self.fresh = False  # started for one fresh=True step: never pooled
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop watching from_child
        self.exchange: _Exchange | None = None  # the step in flight
        self.lost = False  # it closed its channel or wrote to it unasked while idle
        self._on_lost: Callable[[_Unit], None] | None = None
        self._closed = False

    def listen(self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[_Unit], None]) -> None:
        """Watch the child's output on ``loop`` (its own thread) until :meth:`unlisten`;
        ``on_lost`` hears of a child that ends (or writes) while no step is in flight."""
        self.loop = loop
        self._on_lost = on_lost
        loop.add_reader(self.from_child, self._on_readable)

    def unlisten(self) -> None:
        """Stop watching (idempotent); before the pipes are closed, on the listening loop."""
        if self.loop is not None:
            self.loop.remove_reader(self.from_child)
            self.loop = None

    def _on_readable(self) -> None:
        if self.exchange is not None:
            self.exchange.on_readable()
            return
        # Nothing was asked: the child died while idle, or wrote what it must not.
        try:
            data = os.read(self.from_child, _FIRST_READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.unlisten()  # end of file stays readable: stop watching
        self.lost = True
        if data:
            self.kill()  # it broke the channel: it cannot be trusted with a step
        if self._on_lost is not None:
            self._on_lost(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        # Popen.kill is a no-op once the child was reaped, so a late kill cannot hit a
        # recycled pid.
        self.proc.kill()

    def close(self, grace: float = 1.0) -> int:
        """Close the pipes, stop the child, reap it; its return code. Blocks: threads only.

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


class _Exchange:
    """One step's round trip with a unit: its request frame out, its outcome frame in.

    Driven entirely by the event loop's readiness callbacks on the unit's non-blocking pipes;
    ``done`` completes when the outcome arrived or the child's end of file did.
    """

    __slots__ = (
        "_body",
        "_got",
        "_head",
        "_loop",
        "_out",
        "_unit",
        "_view",
        "_writing",
        "broken",
        "complete",
        "done",
        "reply",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, unit: _Unit, request: bytes) -> None:
        self._loop = loop
        self._unit = unit
        self.done: asyncio.Future[None] = loop.create_future()
        self.complete = False  # the outcome, or the end of file, arrived
        self.reply: bytes | None = None  # the outcome; None if the child died first
        self.broken = False  # the child wrote more than one frame: the channel is unusable
        self._out = frame_views(request)
        self._writing = False
        self._head = b""  # the start of the outcome, until its header is complete
        self._body: bytearray | None = None  # the rest of a large outcome, preallocated
        self._view: memoryview | None = None
        self._got = 0
        unit.exchange = self  # the unit's reader hands what it reads to on_readable
        self._on_writable()  # a frame that fits in the pipe goes out right here, in one write

    def stop(self) -> None:
        """Stop exchanging (idempotent); the caller no longer waits."""
        if self._unit.exchange is self:
            self._unit.exchange = None
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._unit.to_child)

    def _finish(self, reply: bytes | None) -> None:
        if self.complete:
            return
        self.complete = True
        self.reply = reply
        self.stop()
        if not self.done.done():
            self.done.set_result(None)

    def _on_writable(self) -> None:
        try:
            written = os.writev(self._unit.to_child, self._out)
        except BlockingIOError:
            written = 0
        except OSError:  # BrokenPipeError: the child is gone, and so is the step
            self._finish(None)
            return
        self._out = advance(self._out, written)
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(self._unit.to_child, self._on_writable)
        elif not self._out and self._writing:
            self._writing = False
            self._loop.remove_writer(self._unit.to_child)

    def on_readable(self) -> None:
        try:
            if self._body is None:
                chunk = os.read(self._unit.from_child, _FIRST_READ)
                if not chunk:
                    self._finish(None)
                    return
                self._collect_head(self._head + chunk)
                return
            assert self._view is not None
            count = os.readv(self._unit.from_child, [self._view[self._got :]])
        except BlockingIOError:
            return
        except OSError:
            self._finish(None)
            return
        if not count:
            self._finish(None)
            return
        self._got += count
        if self._got == len(self._body):
            self._finish(bytes(self._body))

    def _collect_head(self, head: bytes) -> None:
        if len(head) < _HEADER:
            self._head = head
            return
        size = int.from_bytes(head[:_HEADER], "big")
        got = len(head) - _HEADER
        if got == size:
            self._finish(head[_HEADER:])
        elif got > size:  # the child answers one frame per request, never more
            self.broken = True
            self._finish(None)
        else:  # a large outcome: read the rest straight into a buffer of its final size
            try:
                self._body = bytearray(size)
            except MemoryError:  # a length no step could have meant
                self.broken = True
                self._finish(None)
                return
            self._body[:got] = head[_HEADER:]
            self._view = memoryview(self._body)
            self._got = got


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
        # Guards _units: threads spawning and reaping units race with the event loop. Unit
        # states and _idle belong to the event loop alone.
        self._lock = threading.Lock()
        self._all_closed = threading.Condition(self._lock)  # notified as _units shrinks
        self._idle: list[_Unit] = []
        self._units: set[_Unit] = set()  # every child not reaped yet, pooled, busy or fresh
        # fast_acquire: a free slot is taken without a trip through the event loop.
        self._slots = anyio.Semaphore(size, fast_acquire=True)
        self._closed = False

    async def start(self) -> None:
        self._idle.extend(
            await start_units(self.size, self._start_unit, self._close_all, "a unit process")
        )

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
            if self._closed:  # aclose() ran while the unit was starting, and killed it
                self._close_later(unit, grace=0.0)
                return _closed_outcome()
            retire = spec.fresh or (spec.max_runs is not None and unit.runs + 1 >= spec.max_runs)
            unit.state = _State.RUNNING
            exchange = _Exchange(asyncio.get_running_loop(), unit, request)
            try:
                if spec.timeout is None:
                    await exchange.done
                else:
                    with anyio.move_on_after(spec.timeout) as deadline:
                        await exchange.done
                    if deadline.cancelled_caught and not exchange.complete:
                        self._kill(unit, exchange)
                        return error_outcome(
                            "tether.StepTimeout",
                            f"the step exceeded its timeout of {spec.timeout:g} s;"
                            f" the process running it (pid {unit.pid}) was killed",
                            retryable=True,
                        )
            except anyio.get_cancelled_exc_class():
                if exchange.complete:  # it ended just as the caller left
                    if exchange.reply is not None and unit.state is _State.RUNNING:
                        self._checkin(unit, retire)
                    else:
                        self._close_later(unit, grace=0.0)
                else:
                    self._kill(unit, exchange)
                raise
            return await self._outcome(unit, exchange, retire)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        with self._lock:
            others = self._units.difference(idle)
        for unit in others:
            # Busy, starting or being closed: SIGKILL. A busy unit's run() sees end of file,
            # answers (if anyone still waits) and reaps it; the others have a thread for that.
            if unit.state is _State.RUNNING:
                unit.state = _State.KILLED
            unit.kill()
        await self._close_all(idle)
        if not await anyio.to_thread.run_sync(self._wait_all_closed, self.close_timeout):
            _log.error("unit processes still running after aclose(): %s", self._pids())

    # --- the pool (event loop side) ---------------------------------------------------------

    async def _checkout(self) -> _Unit:
        if self._idle:
            return self._idle.pop()
        return await self._start_unit()  # lazily replaces a recycled, killed or crashed unit

    def _checkin(self, unit: _Unit, retire: bool) -> None:
        unit.state = _State.IDLE
        unit.runs += 1
        if retire or unit.fresh or unit.lost or self._closed:
            self._close_later(unit)  # the child is idle (or gone): it exits at end of file
        else:
            self._idle.append(unit)

    def _lost(self, unit: _Unit) -> None:
        """``unit``'s child ended, or broke its channel, while no step was in flight."""
        _log.warning("unit process %s ended between steps; it will be replaced", unit.pid)
        if unit in self._idle:  # else a run() holds it, and closes it instead of pooling it
            self._idle.remove(unit)
            self._close_later(unit, grace=0.0)

    async def _outcome(self, unit: _Unit, exchange: _Exchange, retire: bool) -> bytes:
        """The step's outcome once its exchange completed; the unit goes back or away."""
        if unit.state is _State.KILLED:  # aclose() killed it mid-step
            self._close_later(unit, grace=0.0)
            return _closed_outcome()
        if exchange.reply is not None:
            self._checkin(unit, retire)
            return exchange.reply
        # It died mid-step (or broke the channel): reap it before answering, whose return
        # code says how. Shielded: the unit must be reaped whatever happens to the caller.
        if exchange.broken:
            unit.kill()
        unit.state = _State.KILLED
        unit.unlisten()
        with anyio.CancelScope(shield=True):
            returncode = await anyio.to_thread.run_sync(self._close_unit, unit, 1.0)
        how = describe_exit(returncode)
        if exchange.broken:
            _log.error("unit process %s broke the framing of its channel; killed", unit.pid)
            return error_outcome(
                "tether.UnitCrashed",
                f"the process running the step (pid {unit.pid}) broke the framing of its"
                " channel and was killed; the step was lost",
                retryable=True,
            )
        _log.error("unit process %s died during a step (%s)", unit.pid, how)
        return error_outcome(
            "tether.UnitCrashed",
            f"the process running the step (pid {unit.pid}) died ({how}); the step was lost",
            retryable=True,
        )

    def _kill(self, unit: _Unit, exchange: _Exchange) -> None:
        """The caller stopped waiting for a step still running (timeout or cancellation)."""
        exchange.stop()
        if unit.state is _State.RUNNING:
            _log.warning("killed unit process %s: its step timed out or was cancelled", unit.pid)
        unit.state = _State.KILLED
        unit.kill()
        self._close_later(unit, grace=0.0)

    def _close_later(self, unit: _Unit, grace: float = 1.0) -> None:
        """Close and reap ``unit`` on a thread of its own; aclose() waits for it."""
        unit.unlisten()
        try:
            threading.Thread(
                target=self._close_unit, args=(unit, grace), name=f"tether-reap-{unit.pid}"
            ).start()
        except RuntimeError:  # no thread to be had (interpreter shutdown): quick and blocking
            unit.kill()
            self._close_unit(unit, grace=0.0)

    async def _start_unit(self, *, fresh: bool = False) -> _Unit:
        spawning = _Spawning()
        try:
            with anyio.move_on_after(self.start_timeout):
                unit = await anyio.to_thread.run_sync(self._spawn, spawning, abandon_on_cancel=True)
                unit.fresh = fresh
                unit.listen(asyncio.get_running_loop(), self._lost)
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
        for unit in units:
            unit.unlisten()

        async def close(unit: _Unit) -> None:
            await anyio.to_thread.run_sync(self._close_unit, unit)

        async with anyio.create_task_group() as tg:
            for unit in units:
                tg.start_soon(close, unit)

    # --- threads ----------------------------------------------------------------------------

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
        # From now on the event loop does this unit's I/O, and must never block on it. (Our
        # ends only: the child's are separate open files and stay blocking.)
        os.set_blocking(to_child, False)
        os.set_blocking(from_child, False)
        with self._lock:
            spawning.done = not spawning.abandoned
        if not spawning.done:  # started fine, but nobody is waiting for it any more
            self._close_unit(unit)
            raise IsolationError("the unit process was started for a caller that left")
        return unit

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


def _closed_outcome() -> bytes:
    return error_outcome(
        "tether.UnitCrashed",
        "the process backend was closed while the step ran; its process was killed",
        retryable=True,
    )
