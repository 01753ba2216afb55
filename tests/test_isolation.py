"""The isolation backends, against real isolated subinterpreters and real spawned processes.

Steps live in ``tests/fixtures/`` and are imported only inside units, never by this process.
Waits poll a condition; every time limit is a multiple of ``UNIT``, which
``TETHER_TEST_TIME_FACTOR`` stretches on a slow machine.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tether._step import encode_request
from tether.app import FunctionSpec
from tether.exceptions import IsolationError
from tether.runner.isolation import Backend, create_backend
from tether.runner.isolation import subinterpreter as subinterpreter_module
from tether.runner.isolation._interpreters import Interpreter, live_interpreters
from tether.runner.isolation.process import ProcessBackend
from tether.runner.isolation.subinterpreter import SubinterpreterBackend

UNIT = float(os.environ.get("TETHER_TEST_TIME_FACTOR", "1"))  # seconds
TESTS = Path(__file__).resolve().parent
SYS_PATH = [str(TESTS), *sys.path]
STEPS = "fixtures.steps"
BACKENDS = ["subinterpreter", "process"]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_spec(**options: Any) -> FunctionSpec:
    return FunctionSpec(name="tests.step", module=STEPS, qualname="step", **options)


def step(qualname: str, *args: Any, **kwargs: Any) -> bytes:
    return encode_request(STEPS, qualname, list(args), kwargs)


async def run(backend: Backend, qualname: str, *args: Any, **options: Any) -> dict[str, Any]:
    outcome: dict[str, Any] = json.loads(
        await backend.run(step(qualname, *args), make_spec(**options))
    )
    return outcome


async def wait_for(condition: Callable[[], bool], limit: float = 10 * UNIT) -> None:
    """Poll ``condition`` (a file, a process, another thread: nothing an Event could see)."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def gone(pid: int) -> bool:
    """The process exited *and* was reaped (a zombie still has its /proc entry)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
async def started_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    backend = create_backend(request.param, size=2, sys_path=SYS_PATH, preload=[STEPS])
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


def backends(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("started_backend", names or BACKENDS, indirect=True)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """(started, release): a blocking step creates the first and waits for the second."""
    return tmp_path / "started", tmp_path / "release"


# --- the step contract, identical in both backends ----------------------------------------


@backends()
async def test_ok_result(started_backend: Backend) -> None:
    assert await run(started_backend, "add", 2, 3) == {"ok": True, "value": 5}


@backends()
async def test_user_exception_is_a_retryable_outcome(started_backend: Backend) -> None:
    outcome = await run(started_backend, "fail", "boom")
    assert outcome["ok"] is False
    error = outcome["error"]
    assert (error["type"], error["message"], error["retryable"]) == ("ValueError", "boom", True)
    assert "raise ValueError(message)" in error["traceback"]
    assert "steps.py" in error["traceback"]


@backends()
async def test_reject_is_not_retryable(started_backend: Backend) -> None:
    error = (await run(started_backend, "reject", "bad input"))["error"]
    assert error["type"] == "tether.exceptions.Reject"
    assert error["message"] == "bad input"
    assert error["retryable"] is False


@backends()
async def test_a_failure_is_reported_even_when_nothing_can_be_imported(
    started_backend: Backend,
) -> None:
    outcome = await run(started_backend, "fail_without_a_path", "no path")
    assert outcome["ok"] is False
    assert (outcome["error"]["type"], outcome["error"]["message"]) == ("ValueError", "no path")
    assert await run(started_backend, "add", 1, 2) == {"ok": True, "value": 3}  # unit lives on


@backends()
async def test_async_step(started_backend: Backend) -> None:
    assert await run(started_backend, "async_add", 4, 5) == {"ok": True, "value": 9}


@backends()
async def test_result_that_is_not_json(started_backend: Backend) -> None:
    error = (await run(started_backend, "not_json"))["error"]
    assert error["type"] == "TypeError"
    assert "fixtures.steps.not_json cannot be sent as JSON" in error["message"]
    assert error["retryable"] is False


@pytest.mark.parametrize("name", BACKENDS)
async def test_prints_reach_the_terminal_not_the_channel(
    name: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # Started here, not by a fixture: units must inherit the descriptors capfd captures.
    backend = create_backend(name, size=1, sys_path=SYS_PATH, preload=[STEPS])
    await backend.start()
    try:
        assert await run(backend, "print_and_add", 1, 1) == {"ok": True, "value": 2}
    finally:
        await backend.aclose()
    captured = capfd.readouterr()
    assert "hello from a step" in captured.out
    assert "and from its stderr" in captured.err


@backends()
async def test_steps_run_in_parallel_units(started_backend: Backend, tmp_path: Path) -> None:
    release = tmp_path / "release"
    starts = [tmp_path / "a", tmp_path / "b"]
    outcomes: list[dict[str, Any]] = []

    async def one(started: Path) -> None:
        outcomes.append(await run(started_backend, "block", str(started), str(release)))

    async with anyio.create_task_group() as tg:
        for started in starts:
            tg.start_soon(one, started)
        await wait_for(lambda: all(path.exists() for path in starts))
        release.touch()
    assert outcomes == [{"ok": True, "value": "released"}] * 2


@backends()
async def test_max_runs_recycles_the_unit(started_backend: Backend) -> None:
    # A module global counts steps per unit: it starts again in the replacement unit.
    counts = [(await run(started_backend, "count", max_runs=2))["value"] for _ in range(5)]
    assert counts == [1, 2, 1, 2, 1]


@backends()
async def test_large_arguments_and_results(started_backend: Backend) -> None:
    # Several pipe buffers' worth each way: frames written and read in many pieces.
    big = "a" * 3_000_000 + "é€"
    outcome = await run(started_backend, "add", big, "z")
    assert outcome == {"ok": True, "value": big + "z"}
    assert await run(started_backend, "add", 1, 2) == {"ok": True, "value": 3}


@backends()
async def test_cancellation_reraises(started_backend: Backend, files: tuple[Path, Path]) -> None:
    started, release = files
    finished: list[bytes] = []

    async def go() -> None:
        finished.append(await started_backend.run(step("block", *map(str, files)), make_spec()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        await wait_for(started.exists)
        tg.cancel_scope.cancel()
    assert finished == []  # run() re-raised the cancellation instead of returning
    if isinstance(started_backend, ProcessBackend):
        await wait_for(lambda: gone(int(started.read_text())))  # killed and reaped
        assert started_backend.abandoned == 0
    else:
        assert started_backend.abandoned == 1
        release.touch()
        await wait_for(lambda: started_backend.abandoned == 0)
    assert await run(started_backend, "add", 1, 2) == {"ok": True, "value": 3}


@pytest.mark.parametrize("name", BACKENDS)
async def test_preload_failure_names_the_module(name: str) -> None:
    before = live_interpreters()
    backend = create_backend(name, size=2, sys_path=SYS_PATH, preload=[STEPS, "fixtures.refuses"])
    with pytest.raises(IsolationError) as caught:
        await backend.start()
    message = str(caught.value)
    assert "module fixtures.refuses cannot be imported" in message
    assert (
        "ImportError: module tests_fake_extension does not support loading in subinterpreters"
        in message
    )
    assert live_interpreters() == before  # nothing left behind by the failed start


# --- the process backend --------------------------------------------------------------------


@backends("process")
async def test_process_timeout_kills_the_process(
    started_backend: Backend, files: tuple[Path, Path]
) -> None:
    started, _release = files
    began = time.monotonic()
    error = (await run(started_backend, "block", *map(str, files), timeout=0.5 * UNIT))["error"]
    assert time.monotonic() - began < 0.5 * UNIT + 5 * UNIT
    assert error["type"] == "tether.StepTimeout"
    assert f"exceeded its timeout of {0.5 * UNIT:g} s" in error["message"]
    assert "was killed" in error["message"]
    assert error["retryable"] is True
    await wait_for(lambda: gone(int(started.read_text())))
    assert await run(started_backend, "add", 1, 2) == {"ok": True, "value": 3}


@backends("process")
async def test_process_max_runs_starts_a_new_process(started_backend: Backend) -> None:
    pids = [(await run(started_backend, "pid", max_runs=2))["value"] for _ in range(3)]
    assert pids[0] == pids[1] != pids[2]
    await wait_for(lambda: gone(pids[0]))


@backends("process")
async def test_process_fresh_gets_a_process_of_its_own(started_backend: Backend) -> None:
    pooled = (await run(started_backend, "pid"))["value"]
    fresh = [(await run(started_backend, "pid", fresh=True))["value"] for _ in range(2)]
    assert len({pooled, *fresh}) == 3
    assert (await run(started_backend, "pid"))["value"] == pooled  # the pool is untouched
    await wait_for(lambda: all(gone(pid) for pid in fresh))
    assert pooled != os.getpid()


@backends("process")
async def test_process_crash_fails_that_step_only(started_backend: Backend) -> None:
    pid = (await run(started_backend, "pid"))["value"]
    error = (await run(started_backend, "segfault"))["error"]
    assert error["type"] == "tether.UnitCrashed"
    assert "killed by SIGSEGV" in error["message"]
    assert error["retryable"] is True
    assert gone(pid)
    assert await run(started_backend, "add", 1, 2) == {"ok": True, "value": 3}

    error = (await run(started_backend, "exit_now", 3))["error"]
    assert error["type"] == "tether.UnitCrashed"
    assert "exit code 3" in error["message"]
    assert await run(started_backend, "add", 2, 2) == {"ok": True, "value": 4}


@backends("process")
async def test_process_unit_that_dies_between_steps_is_replaced(started_backend: Backend) -> None:
    pid = (await run(started_backend, "pid"))["value"]
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: gone(pid))  # noticed at once, and reaped
    # The next step gets a live unit instead of failing in the dead one.
    assert await run(started_backend, "add", 1, 2) == {"ok": True, "value": 3}
    assert pid not in {(await run(started_backend, "pid"))["value"] for _ in range(2)}


async def test_process_backend_runs_what_subinterpreters_refuse() -> None:
    backend = ProcessBackend(size=1, sys_path=SYS_PATH, preload=["fixtures.numeric"])
    await backend.start()
    try:
        outcome = await backend.run(
            encode_request("fixtures.numeric", "total", [[1.5, 2.5]], {}), make_spec()
        )
    finally:
        await backend.aclose()
    assert json.loads(outcome) == {"ok": True, "value": 4.0}


async def test_process_aclose_reaps_every_child(files: tuple[Path, Path]) -> None:
    backend = ProcessBackend(size=2, sys_path=SYS_PATH, preload=[STEPS])
    await backend.start()
    idle_pid = json.loads(await backend.run(step("pid"), make_spec()))["value"]
    started, _release = files
    outcomes: list[dict[str, Any]] = []

    async def busy() -> None:
        outcomes.append(json.loads(await backend.run(step("block", *map(str, files)), make_spec())))

    async with anyio.create_task_group() as tg:
        tg.start_soon(busy)
        await wait_for(started.exists)
        await backend.aclose()
    busy_pid = int(started.read_text())
    assert gone(idle_pid) and gone(busy_pid)
    assert outcomes[0]["error"]["type"] == "tether.UnitCrashed"
    with pytest.raises(RuntimeError, match="closed"):
        await backend.run(step("pid"), make_spec())


# --- the subinterpreter backend ---------------------------------------------------------------


@backends("subinterpreter")
async def test_subinterpreter_timeout_abandons_the_unit(
    started_backend: Backend, files: tuple[Path, Path]
) -> None:
    started, release = files
    before = live_interpreters()
    began = time.monotonic()
    error = (await run(started_backend, "block", *map(str, files), timeout=0.5 * UNIT))["error"]
    assert time.monotonic() - began < 0.5 * UNIT + 5 * UNIT  # at once, not when the step ends
    assert error["type"] == "tether.StepTimeout"
    assert "cannot be interrupted" in error["message"]
    assert error["retryable"] is True
    assert started.exists() and started_backend.abandoned == 1
    assert live_interpreters() == before  # out of the pool, but still alive: it runs
    # The pool keeps working meanwhile (two at once: one on a lazily created replacement).
    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(run, started_backend, "add", 1, 2)
    assert live_interpreters() == before + 1
    release.touch()
    await wait_for(lambda: started_backend.abandoned == 0)
    assert live_interpreters() == before  # the abandoned one was destroyed by its thread


async def test_subinterpreter_shim_failure_recycles_the_unit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Our bug, not the step's: the loop that serves steps inside a unit fails during one. The
    # loop is started when a unit is created, so the backend is created after the patch.
    before = live_interpreters()
    monkeypatch.setattr(
        subinterpreter_module,
        "_SERVE",
        "import os\nos.read(_tether_wake, 1)\nraise RuntimeError('shim bug')\n",
    )
    backend = SubinterpreterBackend(size=1, sys_path=SYS_PATH, preload=[STEPS])
    await backend.start()
    try:
        error = (await run(backend, "count"))["error"]
        monkeypatch.undo()  # units created from now on serve steps again
        assert error["type"] == "tether.UnitError"
        assert "shim bug" in error["message"]
        assert error["retryable"] is True
        assert live_interpreters() == before  # the broken unit is gone
        counts = [(await run(backend, "count"))["value"] for _ in range(2)]
        assert counts == [1, 2]  # a new unit, counting from the start, kept in the pool
    finally:
        await backend.aclose()


async def test_subinterpreter_aclose_destroys_every_unit(files: tuple[Path, Path]) -> None:
    before = live_interpreters()
    backend = SubinterpreterBackend(size=2, sys_path=SYS_PATH, preload=[STEPS])
    await backend.start()
    assert live_interpreters() == before + 2
    started, release = files
    outcomes: list[dict[str, Any]] = []

    async def busy() -> None:
        outcomes.append(json.loads(await backend.run(step("block", *map(str, files)), make_spec())))

    async with anyio.create_task_group() as tg:
        tg.start_soon(busy)
        await wait_for(started.exists)
        await backend.aclose()
        assert live_interpreters() == before + 1  # the idle one is gone; the busy one runs
        release.touch()
    # The busy unit finished its step, answered, then was destroyed by its thread.
    assert outcomes == [{"ok": True, "value": "released"}]
    assert live_interpreters() == before
    with pytest.raises(RuntimeError, match="closed"):
        await backend.run(step("add", 1, 2), make_spec())


def test_tether_imports_inside_an_isolated_subinterpreter() -> None:
    interp = Interpreter()
    try:
        failure = interp.exec(
            f"import sys, json\nsys.path[:] = {SYS_PATH!r}\n"
            "import tether, tether.app, tether.exceptions, tether._step\n"
            "from fixtures.steps import add\n"
            "_tether_reply(json.dumps({\n"
            "    'called': add(2, 3),\n"
            "    'task': type(add).__name__,\n"
            "    'shim': json.loads(tether._step.run_step(tether._step.encode_request(\n"
            "        'fixtures.steps', 'add', [4, 5], {}))),\n"
            "    'heavy': sorted(m for m in ('anyio', 'httpx', 'websockets', 'click')\n"
            "                    if m in sys.modules),\n"
            "}).encode())\n"
        )
        assert failure is None, failure.traceback
        reply = interp.take_reply()
    finally:
        interp.close()
    assert reply is not None
    assert json.loads(reply) == {
        "called": 5,
        "task": "Task",
        "shim": {"ok": True, "value": 9},
        "heavy": [],
    }


def test_numpy_refuses_a_subinterpreter_unit() -> None:
    # In a throw-away interpreter: this process must never import numpy after numpy failed to
    # load in one of its subinterpreters (that can abort it at exit).
    script = (
        "import anyio, sys\n"
        "from tether.exceptions import IsolationError\n"
        "from tether.runner.isolation.subinterpreter import SubinterpreterBackend\n"
        f"backend = SubinterpreterBackend(size=1, sys_path={SYS_PATH!r},"
        " preload=['fixtures.numeric'])\n"
        "try:\n"
        "    anyio.run(backend.start)\n"
        "except IsolationError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    sys.exit('numpy loaded in a subinterpreter')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60 * UNIT
    )
    assert child.returncode == 0, child.stderr
    assert "module fixtures.numeric cannot be imported in an isolated subinterpreter" in (
        child.stdout
    )
    assert re.search(
        r"ImportError: module numpy\.\S+ does not support loading in subinterpreters",
        child.stdout,
    )
    assert "isolation='process'" in child.stdout


# --- the reason Tether exists -----------------------------------------------------------------

GIL_HOLD = 24  # the backtracking match in steps.hold_gil: ~0.6 s of C code that keeps its GIL


class Ticker:
    """A main-interpreter thread that ticks every 10 ms and records its longest gap."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="ticker")

    def _tick(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(0.01):
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_steps_holding_the_gil_never_stall_the_main_interpreter() -> None:
    sub = SubinterpreterBackend(size=1, sys_path=SYS_PATH, preload=[STEPS])
    proc = ProcessBackend(size=1, sys_path=SYS_PATH, preload=[STEPS])
    await sub.start()
    await proc.start()
    durations: list[float] = []

    async def hold(backend: Backend) -> None:
        began = time.perf_counter()
        outcome = json.loads(await backend.run(step("hold_gil", GIL_HOLD), make_spec()))
        durations.append(time.perf_counter() - began)
        assert outcome == {"ok": True, "value": False}

    try:
        with Ticker() as isolated:
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, sub)
                tg.start_soon(hold, proc)
    finally:
        await sub.aclose()
        await proc.aclose()

    # The same C code on a thread of the main interpreter: its GIL is the ticker's GIL.
    def hold_here() -> float:
        began = time.perf_counter()
        re.match(r"(a+)+$", "a" * GIL_HOLD + "b")
        return time.perf_counter() - began

    with Ticker() as shared:
        in_main = await anyio.to_thread.run_sync(hold_here)

    assert min(durations) > 0.2, "the step was too short to tell anything"
    assert isolated.longest < 0.5 * UNIT, (isolated.longest, durations)
    assert shared.longest > 0.5 * in_main, (shared.longest, in_main)


