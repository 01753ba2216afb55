"""Isolation backends: where a step runs, behind one small interface.

A backend is a pool of *units* of one kind (isolated subinterpreters, spawned processes). The
runner hands it a step as request bytes (see :mod:`tether._step`) and gets outcome bytes back;
it never branches on which backend it holds. Backends are chosen by name::

    backend = create_backend("process", size=4, sys_path=sys.path, preload=["app.tasks"])
    await backend.start()
    outcome = await backend.run(request, spec)

Contract every backend keeps:

* ``run`` never raises for anything a step does: a user error, a timeout (``spec.timeout``), a
  crashed unit all come back as an error outcome, with ``retryable`` set as documented below.
* ``run`` is cancellable (anyio cancellation): a process unit is killed; a subinterpreter
  cannot be stopped from outside, so its unit is abandoned (taken out of the pool, destroyed
  when the step ends) and counted in :attr:`Backend.abandoned`.
* Nothing here runs user code on the calling thread: the event loop that calls ``run`` stays
  free, which is what keeps heartbeats on time.

Both backends hand steps over through pipes that the event loop itself watches
(``add_reader``), which is several times cheaper per step than a hop through a worker thread:
they need anyio's asyncio backend on a selector event loop (the default on Unix), and a backend
belongs to the event loop that started it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar

from ...app import FunctionSpec

__all__ = [
    "BACKENDS",
    "UNIT_NICENESS",
    "Backend",
    "create_backend",
    "lower_priority",
    "start_units",
]

# Units run this much nicer than the runner: on a machine whose every core is busy with steps,
# the scheduler still hands the connection thread a core as soon as it wakes to heartbeat.
UNIT_NICENESS = 10


def lower_priority(native_thread_id: int = 0) -> None:
    """Make a unit's thread (or, with 0, the calling process) nicer by UNIT_NICENESS.

    Linux schedules threads individually, so this works per thread there; elsewhere a failure
    only means steps compete with the connection thread as equals."""
    import os

    try:
        current = os.getpriority(os.PRIO_PROCESS, native_thread_id)
        os.setpriority(os.PRIO_PROCESS, native_thread_id, min(19, current + UNIT_NICENESS))
    except (AttributeError, OSError):
        pass


class Backend(ABC):
    """A pool of isolation units of one kind."""

    name: ClassVar[str]

    def __init__(self, *, size: int, sys_path: Sequence[str], preload: Sequence[str]) -> None:
        self.size = size
        self.sys_path = list(sys_path)
        self.preload = list(preload)

    @abstractmethod
    async def start(self) -> None:
        """Start the pool's units, importing ``preload`` in each; IsolationError if one fails."""

    @abstractmethod
    async def run(self, request: bytes, spec: FunctionSpec) -> bytes:
        """Run one step in a unit and return its outcome bytes (never raises for the step)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop every unit; steps still running in subinterpreters are abandoned."""

    @property
    def abandoned(self) -> int:
        """Units taken out of the pool while their step still runs (subinterpreters only)."""
        return 0


BACKENDS: dict[str, str] = {
    "process": "tether.runner.isolation.process:ProcessBackend",
    "subinterpreter": "tether.runner.isolation.subinterpreter:SubinterpreterBackend",
}


def create_backend(
    name: str, *, size: int, sys_path: Sequence[str], preload: Sequence[str]
) -> Backend:
    import importlib

    module, _, cls = BACKENDS[name].partition(":")
    backend_cls: type[Backend] = getattr(importlib.import_module(module), cls)
    return backend_cls(size=size, sys_path=sys_path, preload=preload)


async def start_units[U](
    count: int,
    start_unit: Callable[[], Awaitable[U]],
    close_all: Callable[[list[U]], Awaitable[None]],
    what: str,
) -> list[U]:
    """Start ``count`` units at once. If any fails, close the ones that started and raise
    IsolationError (the first failure, once); a cancellation closes them too."""
    import anyio

    from ...exceptions import IsolationError

    units: list[U] = []
    errors: list[Exception] = []

    async def start_one() -> None:
        try:
            units.append(await start_unit())
        except Exception as exc:  # collected: the first one is raised below, once
            errors.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(start_one)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await close_all(units)
        raise
    if errors:
        with anyio.CancelScope(shield=True):
            await close_all(units)
        error = errors[0]
        if isinstance(error, IsolationError):
            raise error
        raise IsolationError(f"cannot start {what}: {error}") from error
    return units
