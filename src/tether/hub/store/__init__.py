"""Where the hub keeps runs: one interface, implementations chosen by URL.

The hub's coordination state (ready queues, leases, sessions) lives in memory; the store is the
durable record it is rebuilt from after a restart. Every method here is synchronous and runs on
the store's own writer thread (see :class:`.sqlite.SQLiteStore`), never on the event loop.

A run accepted by the API is in the store before the API answers; a result is in the store
before the runner is told it may forget it.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Final, Literal

__all__ = ["FINISHED", "NewRun", "RunRecord", "RunState", "Store", "new_run_ids", "open_store"]

RunState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: Final = frozenset({"succeeded", "failed", "cancelled"})


def new_run_ids(n: int) -> list[str]:
    """``n`` new run ids: 32 hex digits that sort by creation time (a 48-bit clock in ms, then
    80 random bits, all ``n`` drawn in one read of the system's random source)."""
    clock = f"{int(time.time() * 1000):012x}"
    random = secrets.token_hex(10 * n)
    return [clock + random[i : i + 20] for i in range(0, 20 * n, 20)]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NewRun:
    id: str
    function: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    created_at: float
    not_before: float  # wall-clock seconds; equal to created_at unless delayed
    idempotency_key: str | None = None


@dataclasses.dataclass(slots=True, kw_only=True)
class RunRecord:
    id: str
    function: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    state: RunState
    attempt: int  # number of the last dispatch; 0 while never dispatched
    created_at: float
    not_before: float
    started_at: float | None = None
    finished_at: float | None = None
    runner_id: str | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    idempotency_key: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def public(self) -> dict[str, Any]:
        """The run as ``GET /v1/runs/{id}`` shows it."""
        body: dict[str, Any] = {
            "id": self.id,
            "function": self.function,
            "queue": self.queue,
            "state": self.state,
            "attempt": self.attempt,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.state == "succeeded":
            body["result"] = self.result
        if self.error is not None:
            body["error"] = {k: self.error.get(k, "") for k in ("type", "message", "traceback")}
        if self.errors:
            body["errors"] = self.errors
        return body


class Store(ABC):
    """The durable record of runs. Implementations: SQLite (default), PostgreSQL."""

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> Any:
        """A context manager: everything inside commits together (group commit)."""

    @abstractmethod
    def in_transaction(self) -> bool:
        """Whether :meth:`transaction`'s transaction is still open: a failed statement may
        have ended it (a full disk, say), after which nothing more can be done in it."""

    @abstractmethod
    def savepoint(self) -> Any:
        """A context manager nested in a transaction: if its body raises, only it is undone."""

    @abstractmethod
    def insert_runs(self, runs: Sequence[NewRun]) -> list[tuple[RunRecord, bool]]:
        """Insert runs; for an idempotency key already stored, return that run instead.

        Returns ``(record, created)`` for each input, in order.
        """

    @abstractmethod
    def get(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    def unfinished(self) -> list[RunRecord]:
        """Every queued and running run, oldest first (the hub's state after a restart)."""

    @abstractmethod
    def mark_running(self, run_id: str, attempt: int, runner_id: str, now: float) -> None: ...

    def mark_running_many(self, marks: Sequence[tuple[str, int, str, float]]) -> None:
        """:meth:`mark_running` for each ``(run_id, attempt, runner_id, now)``; a store may do
        them in one statement."""
        for run_id, attempt, runner_id, now in marks:
            self.mark_running(run_id, attempt, runner_id, now)

    @abstractmethod
    def finish(
        self,
        run_id: str,
        attempt: int,
        state: RunState,
        *,
        result: Any = None,
        error: dict[str, Any] | None = None,
        now: float,
    ) -> bool:
        """Record the outcome of ``attempt``; False (nothing written) if the run is finished or
        has moved on to a newer attempt. (The scheduler fences in memory first: it also knows
        whether ``attempt``'s outcome was already recorded.)"""

    def succeed_many(
        self,
        outcomes: Sequence[tuple[str, int, Any, float]],
        marks: Sequence[tuple[str, int, str, float]] = (),
    ) -> None:
        """:meth:`finish` as succeeded for each ``(run_id, attempt, result, now)``, fenced
        alike, after :meth:`mark_running_many` of ``marks``: the marks of some of these runs
        that were never written. A store may write a run's mark with its outcome, and all of
        them in one statement."""
        self.mark_running_many(marks)
        for run_id, attempt, result, now in outcomes:
            self.finish(run_id, attempt, "succeeded", result=result, now=now)

    @abstractmethod
    def requeue(
        self, run_id: str, attempt: int, *, not_before: float, error: dict[str, Any] | None
    ) -> bool:
        """Put ``attempt`` back in the queue (a retry, or its runner was lost); fenced."""

    @abstractmethod
    def cancel(self, run_id: str, now: float) -> RunRecord | None:
        """Cancel a queued or running run; returns the run as it now is, None if unknown."""

    @abstractmethod
    def remember_functions(self, functions: dict[str, dict[str, Any]], now: float) -> None: ...

    @abstractmethod
    def known_functions(self) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    def count_by_state(self) -> dict[str, int]: ...


def open_store(url: str | os.PathLike[str]) -> Store:
    """The store for ``url``: ``sqlite:///path``, a plain file path, or ``postgresql://``."""
    text = os.fspath(url)
    if text.startswith(("postgres://", "postgresql://")):
        from ...exceptions import ConfigError

        raise ConfigError(f"store {text!r}: the PostgreSQL store is not available in this build")
    from .sqlite import SQLiteStore

    return SQLiteStore(text.removeprefix("sqlite:///").removeprefix("sqlite://"))
