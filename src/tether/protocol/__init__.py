"""Tether's wire protocol, version 2, without I/O.

Messages (:mod:`.messages`), their JSON codec with size limits (:mod:`.codec`), the state
machines of each end of a runner's connection (:mod:`.connection`) and lease bookkeeping
(:mod:`.leases`). This package imports nothing of ours but exceptions, and no I/O library: bytes
and messages go in, messages and frames to send come out.
"""

from __future__ import annotations

from .codec import DEFAULT_MAX_MESSAGE_BYTES, CloseCode, decode, encode, encode_split
from .connection import HeartbeatStats, HubConnection, ProtocolFailure, RunnerConnection, State
from .leases import Lease, LeaseTable, ResultOutbox
from .messages import *  # noqa: F403
from .messages import __all__ as _message_names

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "CloseCode",
    "HeartbeatStats",
    "HubConnection",
    "Lease",
    "LeaseTable",
    "ProtocolFailure",
    "ResultOutbox",
    "RunnerConnection",
    "State",
    "decode",
    "encode",
    "encode_split",
    *_message_names,
]
