"""The messages of wire protocol version 2, as typed values.

One message per WebSocket frame, a JSON object whose ``type`` names the message. Each class here
is one row of DESIGN.md's table; :mod:`.codec` turns them into bytes and back, validating every
field against the annotations below.

Version 2 differs from version 1 in one way: the messages of a run's way through a runner
(``dispatch``, ``ack``, ``result``, ``result_ack``) each carry a list of runs, so that what one
side has ready at once crosses as one frame, not one frame per run.

This module never does I/O and imports no I/O library.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

__all__ = [
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "Ack",
    "Assignment",
    "Cancel",
    "Closing",
    "Dispatch",
    "Draining",
    "ErrorInfo",
    "Extend",
    "Extended",
    "FunctionInfo",
    "Heartbeat",
    "HeartbeatAck",
    "Hello",
    "LeaseLost",
    "Message",
    "Outcome",
    "RejectDispatch",
    "Result",
    "ResultAck",
    "RunRef",
    "Welcome",
    "HUB_MESSAGES",
    "RUNNER_MESSAGES",
    "MESSAGE_TYPES",
]

PROTOCOL_VERSION = 2
SUBPROTOCOL = "tether.v2"



@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RunRef:
    """One attempt of one run: the unit leases and results are fenced on."""

    run_id: str
    attempt: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FunctionInfo:
    """A function a runner serves, with its resolved options (isolation, concurrency, ...)."""

    name: str
    queue: str = "default"
    concurrency: int | None = None
    retries: int = 0
    backoff: float = 1.0
    timeout: float | None = None
    isolation: str = "process"
    reason: str = ""  # why this isolation was chosen (``auto``), shown in GET /v1/runners
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    type: str
    message: str
    traceback: str = ""
    retryable: bool = True


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """One attempt of one run for a runner to execute: what a ``dispatch`` carries."""

    run_id: str
    attempt: int
    function: str
    args: list[Any]
    kwargs: dict[str, Any]
    timeout: float | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How one attempt of one run ended: what a ``result`` carries."""

    run_id: str
    attempt: int
    ok: bool
    value: Any = None
    error: ErrorInfo | None = None
    duration_ms: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    type: ClassVar[str]


# runner -> hub


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    type: ClassVar[str] = "hello"
    runner_id: str
    version: int = PROTOCOL_VERSION
    host: str
    pid: int
    slots: int
    functions: tuple[FunctionInfo, ...]
    in_flight: tuple[RunRef, ...] = ()  # runs still executing from a previous connection
    unacked: tuple[RunRef, ...] = ()  # results kept for the hub, re-sent right after welcome
    draining: bool = False
    # Runs it accepts per slot (and per unit of a function's concurrency), waiting ones
    # included; the first tether.v2 runners took 8 and did not say.
    hold_per_slot: int = 8


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    type: ClassVar[str] = "heartbeat"
    seq: int
    free_slots: int
    in_flight: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Message):
    type: ClassVar[str] = "ack"
    runs: tuple[RunRef, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RejectDispatch(Message):
    type: ClassVar[str] = "reject"
    run_id: str
    attempt: int
    reason: str  # "no_slot" | "unknown_function" | "draining" | "busy"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Extend(Message):
    type: ClassVar[str] = "extend"
    runs: tuple[RunRef, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Result(Message):
    type: ClassVar[str] = "result"
    outcomes: tuple[Outcome, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Draining(Message):
    type: ClassVar[str] = "draining"


# hub -> runner


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Message):
    type: ClassVar[str] = "welcome"
    session_id: str
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    lease_ms: int
    extend_interval_ms: int
    max_message_bytes: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAck(Message):
    type: ClassVar[str] = "heartbeat_ack"
    seq: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch(Message):
    type: ClassVar[str] = "dispatch"
    runs: tuple[Assignment, ...]
    lease_ms: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Extended(Message):
    type: ClassVar[str] = "extended"
    runs: tuple[RunRef, ...]
    lease_ms: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LeaseLost(Message):
    type: ClassVar[str] = "lease_lost"
    run_id: str
    attempt: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ResultAck(Message):
    type: ClassVar[str] = "result_ack"
    runs: tuple[RunRef, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Message):
    type: ClassVar[str] = "cancel"
    run_id: str
    attempt: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Closing(Message):
    type: ClassVar[str] = "closing"
    reason: str = ""


RUNNER_MESSAGES: tuple[type[Message], ...] = (
    Hello, Heartbeat, Ack, RejectDispatch, Extend, Result, Draining,
)  # fmt: skip
HUB_MESSAGES: tuple[type[Message], ...] = (
    Welcome, HeartbeatAck, Dispatch, Extended, LeaseLost, ResultAck, Cancel, Closing,
)  # fmt: skip
MESSAGE_TYPES: dict[str, type[Message]] = {m.type: m for m in RUNNER_MESSAGES + HUB_MESSAGES}
