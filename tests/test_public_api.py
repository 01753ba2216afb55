"""The public API is exactly what is documented, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import tether

DOCUMENTED = {
    # the application and its tasks
    "Tether", "Task", "FunctionSpec",
    # producers
    "Client", "AsyncClient", "RunHandle", "AsyncRunHandle",
    # exceptions
    "TetherError", "ConfigError", "ProtocolError", "StoreError", "IsolationError",
    "ClientError", "HubUnavailable", "HubError", "RunNotFound", "WaitTimeout",
    "TaskError", "TaskCancelled", "Reject",
    "__version__",
}  # fmt: skip


def test_exports_are_exactly_the_documented_names() -> None:
    assert set(tether.__all__) == DOCUMENTED
    for name in tether.__all__:
        assert getattr(tether, name) is not None


def test_every_exception_but_reject_descends_from_one_root() -> None:
    for name in DOCUMENTED - {"Reject", "__version__"}:
        obj = getattr(tether, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, tether.TetherError), name
    assert not issubclass(tether.Reject, tether.TetherError)


def test_importing_tether_loads_only_the_standard_library() -> None:
    code = (
        "import sys, tether, tether.app, tether.exceptions, tether._step\n"
        "third_party = {'httpx', 'anyio', 'websockets', 'starlette', 'uvicorn', 'click'}\n"
        "print(sorted(third_party & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_client_is_loaded_on_first_use() -> None:
    code = "import sys, tether\ntether.Client\nprint('httpx' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
