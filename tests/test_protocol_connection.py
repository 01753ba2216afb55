"""Both ends of a runner's connection as state machines, without sockets or clocks.

Time is a number passed as ``now``, in seconds; intervals are powers of two of a second so that
deadlines compare exactly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.protocol import (
    HUB_MESSAGES,
    PROTOCOL_VERSION,
    RUNNER_MESSAGES,
    Ack,
    Assignment,
    Cancel,
    CloseCode,
    Closing,
    Dispatch,
    Draining,
    ErrorInfo,
    Extend,
    Extended,
    FunctionInfo,
    Heartbeat,
    HeartbeatAck,
    HeartbeatStats,
    Hello,
    HubConnection,
    LeaseLost,
    Message,
    Outcome,
    ProtocolFailure,
    RejectDispatch,
    Result,
    ResultAck,
    RunnerConnection,
    RunRef,
    State,
    Welcome,
    decode,
    encode,
)

T0 = 1_000.0  # monotonic seconds at the start of each test
INTERVAL_MS = 250  # 0.25 s: exact in binary, so deadlines compare with ==
TIMEOUT_MS = 1_000

HELLO = Hello(runner_id="w1", host="h", pid=42, slots=4, functions=(FunctionInfo(name="f"),))
WELCOME = Welcome(
    session_id="s1",
    heartbeat_interval_ms=INTERVAL_MS,
    heartbeat_timeout_ms=TIMEOUT_MS,
    lease_ms=30_000,
    extend_interval_ms=10_000,
    max_message_bytes=1 << 20,
)

# One example of every message each side may send once the connection is open.
FROM_RUNNER: list[Message] = [
    Heartbeat(seq=1, free_slots=3, in_flight=1),
    Ack(runs=(RunRef(run_id="r1", attempt=1),)),
    RejectDispatch(run_id="r2", attempt=1, reason="no_slot"),
    Extend(runs=(RunRef(run_id="r1", attempt=1),)),
    Result(
        outcomes=(
            Outcome(run_id="r1", attempt=1, ok=True, value={"x": [1, 2.5, None]}, duration_ms=3.0),
            Outcome(run_id="r3", attempt=2, ok=False, error=ErrorInfo(type="E", message="m")),
        )
    ),
    Draining(),
]
FROM_HUB: list[Message] = [
    HeartbeatAck(seq=1),
    Dispatch(
        runs=(Assignment(run_id="r1", attempt=1, function="f", args=[1], kwargs={"k": "v"}),),
        lease_ms=30_000,
    ),
    Extended(runs=(RunRef(run_id="r1", attempt=1),), lease_ms=30_000),
    LeaseLost(run_id="r1", attempt=1, reason="expired"),
    ResultAck(runs=(RunRef(run_id="r1", attempt=1), RunRef(run_id="r3", attempt=2))),
    Cancel(run_id="r1", attempt=1),
    Closing(reason="shutdown"),
]


def test_examples_cover_every_message_type() -> None:
    assert {type(m) for m in FROM_RUNNER} | {Hello} == set(RUNNER_MESSAGES)
    assert {type(m) for m in FROM_HUB} | {Welcome} == set(HUB_MESSAGES)


def open_runner(now: float = T0, welcome: Welcome = WELCOME) -> RunnerConnection:
    runner = RunnerConnection(HELLO)
    assert runner.receive(encode(welcome), now) == welcome
    assert runner.state is State.OPEN
    return runner


def open_hub(now: float = T0, hello: Hello = HELLO) -> HubConnection:
    hub = new_hub()
    assert hub.receive(encode(hello), now) == hello
    hub.accept(WELCOME, now)
    assert hub.state is State.OPEN
    return hub


def new_hub(**kwargs: Any) -> HubConnection:
    return HubConnection(
        heartbeat_interval_ms=INTERVAL_MS, heartbeat_timeout_ms=TIMEOUT_MS, **kwargs
    )


def assert_failed(
    endpoint: RunnerConnection | HubConnection,
    outcome: Message | ProtocolFailure,
    code: int,
    *fragments: str,
) -> None:
    assert isinstance(outcome, ProtocolFailure), outcome
    assert outcome.code == code, outcome
    assert type(outcome.code) is int  # a driver passes it on as is
    for fragment in fragments:
        assert fragment in outcome.reason, outcome
    assert endpoint.state is State.CLOSED
    assert endpoint.failure == outcome


# Handshake


def test_runner_handshake() -> None:
    runner = RunnerConnection(HELLO, max_message_bytes=4096)
    assert runner.state is State.HANDSHAKE
    assert runner.welcome is None and runner.failure is None
    assert decode(runner.opening_frame()) == HELLO
    assert not runner.hub_silent(T0 + 3600)  # the handshake timeout is the driver's
    assert runner.receive(encode(WELCOME), T0) == WELCOME
    assert runner.state is State.OPEN
    assert runner.welcome == WELCOME
    assert runner.max_message_bytes == WELCOME.max_message_bytes  # the hub's limit from now on
    assert runner.heartbeat_interval == 0.25
    assert runner.last_received == T0


def test_hub_handshake() -> None:
    hub = new_hub()
    assert hub.state is State.HANDSHAKE and hub.hello is None
    assert not hub.runner_silent(T0 + 3600)
    assert hub.receive(encode(HELLO), T0) == HELLO
    assert hub.hello == HELLO
    assert hub.state is State.HANDSHAKE  # until the hub accepts (it may still refuse)
    frame = hub.accept(WELCOME, T0 + 0.125)
    assert decode(frame) == WELCOME
    assert hub.state is State.OPEN
    assert hub.last_received == T0 + 0.125  # the runner's clock starts at the welcome


def test_handshake_between_the_two_ends() -> None:
    runner, hub = RunnerConnection(HELLO), new_hub()
    assert hub.receive(runner.opening_frame(), T0) == HELLO
    assert runner.receive(hub.accept(WELCOME, T0), T0) == WELCOME
    heartbeat = runner.heartbeat(T0, free_slots=4, in_flight=0)
    received = hub.receive(heartbeat, T0 + 0.0625)
    assert received == Heartbeat(seq=1, free_slots=4, in_flight=0)
    assert isinstance(received, Heartbeat)
    assert runner.receive(hub.ack_heartbeat(received), T0 + 0.125) == HeartbeatAck(seq=1)
    assert runner.round_trip == 0.125
    for message in FROM_RUNNER:
        assert hub.receive(runner.send(message), T0) == message
    for message in FROM_HUB:
        assert runner.receive(hub.send(message), T0) == message
    assert runner.state is hub.state is State.OPEN


@pytest.mark.parametrize("message", FROM_HUB, ids=lambda m: m.type)
def test_runner_accepts_hub_messages_once_open(message: Message) -> None:
    runner = open_runner()
    assert runner.receive(encode(message), T0) == message
    assert runner.receive(encode(message).decode(), T0) == message  # text frames as well
    assert runner.state is State.OPEN


@pytest.mark.parametrize("message", FROM_RUNNER, ids=lambda m: m.type)
def test_hub_accepts_runner_messages_once_open(message: Message) -> None:
    hub = open_hub()
    assert hub.receive(encode(message), T0) == message
    assert hub.receive(encode(message).decode(), T0) == message
    assert hub.state is State.OPEN


# Protocol errors


@pytest.mark.parametrize("message", [*FROM_RUNNER, HELLO], ids=lambda m: m.type)
def test_runner_message_sent_by_the_hub(message: Message) -> None:
    runner = open_runner()
    outcome = runner.receive(encode(message), T0)
    assert_failed(runner, outcome, CloseCode.PROTOCOL_ERROR, f"{message.type!r} may not be sent")


@pytest.mark.parametrize("message", [*FROM_HUB, WELCOME], ids=lambda m: m.type)
def test_hub_message_sent_by_the_runner(message: Message) -> None:
    hub = open_hub()
    outcome = hub.receive(encode(message), T0)
    assert_failed(hub, outcome, CloseCode.PROTOCOL_ERROR, f"{message.type!r} may not be sent")


@pytest.mark.parametrize("message", [*FROM_RUNNER, WELCOME], ids=lambda m: m.type)
def test_wrong_direction_before_the_handshake(message: Message) -> None:
    runner, hub = RunnerConnection(HELLO), new_hub()
    target = runner if isinstance(message, RUNNER_MESSAGES) else hub
    assert_failed(target, target.receive(encode(message), T0), CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("message", FROM_HUB, ids=lambda m: m.type)
def test_runner_message_before_welcome(message: Message) -> None:
    runner = RunnerConnection(HELLO)
    outcome = runner.receive(encode(message), T0)
    assert_failed(
        runner, outcome, CloseCode.PROTOCOL_ERROR, f"expected 'welcome', got {message.type!r}"
    )
    assert runner.last_received is None


@pytest.mark.parametrize("message", FROM_RUNNER, ids=lambda m: m.type)
def test_hub_message_before_hello(message: Message) -> None:
    hub = new_hub()
    outcome = hub.receive(encode(message), T0)
    assert_failed(hub, outcome, CloseCode.PROTOCOL_ERROR, f"expected 'hello', got {message.type!r}")
    assert hub.heartbeats.count == 0


def test_hub_message_after_hello_but_before_accept() -> None:
    hub = new_hub()
    hub.receive(encode(HELLO), T0)
    outcome = hub.receive(encode(FROM_RUNNER[0]), T0)
    assert_failed(hub, outcome, CloseCode.PROTOCOL_ERROR, "expected 'hello', got 'heartbeat'")


def test_hello_sent_twice() -> None:
    hub = open_hub()
    assert_failed(hub, hub.receive(encode(HELLO), T0), CloseCode.PROTOCOL_ERROR, "sent twice")


def test_hello_sent_twice_before_accept() -> None:
    hub = new_hub()
    hub.receive(encode(HELLO), T0)
    other = Hello(runner_id="w2", host="h", pid=1, slots=1, functions=())
    assert_failed(hub, hub.receive(encode(other), T0), CloseCode.PROTOCOL_ERROR, "sent twice")
    assert hub.hello == HELLO  # not replaced by the second one


def test_welcome_sent_twice() -> None:
    runner = open_runner()
    outcome = runner.receive(encode(WELCOME), T0)
    assert_failed(runner, outcome, CloseCode.PROTOCOL_ERROR, "'welcome' sent twice")


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, -1, 2**63 - 1])
def test_version_mismatch(version: int) -> None:
    hub = new_hub()
    hello = Hello(runner_id="w1", version=version, host="h", pid=1, slots=1, functions=())
    outcome = hub.receive(encode(hello), T0)
    assert_failed(
        hub, outcome, CloseCode.VERSION_MISMATCH, f"version {version}", f"speaks {PROTOCOL_VERSION}"
    )
    assert CloseCode.VERSION_MISMATCH == 4003
    assert hub.hello is None


@pytest.mark.parametrize("slots", [0, -1, -(2**63)])
def test_slots_must_be_positive(slots: int) -> None:
    hub = new_hub()
    hello = Hello(runner_id="w1", host="h", pid=1, slots=slots, functions=())
    outcome = hub.receive(encode(hello), T0)
    assert_failed(hub, outcome, CloseCode.PROTOCOL_ERROR, "hello.slots must be at least 1")
    assert hub.hello is None


@pytest.mark.parametrize(
    "field",
    [
        "heartbeat_interval_ms",
        "heartbeat_timeout_ms",
        "lease_ms",
        "extend_interval_ms",
        "max_message_bytes",
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_welcome_intervals_and_limits_must_be_positive(field: str, value: int) -> None:
    runner = RunnerConnection(HELLO)
    data = json.loads(encode(WELCOME)) | {field: value}
    outcome = runner.receive(json.dumps(data), T0)
    assert_failed(runner, outcome, CloseCode.PROTOCOL_ERROR, "non-positive")
    assert runner.welcome is None


def test_huge_welcome_intervals_do_not_overflow() -> None:
    welcome = Welcome(
        session_id="s",
        heartbeat_interval_ms=2**63 - 1,
        heartbeat_timeout_ms=2**63 - 1,
        lease_ms=2**63 - 1,
        extend_interval_ms=2**63 - 1,
        max_message_bytes=2**63 - 1,
    )
    runner = open_runner(welcome=welcome)
    assert not runner.hub_silent(T0 + 1e9)
    runner.heartbeat(T0, free_slots=1, in_flight=0)
    assert runner.next_heartbeat_at() > T0 + 1e9
    too_big = json.loads(encode(welcome)) | {"heartbeat_timeout_ms": 10**400}
    fresh = RunnerConnection(HELLO)
    assert_failed(fresh, fresh.receive(json.dumps(too_big), T0), CloseCode.PROTOCOL_ERROR, "64-bit")


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        (b"\xff", CloseCode.INVALID_PAYLOAD, "not JSON"),
        ("not json", CloseCode.INVALID_PAYLOAD, "not JSON"),
        ("[" * 100_000, CloseCode.INVALID_PAYLOAD, "not JSON"),
        ("[]", CloseCode.PROTOCOL_ERROR, "not a JSON object"),
        ('{"type":"bogus"}', CloseCode.PROTOCOL_ERROR, "unknown message type 'bogus'"),
        ('{"type":"heartbeat","seq":"1","free_slots":1,"in_flight":0}', 1002, "heartbeat.seq"),
        ('{"type":"heartbeat","seq":true,"free_slots":1,"in_flight":0}', 1002, "heartbeat.seq"),
        ('{"type":"heartbeat","seq":1,"free_slots":1}', 1002, "missing field 'in_flight'"),
    ],
)
def test_hub_closes_on_a_malformed_frame(data: bytes | str, code: int, fragment: str) -> None:
    hub = open_hub()
    assert_failed(hub, hub.receive(data, T0 + 0.5), code, fragment)
    assert hub.last_received == T0  # a bad frame is not a sign of life
    assert hub.heartbeats.count == 0


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ('{"type":"heartbeat_ack","seq":1.5}', "heartbeat_ack.seq"),
        ('{"type":"dispatch","lease_ms":1,"runs":[{"run_id":"r","attempt":1}]}',
         "dispatch.runs[0]: missing field 'function'"),  # fmt: skip
        ('{"type":"extended","runs":{},"lease_ms":1}', "extended.runs"),
        ('{"type":"lease_lost","run_id":"r","attempt":false,"reason":""}', "lease_lost.attempt"),
    ],
)
def test_runner_closes_on_a_malformed_frame(data: str, fragment: str) -> None:
    runner = open_runner()
    assert_failed(runner, runner.receive(data, T0 + 0.5), CloseCode.PROTOCOL_ERROR, fragment)
    assert runner.last_received == T0


def test_oversized_frame() -> None:
    hub = HubConnection(heartbeat_interval_ms=250, heartbeat_timeout_ms=1000, max_message_bytes=64)
    outcome = hub.receive(b"{" + b" " * 64 + b"}", T0)
    assert_failed(hub, outcome, CloseCode.MESSAGE_TOO_BIG, "exceeds 64")
    assert CloseCode.MESSAGE_TOO_BIG == 1009


def test_runner_adopts_the_hubs_size_limit() -> None:
    runner = open_runner(welcome=dataclasses.replace(WELCOME, max_message_bytes=100))
    assert runner.max_message_bytes == 100
    small = Cancel(run_id="r" * 50, attempt=1)
    assert runner.receive(encode(small), T0) == small
    big = encode(Cancel(run_id="r" * 100, attempt=1))
    assert_failed(runner, runner.receive(big, T0), CloseCode.MESSAGE_TOO_BIG, "exceeds 100")


def test_welcome_over_the_runners_own_limit() -> None:
    runner = RunnerConnection(HELLO, max_message_bytes=32)
    outcome = runner.receive(encode(WELCOME), T0)
    assert_failed(runner, outcome, CloseCode.MESSAGE_TOO_BIG)
    assert runner.welcome is None


def test_frame_after_failure_or_close() -> None:
    hub = open_hub()
    assert isinstance(hub.receive(b"junk", T0), ProtocolFailure)
    first = hub.failure
    assert first is not None and first.code == CloseCode.INVALID_PAYLOAD
    outcome = hub.receive(encode(FROM_RUNNER[0]), T0)
    assert_failed(hub, outcome, CloseCode.PROTOCOL_ERROR, "after close")
    runner = open_runner()
    runner.close()
    assert runner.state is State.CLOSED and runner.failure is None
    outcome = runner.receive(encode(HeartbeatAck(seq=1)), T0)
    assert_failed(runner, outcome, CloseCode.PROTOCOL_ERROR, "frame received after close")
    assert runner.last_received == T0


# Whatever arrives, receive() returns; after a failure the machine stays closed.

FRAMES = st.one_of(
    st.binary(max_size=64),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=64),
    st.sampled_from([*FROM_RUNNER, *FROM_HUB, HELLO, WELCOME]).map(encode),
    st.sampled_from([*FROM_RUNNER, *FROM_HUB, HELLO, WELCOME]).map(lambda m: encode(m).decode()),
    st.sampled_from(["[" * 100_000, "1" * 5_000, '{"type":"closing","reason":"\\ud800"}']),
    st.sampled_from(['{"type":"heartbeat","seq":1e999,"free_slots":0,"in_flight":0}']),
)


def feed(
    endpoint: RunnerConnection | HubConnection, frames: list[bytes | str], accept_at: int | None
) -> None:
    failed = False
    for i, data in enumerate(frames):
        before = endpoint.state
        outcome = endpoint.receive(data, T0 + i)  # never raises
        if failed or before is State.CLOSED:
            assert isinstance(outcome, ProtocolFailure)
        if isinstance(outcome, ProtocolFailure):
            assert outcome.code in set(CloseCode)
            assert outcome.reason
            assert endpoint.state is State.CLOSED
            assert endpoint.failure == outcome
            failed = True
        else:
            assert isinstance(outcome, Message)
            assert endpoint.state is not State.CLOSED
            # states only move forward
            assert (before, endpoint.state) != (State.OPEN, State.HANDSHAKE)
        if (
            isinstance(endpoint, HubConnection)
            and i == accept_at
            and endpoint.state is State.HANDSHAKE
            and endpoint.hello is not None
        ):
            endpoint.accept(WELCOME, T0 + i)
        # the clock-driven questions never raise either
        if isinstance(endpoint, RunnerConnection):
            endpoint.hub_silent(T0 + i)
        else:
            endpoint.runner_silent(T0 + i)
            endpoint.heartbeats.percentile_gap_ms(0.99)


@given(st.lists(FRAMES, max_size=8))
def test_runner_receive_never_raises(frames: list[bytes | str]) -> None:
    feed(RunnerConnection(HELLO), frames, None)


@given(st.lists(FRAMES, max_size=8))
def test_open_runner_receive_never_raises(frames: list[bytes | str]) -> None:
    feed(open_runner(), frames, None)


@given(st.lists(FRAMES, max_size=8), st.integers(0, 8))
def test_hub_receive_never_raises(frames: list[bytes | str], accept_at: int) -> None:
    feed(new_hub(), frames, accept_at)


@given(st.lists(FRAMES, max_size=8))
def test_open_hub_receive_never_raises(frames: list[bytes | str]) -> None:
    feed(open_hub(), frames, None)


@given(st.binary() | st.text(st.characters(codec=None, exclude_categories=())))
def test_one_bad_frame_closes_for_good(data: bytes | str) -> None:
    for endpoint in (open_runner(), open_hub()):
        outcome = endpoint.receive(data, T0)
        if isinstance(outcome, ProtocolFailure):
            assert endpoint.state is State.CLOSED
            fine = HeartbeatAck(seq=1) if isinstance(endpoint, RunnerConnection) else Draining()
            assert isinstance(endpoint.receive(encode(fine), T0), ProtocolFailure)
            assert endpoint.state is State.CLOSED


# Runner: heartbeats on the hub's schedule


def test_first_heartbeat_is_due_at_once() -> None:
    runner = open_runner(now=T0)
    assert runner.next_heartbeat_at() == T0
    frame = runner.heartbeat(T0, free_slots=4, in_flight=0)
    assert decode(frame) == Heartbeat(seq=1, free_slots=4, in_flight=0)
    assert runner.next_heartbeat_at() == T0 + 0.25


def test_heartbeat_sequence_numbers_count_up() -> None:
    runner = open_runner()
    seqs = []
    for k in range(5):
        message = decode(runner.heartbeat(T0 + k * 0.25, free_slots=k, in_flight=4 - k))
        assert isinstance(message, Heartbeat)
        assert (message.free_slots, message.in_flight) == (k, 4 - k)
        seqs.append(message.seq)
    assert seqs == [1, 2, 3, 4, 5]


@given(st.lists(st.floats(min_value=0, max_value=0.99), min_size=1, max_size=50))
def test_late_heartbeats_do_not_accumulate_drift(lateness: list[float]) -> None:
    """Each heartbeat goes out up to an interval late; the schedule stays on the grid."""
    runner = open_runner()
    for k, late in enumerate(lateness):
        due = runner.next_heartbeat_at()
        assert due == T0 + k * 0.25
        runner.heartbeat(due + late * 0.25, free_slots=1, in_flight=0)
    assert runner.next_heartbeat_at() == T0 + len(lateness) * 0.25


def test_after_a_stall_the_schedule_restarts_without_a_burst() -> None:
    runner = open_runner()
    runner.heartbeat(T0, free_slots=1, in_flight=0)
    stalled = T0 + 10.0  # 40 intervals late
    runner.heartbeat(stalled, free_slots=1, in_flight=0)
    assert runner.next_heartbeat_at() == stalled + 0.25  # not due again at once


@given(st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=30))
def test_next_heartbeat_is_always_ahead_and_within_an_interval(waits: list[float]) -> None:
    runner = open_runner()
    now = T0
    for wait in waits:
        now = max(now, runner.next_heartbeat_at()) + wait  # sent when due, or later
        runner.heartbeat(now, free_slots=1, in_flight=0)
        assert now < runner.next_heartbeat_at() <= now + 0.25


def test_round_trip_from_heartbeat_ack() -> None:
    runner = open_runner()
    assert runner.round_trip is None
    runner.heartbeat(T0, free_slots=1, in_flight=0)
    runner.heartbeat(T0 + 0.25, free_slots=1, in_flight=0)
    runner.heartbeat(T0 + 0.5, free_slots=1, in_flight=0)
    runner.receive(encode(HeartbeatAck(seq=2)), T0 + 0.375)
    assert runner.round_trip == 0.125
    # the ack for seq 1 will never matter now: it was forgotten
    runner.receive(encode(HeartbeatAck(seq=1)), T0 + 0.5)
    assert runner.round_trip == 0.125
    runner.receive(encode(HeartbeatAck(seq=3)), T0 + 0.5625)
    assert runner.round_trip == 0.0625
    # an ack for nothing we sent, or a duplicate, changes nothing and is no error
    for seq in (3, 99, -1):
        assert runner.receive(encode(HeartbeatAck(seq=seq)), T0 + 1) == HeartbeatAck(seq=seq)
    assert runner.round_trip == 0.0625
    assert runner.state is State.OPEN


def test_hub_silent_after_the_timeout() -> None:
    runner = open_runner(now=T0)
    assert not runner.hub_silent(T0)
    assert not runner.hub_silent(T0 + 1.0)  # exactly the timeout: not yet
    assert runner.hub_silent(T0 + 1.0 + 2**-20)
    # any frame from the hub is a sign of life, not only heartbeat acks
    runner.receive(encode(Cancel(run_id="r", attempt=1)), T0 + 0.75)
    assert not runner.hub_silent(T0 + 1.5)
    assert runner.hub_silent(T0 + 1.875)
    runner.receive(encode(HeartbeatAck(seq=1)), T0 + 1.875)
    assert not runner.hub_silent(T0 + 2.5)


# Hub: heartbeat statistics and a silent runner


def test_hub_records_heartbeats() -> None:
    hub = open_hub(now=T0)
    assert hub.last_heartbeat is None
    assert hub.heartbeats.interval_ms == INTERVAL_MS
    gaps_s = [0.25, 0.25, 0.5, 0.125, 0.25]
    now = T0
    for seq, gap in enumerate(gaps_s, start=1):
        now += gap
        heartbeat = Heartbeat(seq=seq, free_slots=seq, in_flight=0)
        assert hub.receive(encode(heartbeat), now) == heartbeat
        assert hub.last_heartbeat == heartbeat
        assert decode(hub.ack_heartbeat(heartbeat)) == HeartbeatAck(seq=seq)
    stats = hub.heartbeats
    assert stats.count == 5
    assert stats.first_at == T0 + 0.25
    assert stats.last_at == now
    assert stats.max_gap_ms == 500.0
    assert list(stats.recent_gaps_ms) == [250.0, 500.0, 125.0, 250.0]  # between heartbeats
    assert stats.last_age_ms(now + 0.125) == 125.0
    # other frames are not heartbeats
    hub.receive(encode(Ack(runs=(RunRef(run_id="r", attempt=1),))), now + 1)
    assert stats.count == 5


def test_heartbeat_stats_basics() -> None:
    stats = HeartbeatStats(interval_ms=250)
    assert stats.count == 0
    assert stats.last_age_ms(T0) is None
    assert stats.percentile_gap_ms(0.5) == 0.0
    assert stats.record(T0) is None  # no gap before the first
    assert stats.first_at == stats.last_at == T0
    assert stats.percentile_gap_ms(0.99) == 0.0
    assert stats.record(T0 + 0.25) == 250.0
    assert stats.record(T0 + 1.25) == 1000.0
    assert stats.record(T0 + 1.5) == 250.0
    assert (stats.count, stats.max_gap_ms, stats.first_at, stats.last_at) == (
        4,
        1000.0,
        T0,
        T0 + 1.5,
    )
    assert stats.last_age_ms(T0 + 2) == 500.0
    assert stats.percentile_gap_ms(0.0) == 250.0
    assert stats.percentile_gap_ms(0.5) == 250.0
    assert stats.percentile_gap_ms(1.0) == 1000.0


def test_max_gap_outlives_the_recent_window() -> None:
    stats = HeartbeatStats(interval_ms=250)
    now = T0
    stats.record(now)
    now += 8.0  # one long gap, then many regular ones
    stats.record(now)
    for _ in range(5_000):
        now += 0.25
        stats.record(now)
    assert stats.count == 5_002
    assert stats.max_gap_ms == 8000.0
    assert len(stats.recent_gaps_ms) == 4096
    assert stats.percentile_gap_ms(1.0) == 250.0  # the long gap left the window


@given(
    st.lists(st.integers(1, 10_000), min_size=1, max_size=200),  # gaps in ms
    st.floats(min_value=0, max_value=1),
)
def test_percentile_is_a_quantile_of_the_gaps(gaps: list[int], q: float) -> None:
    stats = HeartbeatStats(interval_ms=250)
    now = 0.0
    stats.record(now)
    for gap in gaps:
        now += gap / 1024  # dyadic: gap times 1000 / 1024 ms, exactly
        stats.record(now)
    recorded = list(stats.recent_gaps_ms)
    assert len(recorded) == len(gaps)
    p = stats.percentile_gap_ms(q)
    assert p in recorded
    below = sum(g < p for g in recorded)
    at_most = sum(g <= p for g in recorded)
    assert below <= q * len(recorded) <= at_most  # the definition of a q-quantile
    assert stats.percentile_gap_ms(0.0) == min(recorded)
    assert stats.percentile_gap_ms(1.0) == max(recorded) == stats.max_gap_ms
    assert stats.percentile_gap_ms(q / 2) <= p


def test_runner_silent_after_the_timeout() -> None:
    hub = open_hub(now=T0)
    assert not hub.runner_silent(T0 + 1.0)  # exactly the timeout: not yet
    assert hub.runner_silent(T0 + 1.0 + 2**-20)
    hub.receive(encode(Heartbeat(seq=1, free_slots=1, in_flight=0)), T0 + 0.5)
    assert not hub.runner_silent(T0 + 1.5)
    assert hub.runner_silent(T0 + 1.625)
    # any frame counts as a sign of life
    hub.receive(encode(Extend(runs=())), T0 + 1.625)
    assert not hub.runner_silent(T0 + 2.5)


def test_hub_silence_is_judged_from_the_handshake_before_the_first_heartbeat() -> None:
    hub = new_hub()
    hub.receive(encode(HELLO), T0)
    hub.accept(WELCOME, T0 + 0.5)  # the welcome restarts the clock
    assert not hub.runner_silent(T0 + 1.5)
    assert hub.runner_silent(T0 + 1.625)
