"""The store's own thread, with group commit.

The event loop never touches the database. It hands each operation to :class:`StoreThread`
and awaits the answer; the thread takes every operation waiting at that moment, runs them in
one transaction and commits once. Under load many submits and results share one commit; at
rest an operation commits alone, at once.

One failing operation must not undo the others. Operations almost never fail, so a batch first
runs without savepoints (two statements fewer per operation); only if one raises is the
transaction rolled back and the batch run again with each operation under its own savepoint.
Store operations only touch the database, so running one again after a rollback is safe.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..exceptions import StoreError
from .store import Store

__all__ = ["StoreThread", "as_store_error"]

log = logging.getLogger("tether.hub.store")

_MAX_BATCH = 1024
_STOP = object()

type _Op = tuple[
    Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], asyncio.AbstractEventLoop
]


class StoreThread:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._ops: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="tether-store", daemon=True)
        self.commits = 0

    def start(self) -> None:
        self.store.open()
        self._thread.start()

    def stop(self) -> None:
        self._ops.put(_STOP)
        self._thread.join()
        self.store.close()

    async def call[T](self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` (a Store method) on the store thread, committed."""
        return await self.submit(fn, *args, **kwargs)

    def submit[T](self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args, **kwargs)`` now; the future is done once it is committed.
        Operations are written in the order they were queued."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        self._ops.put((fn, args, future, loop))
        return future

    def _serve(self) -> None:
        while True:
            first = self._ops.get()
            if first is _STOP:
                return
            batch: list[_Op] = [first]  # type: ignore[list-item]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._ops.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Op]) -> None:
        try:
            results = self._commit(batch, isolated=False)
        except _OperationFailed:
            try:
                results = self._commit(batch, isolated=True)
            except Exception as exc:
                log.error("store commit failed for %d operations: %s", len(batch), exc)
                results = [(False, as_store_error(exc))] * len(batch)
        except Exception as exc:
            log.error("store commit failed for %d operations: %s", len(batch), exc)
            results = [(False, as_store_error(exc))] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, _, future, loop), (ok, value) in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((future, ok, value))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


    def _commit(self, batch: list[_Op], *, isolated: bool) -> list[tuple[bool, Any]]:
        """Run ``batch`` in one transaction. Not ``isolated``: the first operation to raise
        rolls everything back (:class:`_OperationFailed`). ``isolated``: each operation has a
        savepoint, and one that raises is undone alone and answered with its error."""
        results: list[tuple[bool, Any]] = []
        with self.store.transaction():
            for fn, args, _, _ in batch:
                if not isolated:
                    try:
                        results.append((True, fn(*args)))
                    except Exception as exc:
                        raise _OperationFailed from exc
                    continue
                try:
                    with self.store.savepoint():
                        results.append((True, fn(*args)))
                except Exception as exc:  # one bad operation must not undo the batch
                    results.append((False, as_store_error(exc)))
        self.commits += 1
        return results


class _OperationFailed(Exception):
    """An operation of a batch run without savepoints raised: run the batch again, isolated."""


def as_store_error(exc: Exception) -> StoreError:
    """``exc`` as the StoreError the hub reports (a StoreError already stays itself)."""
    if isinstance(exc, StoreError):
        return exc
    return StoreError(f"{type(exc).__name__}: {exc}")


def _resolve(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in items:
        if future.done():  # the caller was cancelled
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
