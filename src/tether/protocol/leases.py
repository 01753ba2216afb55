"""Lease bookkeeping on both sides, without I/O or clocks of its own.

Hub side, :class:`LeaseTable`: which runner holds which attempt of which run until when. An
attempt whose lease expires goes back to the queue as a new attempt; a result is accepted only
for the attempt that holds the lease (fencing).

Runner side, :class:`ResultOutbox`: every result is kept until the hub acknowledges it, and
re-sent, in order, after a reconnect.
"""

from __future__ import annotations

import dataclasses

from .messages import Outcome, RunRef

__all__ = ["Lease", "LeaseTable", "ResultOutbox"]


@dataclasses.dataclass(slots=True)
class Lease:
    ref: RunRef
    holder: str  # runner id
    expires_at: float


class LeaseTable:
    def __init__(self) -> None:
        self._by_run: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._by_run)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._by_run

    def get(self, run_id: str) -> Lease | None:
        return self._by_run.get(run_id)

    def grant(self, ref: RunRef, holder: str, expires_at: float) -> Lease:
        lease = Lease(ref, holder, expires_at)
        self._by_run[ref.run_id] = lease
        return lease

    def holds(self, ref: RunRef, holder: str | None = None) -> bool:
        """True when ``ref`` is the current attempt (and, if given, ``holder`` holds it)."""
        lease = self._by_run.get(ref.run_id)
        return (
            lease is not None
            and lease.ref.attempt == ref.attempt
            and (holder is None or lease.holder == holder)
        )

    def extend(
        self, refs: tuple[RunRef, ...], holder: str, expires_at: float
    ) -> tuple[list[RunRef], list[RunRef]]:
        """Extend the leases ``holder`` asks for; returns (extended, lost).

        A runner that reconnected under the same id keeps its leases: the holder is matched by
        runner id, not by connection.
        """
        extended, lost = [], []
        for ref in refs:
            if self.holds(ref, holder):
                self._by_run[ref.run_id].expires_at = max(
                    self._by_run[ref.run_id].expires_at, expires_at
                )
                extended.append(ref)
            else:
                lost.append(ref)
        return extended, lost

    def release(self, run_id: str) -> Lease | None:
        return self._by_run.pop(run_id, None)

    def expired(self, now: float) -> list[Lease]:
        return [lease for lease in self._by_run.values() if lease.expires_at <= now]

    def held_by(self, holder: str) -> list[Lease]:
        return [lease for lease in self._by_run.values() if lease.holder == holder]

    def next_expiry(self) -> float | None:
        return min((lease.expires_at for lease in self._by_run.values()), default=None)


class ResultOutbox:
    """Outcomes not yet acknowledged by the hub, oldest first."""

    def __init__(self) -> None:
        self._pending: dict[RunRef, Outcome] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, outcome: Outcome) -> None:
        self._pending[RunRef(run_id=outcome.run_id, attempt=outcome.attempt)] = outcome

    def acknowledge(self, ref: RunRef) -> bool:
        return self._pending.pop(ref, None) is not None

    def pending(self) -> list[Outcome]:
        return list(self._pending.values())
