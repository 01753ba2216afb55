"""The ``auto`` probe: real throw-away children, real isolated subinterpreters.

Nothing here imports a probed module in this process: the probe's whole point is that only
its child's subinterpreters do.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tether.runner.isolation.probe import probe_modules, refusing_extension

UNIT = float(os.environ.get("TETHER_TEST_TIME_FACTOR", "1"))  # seconds
SYS_PATH = [str(Path(__file__).resolve().parent), *sys.path]
REFUSAL = "does not support loading in subinterpreters"


def test_modules_that_load_and_modules_that_refuse() -> None:
    numpy_was_loaded = "numpy" in sys.modules
    found = probe_modules(
        ["json", "fixtures.steps", "fixtures.refuses", "fixtures.numeric", "no_such_module_xyz"],
        SYS_PATH,
    )
    assert list(found) == [
        "json",
        "fixtures.steps",
        "fixtures.refuses",
        "fixtures.numeric",
        "no_such_module_xyz",
    ]
    assert found["json"] is None
    assert found["fixtures.steps"] is None  # imports tether.app: it must load anywhere
    assert found["fixtures.refuses"] == f"ImportError: module tests_fake_extension {REFUSAL}"
    # numpy wraps CPython's refusal in a page of advice: the reason keeps only the refusal.
    numpy_reason = found["fixtures.numeric"]
    assert numpy_reason is not None and numpy_reason.startswith("ImportError: module numpy.")
    assert numpy_reason.endswith(REFUSAL)
    assert (refusing_extension(numpy_reason) or "").startswith("numpy.")
    assert found["no_such_module_xyz"] == (
        "ModuleNotFoundError: No module named 'no_such_module_xyz'"
    )
    assert ("numpy" in sys.modules) == numpy_was_loaded  # never imported here


def test_a_crashing_import_is_blamed_and_the_rest_still_probed() -> None:
    found = probe_modules(["json", "fixtures.crashes", "fixtures.steps"], SYS_PATH)
    assert found["json"] is None
    assert found["fixtures.steps"] is None  # probed by a second child
    reason = found["fixtures.crashes"]
    assert reason is not None
    assert "probe process ended (killed by SIGSEGV) while importing fixtures.crashes" in reason


def test_a_hanging_import_times_out() -> None:
    began = time.monotonic()
    found = probe_modules(["fixtures.slow", "json"], SYS_PATH, timeout=1.0 * UNIT)
    assert time.monotonic() - began < 1.0 * UNIT + 10 * UNIT
    assert "probe process timed out" in (found["fixtures.slow"] or "")
    assert "while importing fixtures.slow" in (found["fixtures.slow"] or "")
    assert (found["json"] or "").startswith("not probed")


def test_duplicates_are_probed_once() -> None:
    assert probe_modules(["json", "json"], SYS_PATH) == {"json": None}


def test_nothing_to_probe_starts_no_child() -> None:
    assert probe_modules([], SYS_PATH) == {}


@pytest.mark.parametrize(
    ("reason", "extension"),
    [
        (
            f"ImportError: module numpy._core._multiarray_umath {REFUSAL}",
            "numpy._core._multiarray_umath",
        ),
        (f"...\nOriginal error was: module _cffi_backend {REFUSAL}\n", "_cffi_backend"),
        ("ModuleNotFoundError: No module named 'x'", None),
        ("", None),
        (None, None),
    ],
)
def test_refusing_extension(reason: str | None, extension: str | None) -> None:
    assert refusing_extension(reason) == extension