def test_exit_waits_for_an_abandoned_step_and_skips_idle_units(files: tuple[Path, Path]) -> None:
    # A process must not finalise while a thread runs a step in a subinterpreter (CPython
    # 3.13 aborts or crashes): the exit waits for the step, then ends cleanly. Idle units of a
    # backend nobody closed must not hold the exit up at all.
    started, release = files
    script = (
        "import anyio, json, logging\n"
        "from tether._step import encode_request\n"
        "from tether.app import FunctionSpec\n"
        "from tether.runner.isolation.subinterpreter import SubinterpreterBackend\n"
        "logging.basicConfig()\n"
        "async def main():\n"
        f"    backend = SubinterpreterBackend(size=2, sys_path={SYS_PATH!r},"
        f" preload=[{STEPS!r}])\n"
        "    await backend.start()\n"
        f"    request = encode_request({STEPS!r}, 'block', [{str(started)!r},"
        f" {str(release)!r}], {{}})\n"
        f"    spec = FunctionSpec(name='t', module={STEPS!r}, qualname='block', timeout=0.1)\n"
        "    error = json.loads(await backend.run(request, spec))['error']\n"
        "    print(error['type'], backend.abandoned, flush=True)\n"
        "anyio.run(main)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stderr is not None
        assert child.stdout.readline().split() == [b"tether.StepTimeout", b"1"]
        # Polls the child's stderr for the exit's warning, then lets the step end.
        waiting = b"waiting for 1 subinterpreter step(s) to end before exiting"
        err = b""
        with selectors.DefaultSelector() as selector:
            selector.register(child.stderr, selectors.EVENT_READ)
            deadline = time.monotonic() + 30 * UNIT
            while waiting not in err and time.monotonic() < deadline:
                if selector.select(timeout=0.1):
                    chunk = os.read(child.stderr.fileno(), 4096)
                    if not chunk:
                        break
                    err += chunk
        assert waiting in err, err.decode()
        assert child.poll() is None  # still waiting for the step
        release.touch()
        _out, more = child.communicate(timeout=30 * UNIT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, (err + more).decode()


def test_backends_are_chosen_by_name() -> None:
    for name, cls in (("subinterpreter", SubinterpreterBackend), ("process", ProcessBackend)):
        backend = create_backend(name, size=3, sys_path=SYS_PATH, preload=[STEPS])
        assert type(backend) is cls and backend.name == name
        assert (backend.size, backend.preload, backend.abandoned) == (3, [STEPS], 0)


def test_subinterpreters_refuse_to_start_under_tracemalloc() -> None:
    # CPython 3.13 crashes at exit when tracemalloc traces while interpreters come and go.
    script = (
        "import anyio\n"
        "from tether.exceptions import IsolationError\n"
        "from tether.runner.isolation.subinterpreter import SubinterpreterBackend\n"
        "backend = SubinterpreterBackend(size=1, sys_path=[], preload=[])\n"
        "try:\n"
        "    anyio.run(backend.start)\n"
        "except IsolationError as exc:\n"
        "    print(exc)\n"
    )
    child = subprocess.run(
        [sys.executable, "-X", "tracemalloc", "-c", script],
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
    )
    assert child.returncode == 0, child.stderr
    assert "while tracemalloc is tracing" in child.stdout
    assert "isolation='process'" in child.stdout
