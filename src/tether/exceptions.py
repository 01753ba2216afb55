"""Every exception Tether raises, under one root.

Third-party errors (websockets, httpx, sqlite3, OS errors) are translated where they enter our
code, so callers only ever catch these::

    TetherError
    ├── ConfigError            a setting has the wrong type, an unknown key or a bad value
    ├── ProtocolError          a peer broke the wire protocol (carries a WebSocket close code)
    ├── StoreError             the hub's database refused or failed an operation
    ├── IsolationError         a function cannot run in the isolation it was configured for
    ├── ClientError            a producer-side call failed
    │   ├── HubUnavailable     the hub could not be reached
    │   ├── HubError           the hub answered with an error status (carries it)
    │   │   └── RunNotFound    no run has that id
    │   └── WaitTimeout        a result was not ready within the caller's timeout
    └── TaskError              the task itself failed (remote type, message, traceback)
        └── TaskCancelled      the run was cancelled before it finished

Raised *by user code inside a step* to steer the hub's retry decision:

    Reject                     fail this run now; do not retry it

This module imports only the standard library: user task modules import it inside isolated
subinterpreters, where most C extensions refuse to load.
"""

from __future__ import annotations

__all__ = [
    "ClientError",
    "ConfigError",
    "HubError",
    "HubUnavailable",
    "IsolationError",
    "ProtocolError",
    "Reject",
    "RunNotFound",
    "StoreError",
    "TaskCancelled",
    "TaskError",
    "TetherError",
    "WaitTimeout",
]


class TetherError(Exception):
    """Root of every exception Tether raises."""


class ConfigError(TetherError):
    """A setting is unknown, has the wrong type, or has a value that does not exist."""


class ProtocolError(TetherError):
    """A peer broke the wire protocol; ``code`` is the WebSocket close code to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} (close code {code})")
        self.code = code
        self.reason = reason


class StoreError(TetherError):
    """The hub's store failed an operation."""


class IsolationError(TetherError):
    """A function cannot run in the isolation backend it was configured for."""


class ClientError(TetherError):
    """A producer-side call to the hub failed."""


class HubUnavailable(ClientError):
    """The hub could not be reached (connection refused, DNS, TLS, timeout)."""


class HubError(ClientError):
    """The hub answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"hub answered {status}: {message}")
        self.status = status
        self.message = message


class RunNotFound(HubError):
    """No run has the requested id."""


class WaitTimeout(ClientError):
    """The run did not finish within the caller's timeout."""


class TaskError(TetherError):
    """The task raised; carries the remote exception's type name, message and traceback."""

    def __init__(
        self, type: str, message: str, traceback: str = "", *, run_id: str | None = None
    ) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.traceback = traceback
        self.run_id = run_id

    def __str__(self) -> str:
        text = f"{self.type}: {self.message}"
        if self.traceback:
            text += "\n\nRemote traceback:\n" + self.traceback.rstrip()
        return text


class TaskCancelled(TaskError):
    """The run was cancelled."""


class Reject(Exception):
    """Raise inside a task to fail the run at once, without using its retries.

    Deliberately not a :class:`TetherError`: it is a signal from user code, not a failure of
    Tether's.
    """
