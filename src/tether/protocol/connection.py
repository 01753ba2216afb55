"""The two ends of a runner's connection, as state machines without I/O.

A driver (the hub's WebSocket endpoint, the runner's connection thread) owns the socket and the
clock. It feeds each received frame to :meth:`receive` and gets back either the decoded message
or a :class:`ProtocolFailure` carrying the close code to send; it asks the machine for the
frames to send. Time enters as ``now`` arguments (monotonic seconds), so every rule here —
heartbeat due, peer silent, gap statistics — is testable without a socket or a sleep.

States::

    HANDSHAKE ──hello/welcome──▶ OPEN ──failure or close()──▶ CLOSED

Nothing here raises for anything a peer sends.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque

from ..exceptions import ProtocolError
from .codec import DEFAULT_MAX_MESSAGE_BYTES, CloseCode, decode, encode
from .messages import (
    HUB_MESSAGES,
    PROTOCOL_VERSION,
    RUNNER_MESSAGES,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    Welcome,
)

__all__ = ["HeartbeatStats", "HubConnection", "ProtocolFailure", "RunnerConnection", "State"]


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class ProtocolFailure:
    """The peer broke the protocol: close the connection with ``code`` and ``reason``."""

    code: int
    reason: str


class _Endpoint:
    _accepts: tuple[type[Message], ...]
    _opening: type[Message]

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.state = State.HANDSHAKE
        self.max_message_bytes = max_message_bytes
        self.failure: ProtocolFailure | None = None
        self.last_received: float | None = None

    def receive(self, data: bytes | str, now: float) -> Message | ProtocolFailure:
        """Decode one frame and check that it may arrive in the current state."""
        if self.state is State.CLOSED:
            return self._fail(CloseCode.PROTOCOL_ERROR, "frame received after close")
        try:
            message = decode(data, max_bytes=self.max_message_bytes)
        except ProtocolError as exc:
            return self._fail(exc.code, exc.reason)
        if not isinstance(message, self._accepts):
            return self._fail(
                CloseCode.PROTOCOL_ERROR, f"{message.type!r} may not be sent by this peer"
            )
        opening = isinstance(message, self._opening)
        if self.state is State.HANDSHAKE and not opening:
            return self._fail(
                CloseCode.PROTOCOL_ERROR, f"expected {self._opening.type!r}, got {message.type!r}"
            )
        if self.state is State.OPEN and opening:
            return self._fail(CloseCode.PROTOCOL_ERROR, f"{message.type!r} sent twice")
        self.last_received = now
        return self._received(message, now)

    def _received(self, message: Message, now: float) -> Message | ProtocolFailure:
        return message

    def _fail(self, code: int, reason: str) -> ProtocolFailure:
        self.state = State.CLOSED
        self.failure = ProtocolFailure(int(code), reason)
        return self.failure

    def send(self, message: Message) -> bytes:
        """The frame for ``message`` (the driver writes it)."""
        return encode(message)

    def close(self) -> None:
        self.state = State.CLOSED


class RunnerConnection(_Endpoint):
    """The runner's end: sends ``hello``, waits for ``welcome``, then heartbeats on the hub's
    schedule and notices a hub that has gone silent."""

    _accepts = HUB_MESSAGES
    _opening = Welcome

    def __init__(self, hello: Hello, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(max_message_bytes=max_message_bytes)
        self.hello = hello
        self.welcome: Welcome | None = None
        self._seq = 0
        self._sent_at: dict[int, float] = {}
        self._next_heartbeat = 0.0
        self.round_trip: float | None = None

    def opening_frame(self) -> bytes:
        return encode(self.hello)

    def _received(self, message: Message, now: float) -> Message | ProtocolFailure:
        if isinstance(message, Welcome):
            must_be_positive = (
                message.heartbeat_interval_ms,
                message.heartbeat_timeout_ms,
                message.lease_ms,
                message.extend_interval_ms,
                message.max_message_bytes,
            )
            if min(must_be_positive) <= 0:
                return self._fail(
                    CloseCode.PROTOCOL_ERROR, "welcome has non-positive intervals or limits"
                )
            self.welcome = message
            self.max_message_bytes = message.max_message_bytes
            self.state = State.OPEN
            self._next_heartbeat = now  # first heartbeat at once: the hub starts its clock
        elif isinstance(message, HeartbeatAck):
            sent = self._sent_at.pop(message.seq, None)
            if sent is not None:
                self.round_trip = now - sent
            # Acks for heartbeats older than this one will never come; forget them.
            for seq in [s for s in self._sent_at if s < message.seq]:
                del self._sent_at[seq]
        return message

    @property
    def heartbeat_interval(self) -> float:
        assert self.welcome is not None, "no welcome yet"
        return self.welcome.heartbeat_interval_ms / 1000

    def next_heartbeat_at(self) -> float:
        return self._next_heartbeat

    def heartbeat(self, now: float, *, free_slots: int, in_flight: int) -> bytes:
        """The next heartbeat frame; schedules the one after on the hub's interval."""
        self._seq += 1
        self._sent_at[self._seq] = now
        if len(self._sent_at) > 64:  # a hub that never acks must not grow this without bound
            del self._sent_at[min(self._sent_at)]
        # Schedule from the previous deadline, not from now, so lateness does not accumulate;
        # after a stall longer than an interval, restart from now rather than send a burst.
        self._next_heartbeat += self.heartbeat_interval
        if self._next_heartbeat <= now:
            self._next_heartbeat = now + self.heartbeat_interval
        return encode(Heartbeat(seq=self._seq, free_slots=free_slots, in_flight=in_flight))

    def hub_silent(self, now: float) -> bool:
        """True when nothing arrived from the hub for longer than its heartbeat timeout."""
        if self.welcome is None or self.last_received is None:
            return False
        return now - self.last_received > self.welcome.heartbeat_timeout_ms / 1000


