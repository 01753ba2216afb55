"""The embedded store: one SQLite file in WAL mode.

WAL with ``synchronous=NORMAL`` makes every commit survive a crash of the hub process (the
tests kill it with SIGKILL); ``synchronous=FULL`` (``fsync=True``) also survives a power cut,
at the price of one fsync per group commit. Only the hub's store thread touches the
connection.

Checkpoints (copying the WAL back into the database, with an fsync of each) run on a thread of
their own with a second connection, never inside a commit: SQLite's automatic checkpoint ran
in whichever commit crossed 1,000 pages, stalling it (and every run waiting on it) for several
milliseconds every few hundred runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from ...exceptions import StoreError
from .._json import dumps
from . import NewRun, RunRecord, RunState, Store

__all__ = ["SQLiteStore"]

log = logging.getLogger("tether.hub.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id              TEXT PRIMARY KEY,
    function        TEXT NOT NULL,
    queue           TEXT NOT NULL,
    args            TEXT NOT NULL,
    kwargs          TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempt         INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    not_before      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    runner_id       TEXT,
    result          TEXT,
    error           TEXT,
    errors          TEXT NOT NULL DEFAULT '[]',
    idempotency_key TEXT UNIQUE
) WITHOUT ROWID;
-- Only unfinished runs are ever scanned; keep that scan independent of history size.
CREATE INDEX IF NOT EXISTS runs_unfinished ON runs (created_at)
    WHERE state IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS functions (
    name    TEXT PRIMARY KEY,
    info    TEXT NOT NULL,
    seen_at REAL NOT NULL
);
"""

_COLUMNS = (
    "id, function, queue, args, kwargs, state, attempt, created_at, not_before, started_at,"
    " finished_at, runner_id, result, error, errors, idempotency_key"
)


def _dumps(value: Any) -> str:
    if not value and (value == [] or value == {}):
        return "[]" if isinstance(value, list) else "{}"  # most runs' kwargs, many runs' args
    return dumps(value).decode()


_INSERT = (
    "INSERT INTO runs (id, function, queue, args, kwargs, state, created_at, not_before,"
    " idempotency_key) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)"
)
# An outcome without an error (a success, or a failure the hub records without one).
_FINISH = (
    "UPDATE runs SET state = ?, finished_at = ?, result = ?, error = NULL"
    " WHERE id = ? AND attempt = ? AND state IN ('running', 'queued')"
)
# A success whose running mark was never written (scheduler.MARK_DELAY): both in one write,
# fenced as both are (the stored attempt may only be older than the one that succeeded).
_START_AND_SUCCEED = (
    "UPDATE runs SET state = 'succeeded', finished_at = ?, result = ?, error = NULL,"
    " attempt = ?, runner_id = ?, started_at = COALESCE(started_at, ?)"
    " WHERE id = ? AND attempt <= ? AND state IN ('running', 'queued')"
)
# A run's attempt starts (again): only a queued or running run, never a finished one.
_MARK_RUNNING = (
    "UPDATE runs SET state = 'running', attempt = ?, runner_id = ?,"
    " started_at = COALESCE(started_at, ?) WHERE id = ? AND state IN ('queued', 'running')"
)


def _row(run: NewRun) -> tuple[Any, ...]:
    return (run.id, run.function, run.queue, _dumps(run.args), _dumps(run.kwargs),
            run.created_at, run.not_before, run.idempotency_key)  # fmt: skip


def _record(row: tuple[Any, ...]) -> RunRecord:
    return RunRecord(
        id=row[0],
        function=row[1],
        queue=row[2],
        args=json.loads(row[3]),
        kwargs=json.loads(row[4]),
        state=row[5],
        attempt=row[6],
        created_at=row[7],
        not_before=row[8],
        started_at=row[9],
        finished_at=row[10],
        runner_id=row[11],
        result=None if row[12] is None else json.loads(row[12]),
        error=None if row[13] is None else json.loads(row[13]),
        errors=json.loads(row[14]),
        idempotency_key=row[15],
    )


class _Checkpointer:
    """Checkpoints the WAL from a thread and connection of its own.

    Every ``interval`` a PASSIVE checkpoint copies what it can without waiting for the writer.
    Under a load that never pauses the WAL can still outgrow what PASSIVE checkpoints let the
    writer restart; past ``restart_pages`` a RESTART checkpoint makes the writer wait for one.
    """

    def __init__(self, path: str, *, interval: float = 0.2, restart_pages: int = 16384) -> None:
        self._path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._interval = interval
        self._restart_pages = restart_pages
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tether-checkpoint",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _serve(self) -> None:
        mode = "PASSIVE"
        while not self._stopping.wait(self._interval):
            try:
                _, wal_pages, _ = self._db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            except sqlite3.Error as exc:  # busy, or a disk error: the next one tries again
                log.warning("checkpoint of %s failed: %s", self._path, exc)
                continue
            mode = "RESTART" if wal_pages > self._restart_pages else "PASSIVE"

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


