"""Step functions for the benchmarks: the standard library only.

They are imported inside isolation units (isolated subinterpreters, spawned processes) through
the benchmarks directory on ``sys_path``, and in the benchmark's own process for the direct-call
baseline. Importing no Tether code keeps the unit's start-up cost the isolation's alone.
"""

from __future__ import annotations

__all__ = ["big", "noop", "small"]


def noop() -> None:
    """No arguments, no result: what is left is the cost of getting there and back."""


def small(a: int, b: int, label: str) -> list[object]:
    """A few small arguments and a small result, like most real steps."""
    return [label, a + b]


def big(data: str) -> int:
    """A large argument (the benchmark sends 1 MB) and a small result."""
    return len(data)