@dataclasses.dataclass(slots=True)
class HeartbeatStats:
    """Gaps between heartbeats as the hub received them: what liveness is judged on."""

    interval_ms: int
    count: int = 0
    first_at: float | None = None
    last_at: float | None = None
    max_gap_ms: float = 0.0
    last_gap_ms: float | None = None
    recent_gaps_ms: deque[float] = dataclasses.field(default_factory=lambda: deque(maxlen=4096))

    def record(self, now: float) -> float | None:
        gap = None
        if self.last_at is not None:
            gap = (now - self.last_at) * 1000
            self.last_gap_ms = gap
            self.max_gap_ms = max(self.max_gap_ms, gap)
            self.recent_gaps_ms.append(gap)
        else:
            self.first_at = now
        self.last_at = now
        self.count += 1
        return gap

    def last_age_ms(self, now: float) -> float | None:
        return None if self.last_at is None else (now - self.last_at) * 1000

    def percentile_gap_ms(self, q: float) -> float:
        if not self.recent_gaps_ms:
            return 0.0
        ordered = sorted(self.recent_gaps_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class HubConnection(_Endpoint):
    """The hub's end: waits for ``hello``, answers ``welcome``, then records heartbeats and
    notices a runner that has gone silent."""

    _accepts = RUNNER_MESSAGES
    _opening = Hello

    def __init__(
        self,
        *,
        heartbeat_interval_ms: int,
        heartbeat_timeout_ms: int,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(max_message_bytes=max_message_bytes)
        self.hello: Hello | None = None
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.heartbeats = HeartbeatStats(interval_ms=heartbeat_interval_ms)
        self.last_heartbeat: Heartbeat | None = None

    def _received(self, message: Message, now: float) -> Message | ProtocolFailure:
        if isinstance(message, Hello):
            if self.hello is not None:  # a second hello before accept()
                return self._fail(CloseCode.PROTOCOL_ERROR, "'hello' sent twice")
            if message.version != PROTOCOL_VERSION:
                return self._fail(
                    CloseCode.VERSION_MISMATCH,
                    f"protocol version {message.version} is not supported"
                    f" (this hub speaks {PROTOCOL_VERSION})",
                )
            if message.slots < 1:
                return self._fail(CloseCode.PROTOCOL_ERROR, "hello.slots must be at least 1")
            self.hello = message
        elif isinstance(message, Heartbeat):
            self.heartbeats.record(now)
            self.last_heartbeat = message
        return message

    def accept(self, welcome: Welcome, now: float) -> bytes:
        """Complete the handshake; the runner's heartbeat clock starts now."""
        assert self.hello is not None and self.state is State.HANDSHAKE
        self.state = State.OPEN
        self.last_received = now
        return encode(welcome)

    def ack_heartbeat(self, heartbeat: Heartbeat) -> bytes:
        return encode(HeartbeatAck(seq=heartbeat.seq))

    def runner_silent(self, now: float) -> bool:
        """True when no heartbeat (or other frame) arrived within the heartbeat timeout."""
        if self.last_received is None:
            return False
        return (now - self.last_received) * 1000 > self.heartbeat_timeout_ms
