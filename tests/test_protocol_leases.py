"""Lease bookkeeping (hub side) and the result outbox (runner side), with time passed in."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tether.protocol import ErrorInfo, Lease, LeaseTable, Outcome, ResultOutbox, RunRef

T0 = 1_000.0
LEASE = 30.0  # seconds


def ref(run_id: str = "r1", attempt: int = 1) -> RunRef:
    return RunRef(run_id=run_id, attempt=attempt)


def result(run_id: str = "r1", attempt: int = 1, **fields: Any) -> Outcome:
    return Outcome(run_id=run_id, attempt=attempt, **({"ok": True} | fields))


# LeaseTable


def test_grant_and_holds() -> None:
    table = LeaseTable()
    assert len(table) == 0 and "r1" not in table and table.get("r1") is None
    lease = table.grant(ref("r1", 1), "w1", T0 + LEASE)
    assert lease == Lease(ref("r1", 1), "w1", T0 + LEASE)
    assert len(table) == 1 and "r1" in table and table.get("r1") is lease
    assert table.holds(ref("r1", 1))
    assert table.holds(ref("r1", 1), "w1")
    assert not table.holds(ref("r1", 1), "w2")  # another runner
    assert not table.holds(ref("r1", 2), "w1")  # another attempt
    assert not table.holds(ref("r1", 0))
    assert not table.holds(ref("r2", 1))  # another run


def test_a_new_attempt_replaces_the_old_lease() -> None:
    table = LeaseTable()
    table.grant(ref("r1", 1), "w1", T0 + LEASE)
    table.grant(ref("r1", 2), "w2", T0 + 2 * LEASE)
    assert len(table) == 1
    assert not table.holds(ref("r1", 1))
    assert table.holds(ref("r1", 2), "w2")
    assert table.held_by("w1") == []


def test_extend_by_holder() -> None:
    table = LeaseTable()
    table.grant(ref("r1"), "w1", T0 + LEASE)
    extended, lost = table.extend((ref("r1"),), "w1", T0 + 10 + LEASE)
    assert (extended, lost) == ([ref("r1")], [])
    assert table.get("r1") == Lease(ref("r1"), "w1", T0 + 10 + LEASE)


def test_extend_never_shortens_a_lease() -> None:
    table = LeaseTable()
    table.grant(ref("r1"), "w1", T0 + LEASE)
    extended, lost = table.extend((ref("r1"),), "w1", T0 + 1)  # a late, reordered extend
    assert (extended, lost) == ([ref("r1")], [])
    lease = table.get("r1")
    assert lease is not None and lease.expires_at == T0 + LEASE


def test_reconnected_runner_keeps_its_leases() -> None:
    """The holder is the runner id, not the connection: a runner that reconnects under the same
    id (and lists its runs in ``hello.in_flight``) may go on extending them."""
    table = LeaseTable()
    table.grant(ref("r1"), "w1", T0 + LEASE)
    table.grant(ref("r2"), "w1", T0 + LEASE)
    table.grant(ref("r3"), "w2", T0 + LEASE)
    # ... w1's connection drops and a new one says hello with the same runner id ...
    assert {lease.ref for lease in table.held_by("w1")} == {ref("r1"), ref("r2")}
    extended, lost = table.extend((ref("r1"), ref("r2")), "w1", T0 + 5 + LEASE)
    assert (extended, lost) == ([ref("r1"), ref("r2")], [])
    # but a different runner cannot extend them
    extended, lost = table.extend((ref("r1"), ref("r3")), "w3", T0 + 6 + LEASE)
    assert (extended, lost) == ([], [ref("r1"), ref("r3")])
    assert table.get("r1") == Lease(ref("r1"), "w1", T0 + 5 + LEASE)
    assert table.get("r3") == Lease(ref("r3"), "w2", T0 + LEASE)


def test_extend_of_a_stale_attempt_is_lost() -> None:
    table = LeaseTable()
    table.grant(ref("r1", 1), "w1", T0 + LEASE)
    # attempt 1's lease expired and the run went to w2 as attempt 2
    table.grant(ref("r1", 2), "w2", T0 + 40 + LEASE)
    extended, lost = table.extend((ref("r1", 1),), "w1", T0 + 50 + LEASE)
    assert (extended, lost) == ([], [ref("r1", 1)])
    assert table.get("r1") == Lease(ref("r1", 2), "w2", T0 + 40 + LEASE)  # untouched
    # even the new holder cannot extend the old attempt
    assert table.extend((ref("r1", 1),), "w2", T0 + 60) == ([], [ref("r1", 1)])


def test_extend_reports_each_run_in_order() -> None:
    table = LeaseTable()
    for i in range(1, 5):
        table.grant(ref(f"r{i}", i), "w1", T0 + LEASE)
    table.release("r3")
    asked = (ref("r4", 4), ref("r1", 1), ref("r3", 3), ref("r2", 9), ref("r9", 1), ref("r2", 2))
    extended, lost = table.extend(asked, "w1", T0 + 2 * LEASE)
    assert extended == [ref("r4", 4), ref("r1", 1), ref("r2", 2)]
    assert lost == [ref("r3", 3), ref("r2", 9), ref("r9", 1)]
    assert table.extend((), "w1", T0) == ([], [])


def test_release() -> None:
    table = LeaseTable()
    lease = table.grant(ref("r1"), "w1", T0 + LEASE)
    assert table.release("r1") is lease
    assert table.release("r1") is None
    assert table.release("never") is None
    assert len(table) == 0 and not table.holds(ref("r1"))
    assert table.extend((ref("r1"),), "w1", T0 + LEASE) == ([], [ref("r1")])


def test_expiry() -> None:
    table = LeaseTable()
    assert table.expired(T0) == [] and table.next_expiry() is None
    a = table.grant(ref("a"), "w1", T0 + 10)
    b = table.grant(ref("b"), "w1", T0 + 5)
    c = table.grant(ref("c"), "w2", T0 + 20)
    assert table.next_expiry() == T0 + 5
    assert table.expired(T0 + 4.5) == []
    assert table.expired(T0 + 5) == [b]  # expires at its deadline, not after
    assert sorted(table.expired(T0 + 10), key=lambda lease: lease.expires_at) == [b, a]
    assert len(table) == 3  # expired() only reports: the hub decides what to release
    table.release("b")
    assert table.next_expiry() == T0 + 10
    table.extend((ref("a"),), "w1", T0 + 30)
    assert table.next_expiry() == T0 + 20
    assert table.expired(T0 + 25) == [c]
    table.release("a")
    table.release("c")
    assert table.next_expiry() is None


class LeaseTableModel(RuleBasedStateMachine):
    """LeaseTable against a plain dict, under random grants, extends, releases and time."""

    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable()
        self.model: dict[str, tuple[int, str, float]] = {}
        self.now = T0

    runs = st.sampled_from(["r1", "r2", "r3", "r4"])
    runners = st.sampled_from(["w1", "w2", "w3"])
    attempts = st.integers(1, 3)

    @rule(run_id=runs, attempt=attempts, holder=runners, length=st.integers(1, 60))
    def grant(self, run_id: str, attempt: int, holder: str, length: int) -> None:
        self.table.grant(ref(run_id, attempt), holder, self.now + length)
        self.model[run_id] = (attempt, holder, self.now + length)

    @rule(
        asked=st.lists(st.tuples(runs, attempts), max_size=5),
        holder=runners,
        length=st.integers(1, 60),
    )
    def extend(self, asked: list[tuple[str, int]], holder: str, length: int) -> None:
        refs = tuple(ref(run_id, attempt) for run_id, attempt in asked)
        extended, lost = self.table.extend(refs, holder, self.now + length)
        expect_extended = [
            r for r in refs if self.model.get(r.run_id, (None, None))[:2] == (r.attempt, holder)
        ]
        assert extended == expect_extended
        assert lost == [r for r in refs if r not in expect_extended]
        for r in extended:
            attempt, _, expires = self.model[r.run_id]
            self.model[r.run_id] = (attempt, holder, max(expires, self.now + length))

    @rule(run_id=runs)
    def release(self, run_id: str) -> None:
        lease = self.table.release(run_id)
        expected = self.model.pop(run_id, None)
        assert (lease is None) == (expected is None)
        if lease is not None and expected is not None:
            assert (lease.ref.attempt, lease.holder, lease.expires_at) == expected

    @rule(seconds=st.integers(0, 40))
    def tick(self, seconds: int) -> None:
        self.now += seconds

    @precondition(lambda self: self.model)
    @rule()
    def reap_expired(self) -> None:
        for lease in self.table.expired(self.now):
            self.table.release(lease.ref.run_id)
            del self.model[lease.ref.run_id]

    @invariant()
    def agrees_with_model(self) -> None:
        assert len(self.table) == len(self.model)
        for run_id, (attempt, holder, expires) in self.model.items():
            assert self.table.holds(ref(run_id, attempt), holder)
            lease = self.table.get(run_id)
            assert lease is not None and lease.expires_at == expires
        expiries = [expires for _, _, expires in self.model.values()]
        assert self.table.next_expiry() == (min(expiries) if expiries else None)
        assert {lease.ref.run_id for lease in self.table.expired(self.now)} == {
            run_id for run_id, (_, _, expires) in self.model.items() if expires <= self.now
        }
        for holder in ("w1", "w2", "w3"):
            assert {lease.ref.run_id for lease in self.table.held_by(holder)} == {
                run_id for run_id, (_, h, _) in self.model.items() if h == holder
            }


TestLeaseTableModel = LeaseTableModel.TestCase


# ResultOutbox


def test_outbox_keeps_results_until_acknowledged_in_order() -> None:
    outbox = ResultOutbox()
    assert len(outbox) == 0 and outbox.pending() == []
    first = result("r1", 1, value=1)
    second = result("r2", 1, ok=False, error=ErrorInfo(type="E", message="m"))
    third = result("r3", 2, value=[3])
    for r in (first, second, third):
        outbox.add(r)
    assert outbox.pending() == [first, second, third]
    # a reconnect re-sends them all, still in order, and nothing is forgotten by re-sending
    assert outbox.pending() == [first, second, third]
    assert outbox.acknowledge(ref("r2", 1)) is True
    assert outbox.pending() == [first, third]
    assert outbox.acknowledge(ref("r2", 1)) is False  # a duplicate ack
    assert outbox.acknowledge(ref("r3", 1)) is False  # another attempt's ack does not count
    assert outbox.acknowledge(ref("nope", 1)) is False
    assert outbox.pending() == [first, third]
    assert outbox.acknowledge(ref("r1", 1)) and outbox.acknowledge(ref("r3", 2))
    assert len(outbox) == 0 and outbox.pending() == []


def test_outbox_pending_is_a_copy() -> None:
    outbox = ResultOutbox()
    outbox.add(result())
    outbox.pending().clear()
    assert len(outbox) == 1


def test_outbox_same_ref_replaces() -> None:
    outbox = ResultOutbox()
    outbox.add(result("r1", 1, value="old"))
    outbox.add(result("r2", 1))
    outbox.add(result("r1", 1, value="new"))
    assert len(outbox) == 2
    assert outbox.pending() == [result("r1", 1, value="new"), result("r2", 1)]  # in its place


def test_outbox_attempts_are_distinct() -> None:
    outbox = ResultOutbox()
    outbox.add(result("r1", 1, ok=False, error=ErrorInfo(type="E", message="m")))
    outbox.add(result("r1", 2))
    assert len(outbox) == 2
    assert outbox.acknowledge(ref("r1", 2))
    assert outbox.pending() == [result("r1", 1, ok=False, error=ErrorInfo(type="E", message="m"))]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "ack"]),
            st.sampled_from(["r1", "r2", "r3", "r4"]),
            st.integers(1, 2),
            st.integers(),
        ),
        max_size=40,
    )
)
def test_outbox_matches_an_ordered_model(ops: list[tuple[str, str, int, int]]) -> None:
    outbox = ResultOutbox()
    model: dict[tuple[str, int], Outcome] = {}  # dicts keep insertion order
    for op, run_id, attempt, value in ops:
        if op == "add":
            r = result(run_id, attempt, value=value)
            outbox.add(r)
            model[run_id, attempt] = r
        else:
            assert outbox.acknowledge(ref(run_id, attempt)) == (
                model.pop((run_id, attempt), None) is not None
            )
        assert outbox.pending() == list(model.values())
        assert len(outbox) == len(model)


@pytest.mark.parametrize("n", [1, 1_000])
def test_outbox_size(n: int) -> None:
    outbox = ResultOutbox()
    for i in range(n):
        outbox.add(result(f"r{i}"))
    assert [r.run_id for r in outbox.pending()] == [f"r{i}" for i in range(n)]