class SQLiteStore(Store):
    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._db: sqlite3.Connection | None = None
        self._checkpointer: _Checkpointer | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"store {self.path} is not open")
        return self._db

    def open(self) -> None:
        try:
            if self.path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, once per group commit.
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            if self.path != ":memory:":
                db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job
                self._checkpointer = _Checkpointer(self.path)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._db = db

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: cannot begin: {exc}") from exc
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: commit failed: {exc}") from exc

    def in_transaction(self) -> bool:
        return self.db.in_transaction

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        self.db.execute("SAVEPOINT op")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK TO op")
            self.db.execute("RELEASE op")
            raise
        self.db.execute("RELEASE op")

    def insert_runs(self, runs: Sequence[NewRun]) -> list[tuple[RunRecord, bool]]:
        out: list[tuple[RunRecord, bool]] = []
        rows = []  # inserted in one executemany: a batch submit is one statement, not N
        for run in runs:
            if run.idempotency_key is not None:
                row = self.db.execute(
                    f"SELECT {_COLUMNS} FROM runs WHERE idempotency_key = ?",
                    (run.idempotency_key,),
                ).fetchone()
                if row is not None:
                    out.append((_record(row), False))
                    continue
                # Inserted at once: a later run in this batch with the same key finds it.
                self.db.execute(_INSERT, _row(run))
            else:
                rows.append(_row(run))
            record = RunRecord(
                id=run.id,
                function=run.function,
                queue=run.queue,
                args=run.args,
                kwargs=run.kwargs,
                state="queued",
                attempt=0,
                created_at=run.created_at,
                not_before=run.not_before,
                idempotency_key=run.idempotency_key,
            )
            out.append((record, True))
        if rows:
            self.db.executemany(_INSERT, rows)
        return out

    def mark_running_many(self, marks: Sequence[tuple[str, int, str, float]]) -> None:
        self.db.executemany(
            _MARK_RUNNING,
            [(attempt, runner_id, now, run_id) for run_id, attempt, runner_id, now in marks],
        )

    def get(self, run_id: str) -> RunRecord | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else _record(row)

    def unfinished(self) -> list[RunRecord]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM runs WHERE state IN ('queued', 'running') ORDER BY created_at"
        ).fetchall()
        return [_record(row) for row in rows]

    def mark_running(self, run_id: str, attempt: int, runner_id: str, now: float) -> None:
        self.db.execute(
            _MARK_RUNNING,
            (attempt, runner_id, now, run_id),
        )

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
        if error is None:
            result_text = _dumps(result) if state == "succeeded" else None
            cursor = self.db.execute(_FINISH, (state, now, result_text, run_id, attempt))
        else:
            cursor = self.db.execute(
                "UPDATE runs SET state = ?, finished_at = ?, result = NULL, error = ?,"
                " errors = json_insert(errors, '$[#]', json(?))"
                " WHERE id = ? AND attempt = ? AND state IN ('running', 'queued')",
                (state, now, _dumps(error), _dumps({"attempt": attempt, **error}), run_id,
                 attempt),
            )  # fmt: skip
        return cursor.rowcount == 1

    def succeed_many(
        self,
        outcomes: Sequence[tuple[str, int, Any, float]],
        marks: Sequence[tuple[str, int, str, float]] = (),
    ) -> None:
        started = {run_id: (attempt, runner_id, at) for run_id, attempt, runner_id, at in marks}
        rows, marked = [], []
        for run_id, attempt, result, now in outcomes:
            mark = started.pop(run_id, None)
            if mark is not None and mark[0] == attempt:  # marked and finished in one write
                marked.append((now, _dumps(result), attempt, mark[1], mark[2], run_id, attempt))
            else:
                if mark is not None:  # the mark of another attempt: written first, alone
                    self.mark_running(run_id, *mark)
                rows.append(("succeeded", now, _dumps(result), run_id, attempt))
        if started:  # marks of runs without an outcome here
            self.mark_running_many([(run_id, *mark) for run_id, mark in started.items()])
        if marked:
            self.db.executemany(_START_AND_SUCCEED, marked)
        if rows:
            self.db.executemany(_FINISH, rows)

    def requeue(
        self, run_id: str, attempt: int, *, not_before: float, error: dict[str, Any] | None
    ) -> bool:
        if error is None:
            cursor = self.db.execute(
                "UPDATE runs SET state = 'queued', not_before = ?, runner_id = NULL"
                " WHERE id = ? AND attempt = ? AND state IN ('running', 'queued')",
                (not_before, run_id, attempt),
            )
        else:
            cursor = self.db.execute(
                "UPDATE runs SET state = 'queued', not_before = ?, runner_id = NULL,"
                " errors = json_insert(errors, '$[#]', json(?))"
                " WHERE id = ? AND attempt = ? AND state IN ('running', 'queued')",
                (not_before, _dumps({"attempt": attempt, **error}), run_id, attempt),
            )
        return cursor.rowcount == 1

    def cancel(self, run_id: str, now: float) -> RunRecord | None:
        self.db.execute(
            "UPDATE runs SET state = 'cancelled', finished_at = ?"
            " WHERE id = ? AND state IN ('queued', 'running')",
            (now, run_id),
        )
        return self.get(run_id)

    def remember_functions(self, functions: dict[str, dict[str, Any]], now: float) -> None:
        self.db.executemany(
            "INSERT INTO functions (name, info, seen_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET info = excluded.info, seen_at = excluded.seen_at",
            [(name, _dumps(info), now) for name, info in functions.items()],
        )

    def known_functions(self) -> dict[str, dict[str, Any]]:
        rows = self.db.execute("SELECT name, info FROM functions").fetchall()
        return {name: json.loads(info) for name, info in rows}

    def count_by_state(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM runs GROUP BY state").fetchall()
        return {state: count for state, count in rows}
