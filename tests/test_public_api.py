"""The public API is exactly what is documented, and importing it stays light."""

from __future__ import annotations

import ast
import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_what_a_new_unit_imports_for_the_shim_and_the_app_is_ours_alone() -> None:
    """A unit starts by importing the shim, and task modules import tether.app: every module
    either pulls in costs every new subinterpreter its start-up (typing, dataclasses, inspect,
    json and re are each several milliseconds there), so they must pull in nothing else."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import tether._step, tether.app\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(Path(tether.__file__).parent.parent)},
    )
    loaded = set(ast.literal_eval(out.stdout.strip()))
    ours = {"tether", "tether.app", "tether.exceptions", "tether._step", "tether._wire"}
    assert loaded - ours <= {"_json", "__future__"}, loaded - ours


def test_function_spec_is_an_immutable_value() -> None:
    spec = tether.FunctionSpec(name="n", module="m", qualname="f", retries=2)
    same = tether.FunctionSpec(name="n", module="m", qualname="f", retries=2)
    assert spec == same and hash(spec) == hash(same) and spec != spec.with_options(retries=3)
    assert spec.with_options(timeout=5).timeout == 5 and spec.timeout is None
    assert copy.copy(spec) == spec == pickle.loads(pickle.dumps(spec))
    assert "retries=2" in repr(spec)
    with pytest.raises(AttributeError, match="immutable"):
        spec.retries = 5  # type: ignore[misc]
    with pytest.raises(tether.ConfigError, match="n: retries must be an integer >= 0, got -1"):
        spec.with_options(retries=-1)
    with pytest.raises(tether.ConfigError, match="unknown option 'retry'"):
        spec.with_options(retry=1)
