"""Bounded concurrency for the benchmarks' producers, shared by Tether's side and the peers'
driver (which runs in the peers' own virtual environment): standard library only."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["bounded"]


async def bounded(calls: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Await every call, at most ``limit`` at once, keeping their order."""
    out: list[Any] = [None] * len(calls)
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < len(calls):
            i = next_index
            next_index += 1
            out[i] = await calls[i]()

    await asyncio.gather(*(lane() for _ in range(min(limit, len(calls)))))
    return out
