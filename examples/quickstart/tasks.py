"""The README's quickstart tasks.

Start a hub and a runner, then call them from anywhere::

    tether server
    tether worker examples.quickstart.tasks
    tether submit examples.quickstart.tasks.add 2 3 --wait
"""

from __future__ import annotations

import asyncio
import hashlib

from tether import Reject, Tether

app = Tether()


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(isolation="subinterpreter", concurrency=2)
def digest(text: str, rounds: int = 100_000) -> str:
    """CPU-bound work that holds the GIL: runs in its own subinterpreter, heartbeats unaffected."""
    data = text.encode()
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()


@app.task(isolation="process", timeout=30, retries=2, backoff=0.2)
def divide(x: float, y: float) -> float:
    if y == 0:
        raise Reject("cannot divide by zero")  # fails at once: retrying will not help
    return x / y


@app.task
async def greet(name: str) -> str:
    await asyncio.sleep(0.01)
    return f"hello, {name}"
