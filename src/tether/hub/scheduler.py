"""The hub's coordinator: matches queued runs to runners, holds leases, decides retries.

Coordination state lives here, in memory, on the event loop: ready queues per (queue,
function), delayed runs, connected runner sessions, leases, waiters. The store is the durable
record it is rebuilt from (:meth:`Scheduler.recover`). An API answer goes out after the run is
inserted, and a ``result_ack`` after the outcome is stored. A new run dispatched at once is
marked "running" in its insert's commit. A run dispatched from a queue goes out at once and its
mark waits in memory (:data:`MARK_DELAY`): it is written with the run's result if that comes
first, else on its own, and always before any store operation that reads or changes runs
(:meth:`Scheduler._store`; the store writes operations in the order they were queued). If the
hub dies before a mark is written, the run is still "queued" in the store, one attempt behind
the dispatch that went out: :meth:`Scheduler.recover` takes that attempt as possibly sent, so a
runner that comes back with it before the run is dispatched again is recognised, and the next
dispatch uses a newer number (delivery is at least once).

Nothing here touches a socket: sessions are given a ``send`` callable that queues a frame
without blocking and a ``close`` callable; the WebSocket endpoint (:mod:`.app`) owns the rest.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..exceptions import StoreError
from ..protocol import (
    Ack,
    Assignment,
    Cancel,
    CloseCode,
    Dispatch,
    Draining,
    Extend,
    Extended,
    FunctionInfo,
    HeartbeatStats,
    HubConnection,
    LeaseLost,
    LeaseTable,
    Message,
    Outcome,
    RejectDispatch,
    Result,
    ResultAck,
    RunRef,
    encode,
    encode_split,
)
from .metrics import HubMetrics
from .storage import StoreThread, as_store_error
from .store import NewRun, RunRecord, RunState, Store, new_run_ids

__all__ = ["MAX_HOLD_PER_SLOT", "HubTimings", "Scheduler", "Session", "SubmitRequest"]

# Runs waiting on a runner. A runner is sent, per slot (and per unit of a function's
# concurrency), one run to run and some to wait there, so that it starts its next step the
# moment one ends rather than a round trip to the hub later: as many as keep the slot busy for
# about WAITING_MS, by how long the function's steps have been taking, at most
# MAX_HOLD_PER_SLOT - 1. A function whose steps take longer than that gets none waiting (the
# round trip is small beside its steps); one not seen yet gets one waiting per slot. Runs go
# to the runner with the most room first, so they wait on a runner only while every runner is
# busy, and a busy runner is topped up a quarter of its runs at a time (Scheduler._pick). The
# runner accepts up to MAX_HOLD_PER_SLOT per slot (runner/connection.py).
MAX_HOLD_PER_SLOT = 32
WAITING_MS = 8.0
# How long a dispatched run's "running" mark may wait in memory before it is written on its
# own: a run that finishes sooner has its mark written with its result, one row write instead
# of two. (Any store operation that might read or change such a run writes the marks first.)
MARK_DELAY = 0.05

log = logging.getLogger("tether.hub")
run_log = logging.getLogger("tether.runs")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HubTimings:
    """The intervals the hub announces in ``welcome``; runners never hard-code them."""

    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    lease: float = 30.0
    handshake_timeout: float = 10.0
    max_message_bytes: int = 16 * 1024 * 1024
    max_deliveries: int = 10  # a run whose runner was lost this many times fails

    @property
    def extend_interval(self) -> float:
        return self.lease / 3


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubmitRequest:
    function: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str | None = None
    idempotency_key: str | None = None
    delay: float = 0.0


@dataclasses.dataclass(slots=True, kw_only=True)
class _Run:
    """An unfinished run, as the scheduler tracks it."""

    id: str
    function: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    attempt: int
    not_before: float  # wall clock
    created_at: float = 0.0
    started_at: float | None = None  # wall clock of the first dispatch
    idempotency_key: str | None = None
    failures: int = 0  # attempts that ended in a retryable error
    losses: int = 0  # attempts whose runner was lost
    settled: int = 0  # the newest attempt whose outcome is recorded
    # An attempt a previous hub may have dispatched without recording it (see the module
    # docstring): a runner reporting it is believed; the next dispatch goes past it.
    unrecorded: int = 0

    def finished_record(self, attempt: int, value: Any, now: float, runner_id: str) -> RunRecord:
        """The stored record of this run once ``attempt`` succeeded with ``value``, for a run
        whose record holds no errors (no attempt before it failed or was lost)."""
        return RunRecord(
            id=self.id, function=self.function, queue=self.queue, args=self.args,
            kwargs=self.kwargs, state="succeeded", attempt=attempt, created_at=self.created_at,
            not_before=self.not_before, started_at=self.started_at, finished_at=now,
            runner_id=runner_id, result=value,
            idempotency_key=self.idempotency_key,
        )  # fmt: skip

    @classmethod
    def from_record(cls, record: RunRecord) -> _Run:
        failures = sum(1 for e in record.errors if e.get("type") != "tether.RunnerLost")
        last = record.errors[-1] if record.errors else {}
        settled = record.attempt if last.get("attempt") == record.attempt else 0
        if last.get("type") == "tether.RunnerLost":
            settled = 0  # a lost attempt's result may still arrive
        return cls(
            id=record.id,
            function=record.function,
            queue=record.queue,
            args=record.args,
            kwargs=record.kwargs,
            attempt=record.attempt,
            not_before=record.not_before,
            created_at=record.created_at,
            started_at=record.started_at,
            idempotency_key=record.idempotency_key,
            failures=failures,
            losses=len(record.errors) - failures,
            settled=settled,
        )


@dataclasses.dataclass(slots=True)
class _Reported:
    """Outcomes from one runner, settled in memory, waiting to be recorded."""

    now: float  # when they arrived (wall clock): their runs' finished_at
    fenced: list[RunRef] = dataclasses.field(default_factory=list)  # to acknowledge only
    # run, outcome, the attempt settled before it (restored if the store refuses), and the
    # record its waiters were told, if any
    succeeded: list[tuple[_Run, Outcome, int, RunRecord | None]] = dataclasses.field(
        default_factory=list
    )
    failed: list[tuple[_Run, Outcome, int]] = dataclasses.field(default_factory=list)


class Session:
    """One connected runner, as the scheduler sees it."""

    def __init__(
        self,
        conn: HubConnection,
        *,
        session_id: str,
        send: Callable[[bytes], bool],
        close: Callable[[int, str], None],
        peer: str = "",
    ) -> None:
        assert conn.hello is not None
        self.conn = conn
        self.hello = conn.hello
        self.runner_id = conn.hello.runner_id
        self.session_id = session_id
        self.peer = peer
        self._send = send
        self._close = close
        self.functions: dict[str, FunctionInfo] = {f.name: f for f in conn.hello.functions}
        self.in_flight: dict[str, int] = {}  # run id -> attempt
        self.running: collections.Counter[str] = collections.Counter()  # by function
        self.draining = conn.hello.draining
        self.connected_at = time.time()
        self.closed = False

    @property
    def slots(self) -> int:
        return self.hello.slots

    @property
    def hold_limit(self) -> int:
        """Runs per slot this runner accepts (it says so in its hello)."""
        return max(1, self.hello.hold_per_slot)

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - len(self.in_flight))

    @property
    def room(self) -> int:
        """Slots free (positive), or runs waiting for a slot on the runner (negative)."""
        return self.slots - len(self.in_flight)

    def can_take(self, function: str, hold: int = 1) -> bool:
        """Room for one more run of ``function``, holding up to ``hold`` per slot."""
        if self.closed or self.draining or len(self.in_flight) >= self.slots * hold:
            return False
        limit = self.functions[function].concurrency
        return limit is None or self.running[function] < limit * hold

    def send(self, message: Message) -> None:
        if not self.closed:
            self._write(encode(message))

    def send_batch[T](self, make: Callable[[tuple[T, ...]], Message], items: Sequence[T]) -> None:
        """``make(items)`` as one message, or several if one would exceed the size limit."""
        if not self.closed:
            for frame in encode_split(make, items, self.conn.max_message_bytes):
                self._write(frame)

    def _write(self, frame: bytes) -> None:
        if not self.closed and not self._send(frame):
            self.close(CloseCode.SLOW_CONSUMER, "runner is not reading its frames")

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._close(code, reason)

    def take(self, run_id: str, attempt: int, function: str) -> None:
        self.in_flight[run_id] = attempt
        self.running[function] += 1

    def release(self, run_id: str, function: str) -> None:
        if self.in_flight.pop(run_id, None) is not None:
            self.running[function] -= 1


class Scheduler:
    def __init__(self, storage: StoreThread, timings: HubTimings | None = None) -> None:
        self.storage = storage
        self.store = storage.store
        self.timings = timings or HubTimings()
        self.runs: dict[str, _Run] = {}
        self._ready: dict[tuple[str, str], collections.deque[str]] = {}
        self._delayed: list[tuple[float, str]] = []
        # Runs kept out of the queues until a reconnecting runner re-sends the result it holds
        # for them (by run id: until when, monotonic).
        self._held: dict[str, float] = {}
        self.sessions: dict[str, Session] = {}  # by runner id
        self._serving: dict[str, set[str]] = collections.defaultdict(set)  # function -> runners
        self.functions: dict[str, dict[str, Any]] = {}  # every function ever registered
        self.leases = LeaseTable()
        # Heartbeat statistics of runners that disconnected, by runner id: a runner that comes
        # back continues its record, so a gap spans the time it was away (or declared dead).
        self._heartbeat_history: dict[str, HeartbeatStats] = {}
        # Long polls by run id: each gets the finished run's record, read back in the commit that
        # finished it (or None, and reads the store itself).
        self._waiters: dict[str, set[asyncio.Future[RunRecord | None]]] = {}
        # How long each function's steps take, as runners report it (a moving average, ms).
        self._step_ms: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # while serve() runs
        self._dispatch_due = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reported: dict[Session, _Reported] = {}  # settled, not yet recorded
        # Running marks not written yet, by run id: (run_id, attempt, runner_id, started at).
        self._marks: dict[str, tuple[str, int, str, float]] = {}
        self._marks_timer: asyncio.TimerHandle | None = None
        self.metrics = HubMetrics()

    # -- life cycle ---------------------------------------------------------------------------

    async def recover(self) -> None:
        """Rebuild memory from the store: queued runs wait again, running runs keep a lease
        long enough for their runner to reconnect and claim (or finish) them."""
        self.functions = await self.storage.call(self.store.known_functions)
        records = await self.storage.call(self.store.unfinished)
        grace = time.monotonic() + self.timings.heartbeat_timeout * 2
        for record in records:
            run = _Run.from_record(record)
            self.runs[run.id] = run
            if record.state == "running" and record.runner_id is not None:
                ref = RunRef(run_id=run.id, attempt=run.attempt)
                self.leases.grant(ref, record.runner_id, grace)
            else:
                run.unrecorded = run.attempt + 1
                self._enqueue(run)
        if records:
            log.info("recovered %d unfinished runs from the store", len(records))

    async def serve(self) -> None:
        """Dispatch and keep time until cancelled."""
        self._loop = asyncio.get_running_loop()
        self.wake()
        try:
            await self._clock_loop()
        finally:
            self._write_marks()  # queued before the store thread stops
            self._loop = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hub task failed", exc_info=task.exception())

    def _store[T](self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue a store operation that may read or change runs, after the marks still
        waiting in memory: it sees every dispatched run as running."""
        self._write_marks()
        return self.storage.submit(fn, *args, **kwargs)

    def _mark_soon(self, marks: Iterable[tuple[str, int, str, float]]) -> None:
        """Keep running marks in memory for up to :data:`MARK_DELAY` (while serving)."""
        self._marks.update((mark[0], mark) for mark in marks)
        if self._loop is None:  # stopping: the store thread stops after what is queued now
            self._write_marks()
        elif self._marks and self._marks_timer is None:
            self._marks_timer = asyncio.get_running_loop().call_later(
                MARK_DELAY, self._write_marks
            )

    def _write_marks(self) -> None:
        """Queue every running mark still in memory, in one store operation."""
        if self._marks_timer is not None:
            self._marks_timer.cancel()
            self._marks_timer = None
        if self._marks:
            marks, self._marks = list(self._marks.values()), {}
            self.storage.submit(_mark_running_many, self.store, marks).add_done_callback(
                _log_store_failure
            )

    async def count_by_state(self) -> dict[str, int]:
        return await self._store(self.store.count_by_state)

    def wake(self) -> None:
        """Dispatch what can be dispatched, once the current callback is done: everything that
        freed slots or queued runs meanwhile is handled by one pass."""
        if self._loop is not None and not self._dispatch_due:
            self._dispatch_due = True
            self._loop.call_soon(self._dispatch)

    # -- producers ----------------------------------------------------------------------------

    def queue_of(self, function: str) -> str | None:
        """The queue a function's runners registered it on; None if never registered."""
        info = self.functions.get(function)
        return None if info is None else str(info.get("queue", "default"))

    async def submit(
        self,
        requests: Sequence[SubmitRequest],
        *,
        watch: dict[str, asyncio.Future[RunRecord | None]] | None = None,
    ) -> list[tuple[RunRecord, bool]]:
        """Store new runs (answered once committed) and start those a runner can take now.

        ``watch``: filled with a waiter for each run started at once, in place before its
        dispatch goes out, for :meth:`wait` (a quick step may finish before the commit does).
        """
        now = time.time()
        new = [
            NewRun(
                id=run_id,
                function=r.function,
                queue=r.queue or self.queue_of(r.function) or "default",
                args=r.args,
                kwargs=r.kwargs,
                created_at=now,
                not_before=now + r.delay,
                idempotency_key=r.idempotency_key,
            )
            for r, run_id in zip(requests, new_run_ids(len(requests)), strict=True)
        ]
        # Runs a runner can take at once are dispatched while their insert is being written:
        # the step runs while the API answer waits for the commit, and they are marked running
        # in that commit, so a hub that dies after answering knows they went out. (Should the
        # commit fail, or the hub die first, the producer was never told the run was accepted,
        # and its result will be refused: a run that was not accepted may still have run once.)
        starts = self._claim_new(new, now)
        if watch is not None:
            loop = asyncio.get_running_loop()
            for _, run in starts:
                watch[run.id] = waiter = loop.create_future()
                self._waiters.setdefault(run.id, set()).add(waiter)
        try:
            if starts:
                # Before the insert is queued, which wakes the store thread: the runner gets
                # the dispatch first. Whatever the dispatch leads to is queued for the store
                # later (it takes another turn of the loop).
                self._send_dispatches(starts, now, log_running=False)  # logged once stored
        finally:
            marks = [(run.id, run.attempt, session.runner_id, now) for session, run in starts]
            # A run with an idempotency key may be found instead of inserted: it is read after
            # the marks still in memory are written.
            keyed = any(run.idempotency_key is not None for run in new)
            insert = (self._store if keyed else self.storage.submit)(
                _insert_runs, self.store, new, marks
            )
        try:
            stored = await insert
        except BaseException:
            for session, run in starts:
                self._finished(run.id)  # its waiter, if any: nothing to wait for
                self.runs.pop(run.id, None)
                self._unqueue(run)
                if self.leases.holds(RunRef(run_id=run.id, attempt=run.attempt), session.runner_id):
                    self.leases.release(run.id)
                    self._release(session, run.id, run.function)
            raise
        started = {run.id: (session, run) for session, run in starts}
        for record, created in stored:
            if created:
                start = started.get(record.id)
                if start is None:
                    run = _Run.from_record(record)
                    self.runs[run.id] = run
                    self._enqueue(run)
                else:
                    run = start[1]  # (it may have finished already: it is logged all the same)
                self.metrics.function(run.function).submitted.inc()
                _log_run(run, "queued")
                if start is not None:
                    _log_run(run, "running", runner=start[0].runner_id)
        self.wake()
        return stored

    def _claim_new(self, new: Sequence[NewRun], now: float) -> list[tuple[Session, _Run]]:
        """Slots and leases for the new runs a runner can take right now, in order; a run that
        is delayed, has an idempotency key (it may turn out to exist already), or would
        overtake runs already waiting in its queue is left to the queue."""
        starts: list[tuple[Session, _Run]] = []
        blocked: set[tuple[str, str]] = set()
        topping: set[Session] = set()
        expires = time.monotonic() + self.timings.lease
        for n in new:
            key = (n.queue, n.function)
            if key in blocked:
                continue
            session = None
            if n.idempotency_key is None and n.not_before <= now and not self._ready.get(key):
                session = self._pick(n.function, n.queue, topping)
            if session is None:
                blocked.add(key)
                continue
            run = _Run(id=n.id, function=n.function, queue=n.queue, args=n.args,
                       kwargs=n.kwargs, attempt=1, not_before=n.not_before,
                       created_at=n.created_at, started_at=now)  # fmt: skip
            # Known before its insert commits, so that a runner lost meanwhile requeues it
            # (the requeue is written after the insert: the store thread keeps their order).
            self.runs[run.id] = run
            session.take(run.id, run.attempt, run.function)
            self.leases.grant(RunRef(run_id=run.id, attempt=run.attempt), session.runner_id,
                              expires)  # fmt: skip
            starts.append((session, run))
        return starts

    async def get(self, run_id: str) -> RunRecord | None:
        return await self._store(self.store.get, run_id)

    async def wait(
        self,
        run_id: str,
        timeout: float,
        waiter: asyncio.Future[RunRecord | None] | None = None,
    ) -> RunRecord | None:
        """The run once it is finished, or as it is when ``timeout`` passes. ``waiter``: one
        :meth:`submit` put in place (it may be answered already)."""
        if waiter is not None or (run_id in self.runs and timeout > 0):
            if waiter is None:
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(run_id, set()).add(waiter)
            try:
                async with asyncio.timeout(timeout):
                    record = await waiter
                if record is not None:
                    return record  # read back in the commit that finished it
            except TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(run_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[run_id]
        return await self.get(run_id)

    async def cancel(self, run_id: str) -> RunRecord | None:
        record = await self._store(self.store.cancel, run_id, time.time())
        run = self.runs.pop(run_id, None)
        if run is not None and record is not None and record.state == "cancelled":
            lease = self.leases.release(run_id)
            if lease is not None:
                session = self.sessions.get(lease.holder)
                if session is not None:
                    self._release(session, run_id, run.function)
                    session.send(Cancel(run_id=run_id, attempt=lease.ref.attempt))
            else:
                self._unqueue(run)
            self.metrics.function(run.function).cancelled.inc()
            _log_run(run, "cancelled")
            self._finished(run_id, record)
            self.wake()
        return record

    def _finished(self, run_id: str, record: RunRecord | None = None) -> None:
        for waiter in self._waiters.pop(run_id, ()):
            if not waiter.done():
                waiter.set_result(record)

    def _release(self, session: Session, run_id: str, function: str) -> None:
        """Free ``run_id``'s slot on ``session``; the dispatcher may fill it at once, so that
        its store write shares a commit with the one that freed it."""
        session.release(run_id, function)
        self.wake()

    # -- queues -------------------------------------------------------------------------------

    def _enqueue(self, run: _Run) -> None:
        if run.not_before > time.time():
            heapq.heappush(self._delayed, (run.not_before, run.id))
        else:
            self._ready.setdefault((run.queue, run.function), collections.deque()).append(run.id)

    def _unqueue(self, run: _Run) -> None:
        ready = self._ready.get((run.queue, run.function))
        if ready is not None:
            try:
                ready.remove(run.id)
            except ValueError:
                pass  # it was delayed: the heap entry is skipped when it comes due

    def queue_depths(self) -> dict[str, int]:
        depths: collections.Counter[str] = collections.Counter()
        for (queue, _), ready in self._ready.items():
            depths[queue] += len(ready)
        return dict(depths)

    def _hold(self, function: str) -> int:
        """Runs per slot a runner may hold for ``function``: see :data:`WAITING_MS`."""
        step_ms = self._step_ms.get(function)
        if step_ms is None:
            return 2
        return 1 + min(MAX_HOLD_PER_SLOT - 1, int(WAITING_MS / max(step_ms, 0.01)))

    def _pick(self, function: str, queue: str, topping: set[Session]) -> Session | None:
        """The runner to take a run of ``function`` next, or None.

        A runner with a free slot takes one at once. One whose slots are all busy is topped up
        only once a quarter of the runs it may hold have finished, and then to the full: so
        runs waiting on a runner are sent several to a message, not one per result that arrives.
        ``topping``: the runners being topped up in this pass (updated)."""
        best: Session | None = None
        wanted = self._hold(function)
        for runner_id in self._serving.get(function, ()):
            session = self.sessions[runner_id]
            hold = min(wanted, session.hold_limit)
            if session.functions[function].queue != queue or not session.can_take(function, hold):
                continue
            if session.room <= 0 and session not in topping:
                if 4 * len(session.in_flight) > 3 * session.slots * hold:
                    continue  # enough waiting there for now
            if best is None or session.room > best.room:
                best = session
        if best is not None:
            topping.add(best)
        return best

    def _assign(self) -> list[tuple[Session, _Run]]:
        assignments: list[tuple[Session, _Run]] = []
        expires = time.monotonic() + self.timings.lease
        topping: set[Session] = set()
        for (queue, function), ready in self._ready.items():
            while ready:
                session = self._pick(function, queue, topping)
                if session is None:
                    break
                run = self.runs.get(ready.popleft())
                if run is None:  # cancelled while queued
                    continue
                run.attempt = max(run.attempt, run.unrecorded) + 1
                session.take(run.id, run.attempt, function)
                self.leases.grant(
                    RunRef(run_id=run.id, attempt=run.attempt), session.runner_id, expires
                )
                assignments.append((session, run))
        return assignments

    def _dispatch(self) -> None:
        self._dispatch_due = False
        if self._loop is None:
            return
        assignments = self._assign()
        if not assignments:
            return
        now = time.time()
        marks = []
        for session, run in assignments:
            marks.append((run.id, run.attempt, session.runner_id, now))
            if run.started_at is None:
                run.started_at = now
        # Written soon, or with the run's result (MARK_DELAY); the dispatches go out at once.
        self._mark_soon(marks)
        self._send_dispatches(assignments, now)

    def _send_dispatches(
        self, assignments: list[tuple[Session, _Run]], now: float, *, log_running: bool = True
    ) -> None:
        """Send the dispatches of runs marked running (or about to be): one message per
        runner."""
        orders: dict[Session, list[Assignment]] = {}
        for session, run in assignments:
            # The lease may be gone already (cancelled while we were writing): skip it.
            if self.leases.holds(RunRef(run_id=run.id, attempt=run.attempt), session.runner_id):
                orders.setdefault(session, []).append(
                    Assignment(
                        run_id=run.id,
                        attempt=run.attempt,
                        function=run.function,
                        args=run.args,
                        kwargs=run.kwargs,
                        timeout=session.functions[run.function].timeout,
                    )
                )
                metrics = self.metrics.function(run.function)
                metrics.started.inc()
                metrics.queue_wait.observe(max(0.0, now - run.not_before))
                if log_running:
                    _log_run(run, "running", runner=session.runner_id)
        lease_ms = int(self.timings.lease * 1000)
        for session, runs in orders.items():
            session.send_batch(lambda batch: Dispatch(runs=batch, lease_ms=lease_ms), runs)

    async def _clock_loop(self) -> None:
        tick = min(0.05, self.timings.heartbeat_interval / 2)
        while True:
            await asyncio.sleep(tick)
            self._tick(time.monotonic(), time.time())

    def _tick(self, now: float, wall: float) -> None:
        while self._delayed and self._delayed[0][0] <= wall:
            _, run_id = heapq.heappop(self._delayed)
            run = self.runs.get(run_id)
            if run is not None and run_id not in self.leases and run_id not in self._held:
                self._ready.setdefault((run.queue, run.function), collections.deque()).append(
                    run_id
                )
                self.wake()
        for run_id in [r for r, until in self._held.items() if until <= now]:
            del self._held[run_id]
            if (run := self.runs.get(run_id)) is not None and run_id not in self.leases:
                self._enqueue(run)  # the promised result never came: run it again
                self.wake()
        for session in list(self.sessions.values()):
            if session.conn.runner_silent(now):
                log.warning(
                    "runner %s missed heartbeats for %.1fs: declaring it dead",
                    session.runner_id,
                    self.timings.heartbeat_timeout,
                )
                self.metrics.runners_lost.inc()
                session.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
                self.detach(session)
                # It was silent for a whole timeout already: its runs go back now.
                for lease in self.leases.held_by(session.runner_id):
                    lease.expires_at = now
        for lease in self.leases.expired(now):
            self._spawn(self._lost(lease.ref, lease.holder, "lease expired"))

    async def _lost(self, ref: RunRef, holder: str, why: str) -> None:
        """``ref``'s runner stopped answering for it: queue the run again as a new attempt."""
        lease = self.leases.get(ref.run_id)
        if lease is None or lease.ref != ref:
            return
        self.leases.release(ref.run_id)
        run = self.runs.get(ref.run_id)
        session = self.sessions.get(holder)
        if session is not None:
            self._release(session, ref.run_id, run.function if run else "")
            session.send(LeaseLost(run_id=ref.run_id, attempt=ref.attempt, reason=why))
        if run is None:
            return
        run.losses += 1
        error = {
            "type": "tether.RunnerLost",
            "message": f"runner {holder} lost attempt {ref.attempt}: {why}",
            "traceback": "",
        }
        log.warning("run %s attempt %d: %s", run.id, ref.attempt, error["message"])
        if run.losses >= self.timings.max_deliveries:
            await self._fail(run, ref.attempt, error)
            return
        self.metrics.function(run.function).lost.inc()
        _log_run(run, "queued", reason=why)
        await self._store(
            self.store.requeue, run.id, ref.attempt, not_before=time.time(), error=error
        )
        run.not_before = time.time()
        self._enqueue(run)
        self.wake()

    async def _fail(self, run: _Run, attempt: int, error: dict[str, Any]) -> None:
        record = await self._store(
            _finish, self.store, run.id, attempt, "failed", None, error, time.time(),
            run.id in self._waiters,
        )  # fmt: skip
        self.runs.pop(run.id, None)
        self.metrics.function(run.function).failed.inc()
        _log_run(run, "failed", error=error["type"])
        self._finished(run.id, record)

    # -- runners ------------------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        """A runner finished its handshake."""
        previous = self.sessions.get(session.runner_id)
        if previous is not None:
            previous.close(CloseCode.SUPERSEDED, "the same runner connected again")
            self.detach(previous)
        self.sessions[session.runner_id] = session
        kept = self._heartbeat_history.pop(session.runner_id, None)
        if kept is not None and kept.interval_ms == session.conn.heartbeats.interval_ms:
            session.conn.heartbeats = kept
        for name in session.functions:
            self._serving[name].add(session.runner_id)
        infos = {f.name: dataclasses.asdict(f) for f in session.hello.functions}
        self.functions.update(infos)
        self._spawn(self.storage.call(self.store.remember_functions, infos, time.time()))
        # Runs still executing from a previous connection (or a previous hub): keep the
        # leases this runner still holds, tell it which ones it lost.
        expires = time.monotonic() + self.timings.lease
        for ref in session.hello.in_flight:
            run = self.runs.get(ref.run_id)
            if run is not None and self.leases.holds(ref, session.runner_id):
                self.leases.extend((ref,), session.runner_id, expires)
                session.take(ref.run_id, ref.attempt, run.function)
            elif run is not None and ref.run_id not in self.leases and self._is_current(run, ref):
                # Declared lost, but nothing newer started: the step is still running on this
                # runner, so give it back its lease rather than run it twice.
                self._unqueue(run)
                self._held.pop(run.id, None)
                run.attempt = max(run.attempt, ref.attempt)
                now = time.time()
                if run.started_at is None:
                    run.started_at = now
                self.leases.grant(ref, session.runner_id, expires)
                session.take(ref.run_id, ref.attempt, run.function)
                self._store(
                    self.store.mark_running, run.id, ref.attempt, session.runner_id, now
                ).add_done_callback(_log_store_failure)
                _log_run(run, "running", runner=session.runner_id, reason="reattached")
            else:
                session.send(LeaseLost(run_id=ref.run_id, attempt=ref.attempt, reason="stale"))
        # Results it finished while away: keep those runs out of the queues until the results
        # (sent right after the handshake) arrive, instead of running them again.
        hold_until = time.monotonic() + self.timings.heartbeat_timeout
        for ref in session.hello.unacked:
            run = self.runs.get(ref.run_id)
            if run is not None and self._is_current(run, ref) and ref.run_id not in self.leases:
                self._unqueue(run)
                self._held[run.id] = hold_until
        log.info(
            "runner %s connected from %s (pid %d, %d slots, %d functions)",
            session.runner_id,
            session.hello.host,
            session.hello.pid,
            session.slots,
            len(session.functions),
        )
        self.wake()

    def detach(self, session: Session) -> None:
        """A runner's connection ended. Its leases stay for one heartbeat timeout, so a runner
        that reconnects keeps its runs; one that does not comes back has them re-dispatched."""
        if self.sessions.get(session.runner_id) is not session:
            return
        del self.sessions[session.runner_id]
        for name in session.functions:
            self._serving[name].discard(session.runner_id)
        now = time.monotonic()
        self._heartbeat_history[session.runner_id] = session.conn.heartbeats
        forget = now - 60 * self.timings.heartbeat_timeout
        for runner_id, stats in list(self._heartbeat_history.items()):
            if stats.last_at is None or stats.last_at < forget:
                del self._heartbeat_history[runner_id]
        deadline = time.monotonic() + self.timings.heartbeat_timeout
        for lease in self.leases.held_by(session.runner_id):
            lease.expires_at = min(lease.expires_at, deadline)
        log.info("runner %s disconnected", session.runner_id)

    def on_message(self, session: Session, message: Message) -> None:
        """Handle one message from a runner; never blocks (store work runs as a task)."""
        if isinstance(message, Result):
            self._take_up(session, message.outcomes)
        elif isinstance(message, Extend):
            extended, lost = self.leases.extend(
                message.runs, session.runner_id, time.monotonic() + self.timings.lease
            )
            if extended:
                session.send(
                    Extended(runs=tuple(extended), lease_ms=int(self.timings.lease * 1000))
                )
            for ref in lost:
                session.send(LeaseLost(run_id=ref.run_id, attempt=ref.attempt, reason="not held"))
        elif isinstance(message, RejectDispatch):
            self._spawn(self._on_reject(session, message))
        elif isinstance(message, Draining):
            session.draining = True
            log.info("runner %s is draining", session.runner_id)
        elif isinstance(message, Ack):
            pass  # the lease was granted at dispatch; an ack only confirms the runner has it

    async def _on_reject(self, session: Session, message: RejectDispatch) -> None:
        ref = RunRef(run_id=message.run_id, attempt=message.attempt)
        run = self.runs.get(message.run_id)
        if run is None or not self.leases.holds(ref, session.runner_id):
            return
        self.leases.release(run.id)
        self._release(session, run.id, run.function)
        if message.reason == "draining":
            session.draining = True
        log.info("runner %s rejected run %s: %s", session.runner_id, run.id, message.reason)
        await self._store(
            self.store.requeue, run.id, ref.attempt, not_before=time.time(), error=None
        )
        self._enqueue(run)
        self.wake()

    def _is_current(self, run: _Run, ref: RunRef) -> bool:
        """Fencing: may ``ref``'s outcome be recorded? Yes for the attempt holding the lease,
        and for a lost attempt that nothing newer has replaced yet (its runner was cut off,
        the run waits in the queue, and the result is as good as a new attempt's would be)."""
        lease = self.leases.get(run.id)
        if lease is not None:
            return lease.ref == ref
        if run.settled >= ref.attempt:
            return False
        return ref.attempt == run.attempt or ref.attempt == run.unrecorded

    def _take_up(self, session: Session, outcomes: Sequence[Outcome]) -> None:
        """Settle ``outcomes`` in memory at once (fencing, leases, slots; whoever waits for a
        success hears of it now) and have them recorded. The outcomes that arrive in one turn
        of the event loop, in one frame or in several read together, are recorded by one task
        that starts on the next turn: the successes in one store operation, each failure or
        retry in its own, and all of them acknowledged in one message. (It is started after the
        waiters are told, so that their answers go out before the store thread is woken.)"""
        reported = self._reported.get(session)
        if reported is None:
            self._reported[session] = reported = _Reported(now=time.time())
            try:
                self._settle_all(session, reported, outcomes)
            finally:
                self._spawn(self._record(session))
        else:
            self._settle_all(session, reported, outcomes)

    def _settle_all(
        self, session: Session, reported: _Reported, outcomes: Sequence[Outcome]
    ) -> None:
        now = reported.now
        for outcome in outcomes:
            ref = RunRef(run_id=outcome.run_id, attempt=outcome.attempt)
            run = self.runs.get(outcome.run_id)
            if run is None or not self._is_current(run, ref):
                # Fencing: a newer attempt started, the run was cancelled, or this outcome is
                # stored already. Acknowledge so the runner forgets it; record nothing.
                log.info(
                    "ignoring result of run %s attempt %d from %s: not the current attempt",
                    outcome.run_id, outcome.attempt, session.runner_id,
                )  # fmt: skip
                self.metrics.fenced.inc()
                reported.fenced.append(ref)
                continue
            settled, run.settled = run.settled, ref.attempt
            holder = self._settle(session, run, outcome, now)
            if not outcome.ok:
                reported.failed.append((run, outcome, settled))
                continue
            # Whoever waits for it gets the run as it now is. When nothing but this outcome is
            # in its record, it is built here and they have it at once, before it is written;
            # otherwise it is read back in the commit. The runner is acknowledged only after
            # the commit and holds the result until then, so what a waiter was told stands: a
            # restarted hub gets it again, and so does this one if the commit fails
            # (_ask_again).
            told = None
            if run.id in self._waiters and run.failures == 0 and run.losses == 0:
                told = run.finished_record(outcome.attempt, outcome.value, now, holder)
                self._finished(run.id, told)
            reported.succeeded.append((run, outcome, settled, told))

    async def _record(self, session: Session) -> None:
        """Record what :meth:`_take_up` settled for ``session`` and acknowledge it."""
        reported = self._reported.pop(session)
        acked = list(reported.fenced)
        if reported.succeeded:
            acked += await self._record_successes(session, reported.succeeded, reported.now)
        for run, outcome, settled in reported.failed:
            ref = RunRef(run_id=outcome.run_id, attempt=outcome.attempt)
            if await self._record_failure(session, run, outcome, settled, reported.now):
                acked.append(ref)
        if acked:
            session.send_batch(lambda batch: ResultAck(runs=batch), acked)
        self.wake()

    def _settle(self, session: Session, run: _Run, outcome: Outcome, now: float) -> str:
        """The bookkeeping of an outcome that will be recorded: its step time, its lease and
        slot, its attempt. Returns the runner that held the attempt."""
        previous = self._step_ms.get(run.function)
        self._step_ms[run.function] = (
            outcome.duration_ms if previous is None else previous * 0.9 + outcome.duration_ms * 0.1
        )
        lease = self.leases.release(run.id)
        if lease is not None:
            holder = self.sessions.get(lease.holder)
            if holder is not None:
                self._release(holder, run.id, run.function)
        else:  # a lost attempt's late result: take the run back out of the queue
            self._held.pop(run.id, None)
            self._unqueue(run)
        if outcome.attempt > run.attempt:
            # The attempt a previous hub dispatched without recording it: record it now (the
            # store fences outcomes on the attempt), before the outcome itself.
            run.attempt = outcome.attempt
            if run.started_at is None:
                run.started_at = now
            self._store(
                self.store.mark_running, run.id, outcome.attempt, session.runner_id, now
            ).add_done_callback(_log_store_failure)
        return lease.holder if lease is not None else session.runner_id

    async def _record_successes(
        self,
        session: Session,
        succeeded: list[tuple[_Run, Outcome, int, RunRecord | None]],
        now: float,
    ) -> list[RunRef]:
        """Store successes in one operation; the refs to acknowledge. (Who waited for them
        may have been told already: see :meth:`_take_up`.)"""
        read = [run.id for run, _, _, told in succeeded if told is None and run.id in self._waiters]
        rows = [(run.id, outcome.attempt, outcome.value, now) for run, outcome, _, _ in succeeded]
        marks = [mark for run, _, _, _ in succeeded if (mark := self._marks.pop(run.id, None))]
        try:
            records = await self.storage.call(_succeed_many, self.store, rows, marks, read)
        except StoreError as exc:
            # The commit failed, marks included: those runs are still running (unless marked
            # again since).
            self._mark_soon(mark for mark in marks if mark[0] not in self._marks)
            records = exc
        if isinstance(records, StoreError):
            for run, outcome, settled, _ in succeeded:
                ref = RunRef(run_id=outcome.run_id, attempt=outcome.attempt)
                self._ask_again(session, run, ref, settled, records)
            return []
        acked = []
        for run, outcome, _, told in succeeded:
            self.runs.pop(run.id, None)
            metrics = self.metrics.function(run.function)
            metrics.succeeded.inc()
            metrics.duration.observe(outcome.duration_ms / 1000)
            _log_run(run, "succeeded", duration_ms=outcome.duration_ms)
            self._finished(run.id, told or records.get(run.id))
            acked.append(RunRef(run_id=outcome.run_id, attempt=outcome.attempt))
        return acked

    async def _record_failure(
        self, session: Session, run: _Run, outcome: Outcome, settled: int, now: float
    ) -> bool:
        """Store a failed attempt: a retry, or the run's failure. False if the store refused
        (the runner is asked for it again)."""
        assert outcome.error is not None
        error = {
            "type": outcome.error.type,
            "message": outcome.error.message,
            "traceback": outcome.error.traceback,
        }
        info = session.functions.get(run.function) or self.functions.get(run.function)
        retries, backoff = _retry_policy(info)
        failures, not_before = run.failures, run.not_before
        try:
            if outcome.error.retryable and run.failures < retries:
                run.failures += 1
                delay = backoff * 2 ** (run.failures - 1) * random.uniform(0.5, 1.5)
                run.not_before = now + delay
                await self._store(
                    self.store.requeue, run.id, outcome.attempt, not_before=run.not_before,
                    error=error,
                )  # fmt: skip
                self.metrics.function(run.function).retried.inc()
                _log_run(run, "queued", error=error["type"],
                         retry=f"{run.failures}/{retries}", delay_s=delay)  # fmt: skip
                self._enqueue(run)
            else:
                await self._fail(run, outcome.attempt, error)
        except StoreError as exc:
            run.failures, run.not_before = failures, not_before
            ref = RunRef(run_id=outcome.run_id, attempt=outcome.attempt)
            self._ask_again(session, run, ref, settled, exc)
            return False
        return True

    def _ask_again(
        self, session: Session, run: _Run, ref: RunRef, settled: int, exc: Exception
    ) -> None:
        """The store refused to record an outcome: have its runner send it again.

        Unacknowledged, the runner still has it; a new connection makes it send it at once
        (its hello names it, so the run is held for it as after any reconnect, and run again
        only if it never comes)."""
        log.error(
            "cannot record the result of run %s attempt %d (%s): asking runner %s for it again",
            run.id, ref.attempt, exc, session.runner_id,
        )  # fmt: skip
        run.settled = settled
        self._held[run.id] = time.monotonic() + self.timings.heartbeat_timeout
        session.close(CloseCode.INTERNAL_ERROR, "the hub could not record a result")

    # -- views --------------------------------------------------------------------------------

    def runner_views(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        views = []
        for s in self.sessions.values():
            hb = s.conn.heartbeats
            views.append(
                {
                    "id": s.runner_id,
                    "session_id": s.session_id,
                    "host": s.hello.host,
                    "pid": s.hello.pid,
                    "slots": s.slots,
                    "free_slots": s.free_slots,
                    "in_flight": len(s.in_flight),
                    "draining": s.draining,
                    "connected_at": s.connected_at,
                    "functions": [dataclasses.asdict(f) for f in s.hello.functions],
                    "heartbeat": {
                        "interval_ms": hb.interval_ms,
                        "last_age_ms": _round(hb.last_age_ms(now)),
                        "max_gap_ms": round(hb.max_gap_ms, 3),
                        "p99_gap_ms": round(hb.percentile_gap_ms(0.99), 3),
                        "count": hb.count,
                    },
                }
            )
        return views


def _log_store_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        # The runs stay leased: if their runner never reports, their leases expire and they
        # are queued again, which the store records.
        log.error("store: could not mark dispatched runs running: %s", future.exception())


def _log_run(run: _Run, state: str, **details: Any) -> None:
    """One log line per state change of a run; the fields are structured for JSON logs."""
    if not run_log.isEnabledFor(logging.INFO):
        return
    extra = {"run_id": run.id, "function": run.function, "attempt": run.attempt, **details}
    shown = " ".join(
        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in details.items()
    )
    run_log.info(
        "run %s %s: %s (attempt %d)%s", run.id, run.function, state, run.attempt,
        f" {shown}" if shown else "", extra={"state": state, **extra},
    )  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _retry_policy(info: FunctionInfo | dict[str, Any] | None) -> tuple[int, float]:
    if info is None:
        return 0, 1.0
    if isinstance(info, FunctionInfo):
        return info.retries, info.backoff
    return int(info.get("retries", 0)), float(info.get("backoff", 1.0))


# Store operations the scheduler composes from Store methods: each runs on the store thread as
# one operation of a group commit.


def _mark_running_many(store: Store, marks: list[tuple[str, int, str, float]]) -> None:
    if marks:
        store.mark_running_many(marks)


def _insert_runs(
    store: Store, new: Sequence[NewRun], marks: list[tuple[str, int, str, float]]
) -> list[tuple[RunRecord, bool]]:
    stored = store.insert_runs(new)
    _mark_running_many(store, marks)
    return stored


def _succeed_many(
    store: Store,
    rows: list[tuple[str, int, Any, float]],
    marks: list[tuple[str, int, str, float]],
    read: list[str],
) -> dict[str, RunRecord | None] | StoreError:
    """Record successes, with the running marks of those not marked yet; the runs in ``read``
    as they now are (someone is waiting for them). Should the store refuse the successes, the
    marks are written alone, and the refusal is returned rather than raised so that they stay:
    the runs are still running, and whoever reads them must see so."""
    try:
        with store.savepoint():
            store.succeed_many(rows, marks)
    except Exception as exc:
        if not store.in_transaction():  # the database gave up the whole transaction
            raise
        store.mark_running_many(marks)
        return as_store_error(exc)
    return {run_id: store.get(run_id) for run_id in read}


def _finish(
    store: Store,
    run_id: str,
    attempt: int,
    state: RunState,
    result: Any,
    error: dict[str, Any] | None,
    now: float,
    read: bool,
) -> RunRecord | None:
    """Record an outcome; with ``read``, the run as it now is (someone is waiting for it)."""
    store.finish(run_id, attempt, state, result=result, error=error, now=now)
    return store.get(run_id) if read else None
