"""Per-step overhead of the isolation backends, warm and cold, next to a direct function call.

    .venv/bin/python benchmarks/isolation_overhead.py [--rounds N] [--quick]

Every figure is the time of one step: the median, min and max over ``--rounds`` rounds, each
round the mean of a batch of steps. Rows of one table are interleaved round by round, so load
from elsewhere on the machine lands on all of them alike. "overhead" is a row's median minus the
median of the direct call with the same payload, measured in the same run.

Rows (what exactly is timed):

* ``direct run_step``: :func:`tether._step.run_step` on the calling thread of this interpreter:
  decode the request, find the function, call it, encode the outcome. The baseline.
* ``in a subinterpreter, no hand-over``: ``run_step`` in a loop inside an isolated
  subinterpreter set up like a pool unit (the backend's ``_INIT``, the same preload), timed in
  there: what the step itself costs in a unit.
* ``subinterpreter unit, no event loop``: one step through a unit made exactly like the
  backend's (its thread living in the interpreter, its wake and done pipes), driven from a
  plain thread: queue the request, wake the unit, block until it answers.
* ``process unit, no event loop``: write one request frame to a unit process
  (``python -m tether.runner.isolation._child``) and read its outcome frame, from a plain
  thread.
* ``floor: loop <-> thread wake-up``: no step and no interpreter: the event loop wakes a thread
  blocked on a pipe and is woken back through another pipe, which it watches. Every row below
  with a unit behind an event loop pays about this much on top of the step, on this machine.
* ``warm subinterpreter`` / ``warm process``: ``await backend.run(request, spec)`` on a started
  pool of one unit, from an anyio (asyncio) event loop.
* ``cold subinterpreter``: ``await backend.run()`` with ``max_runs=1``, so every step gets a new
  unit: create the interpreter, import the shim and the step module, run, destroy.
* ``cold process``: ``await backend.run()`` with ``fresh=True``: spawn, import, run, close.

The cold tables add the same cycle done by hand, phase by phase, to show where it goes.

It asserts nothing about time (a benchmark is not a test); it checks that every step succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import queue
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from tether._step import encode_request, run_step
from tether.app import FunctionSpec
from tether.runner.isolation import Backend
from tether.runner.isolation._child import child_environment, read_frame, write_frame
from tether.runner.isolation._interpreters import Interpreter
from tether.runner.isolation.process import ProcessBackend
from tether.runner.isolation.subinterpreter import _INIT, SubinterpreterBackend, _Unit, unit_init

HERE = Path(__file__).resolve().parent

MODULE = "steps"  # benchmarks/steps.py, found through SYS_PATH inside the units
SYS_PATH = [str(HERE), *sys.path]
MB = 1 << 20

PAYLOADS: dict[str, tuple[str, list[Any]]] = {
    "no-op": ("noop", []),
    "small": ("small", [2, 3, "label"]),
    "1 MB": ("big", ["x" * MB]),
}
EXPECTED: dict[str, Any] = {"no-op": None, "small": ["label", 5], "1 MB": MB}

# Per-step targets for the overhead (row median minus direct median), from the issue.
TARGETS_MS = {"warm subinterpreter": 0.1, "warm process": 0.3, "cold subinterpreter": 10.0}


def request_for(payload: str) -> bytes:
    qualname, args = PAYLOADS[payload]
    return encode_request(MODULE, qualname, args, {})


def check(payload: str, outcome: bytes | None) -> None:
    decoded = json.loads(outcome) if outcome is not None else None
    if decoded != {"ok": True, "value": EXPECTED[payload]}:
        raise SystemExit(f"benchmark step {payload!r} failed: {decoded!r}")


def spec_for(payload: str, **options: Any) -> FunctionSpec:
    qualname = PAYLOADS[payload][0]
    return FunctionSpec(name=f"bench.{qualname}", module=MODULE, qualname=qualname, **options)


# --- what is measured ---------------------------------------------------------------------------

Measure = Callable[[str, int], Awaitable[float]]  # (payload, batch) -> seconds per step


@dataclass
class Row:
    label: str
    payload: str
    batch: int
    measure: Measure
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


async def direct(payload: str, batch: int) -> float:
    request = request_for(payload)
    began = time.perf_counter()
    for _ in range(batch):
        outcome = run_step(request)
    elapsed = time.perf_counter() - began
    check(payload, outcome)
    return elapsed / batch


def run_on(backend: Backend, **options: Any) -> Measure:
    async def measure(payload: str, batch: int) -> float:
        request, spec = request_for(payload), spec_for(payload, **options)
        began = time.perf_counter()
        for _ in range(batch):
            outcome = await backend.run(request, spec)
        elapsed = time.perf_counter() - began
        check(payload, outcome)
        return elapsed / batch

    return measure


class WakeFloor:
    """The least a step handed from the event loop to another thread and back can cost."""

    def __init__(self) -> None:
        self._to_thread, self._to_thread_w = os.pipe()
        self._back, self._back_w = os.pipe()
        os.set_blocking(self._back, False)
        self._thread = threading.Thread(target=self._echo, name="bench-wake-floor")
        self._waiter: asyncio.Future[None] | None = None

    def _echo(self) -> None:
        while os.read(self._to_thread, 4096):
            os.write(self._back_w, b"!")

    def _on_back(self) -> None:
        os.read(self._back, 4096)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def start(self) -> None:
        self._thread.start()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._back, self._on_back)

    async def measure(self, payload: str, batch: int) -> float:
        began = time.perf_counter()
        for _ in range(batch):
            self._waiter = self._loop.create_future()
            os.write(self._to_thread_w, b"!")
            await self._waiter
        return (time.perf_counter() - began) / batch

    async def stop(self) -> None:
        self._loop.remove_reader(self._back)
        os.close(self._to_thread_w)
        await anyio.to_thread.run_sync(self._thread.join)
        for fd in (self._to_thread, self._back, self._back_w):
            os.close(fd)


class UnitThread:
    """A thread that owns one unit and times batches of calls to it, away from the event loop."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[float | BaseException] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name)

    def open(self) -> None: ...

    def call(self, request: bytes) -> bytes | None:
        raise NotImplementedError

    def batch(self, request: bytes, count: int) -> tuple[float, bytes | None]:
        """Seconds for ``count`` calls, and the last outcome."""
        began = time.perf_counter()
        for _ in range(count):
            outcome = self.call(request)
        return time.perf_counter() - began, outcome

    def close(self) -> None: ...

    def _serve(self) -> None:
        try:
            self.open()
        except BaseException as exc:
            self._results.put(exc)
            return
        self._results.put(0.0)
        try:
            while (job := self._jobs.get()) is not None:
                payload, batch = job
                request = request_for(payload)
                try:
                    elapsed, outcome = self.batch(request, batch)
                    check(payload, outcome)
                except BaseException as exc:
                    self._results.put(exc)
                else:
                    self._results.put(elapsed / batch)
        finally:
            self.close()

    def _result(self) -> float:
        result = self._results.get()
        if isinstance(result, BaseException):
            raise result
        return result

    async def start(self) -> None:
        self._thread.start()
        await anyio.to_thread.run_sync(self._result)

    async def measure(self, payload: str, batch: int) -> float:
        self._jobs.put((payload, batch))
        return await anyio.to_thread.run_sync(self._result)

    async def stop(self) -> None:
        self._jobs.put(None)
        await anyio.to_thread.run_sync(self._thread.join)


class InPlace(UnitThread):
    """run_step called in a loop inside an isolated subinterpreter set up like a pool unit, by
    the thread living in it: the step's own cost there, with nothing handed over."""

    LOOP = (
        "import time as _time\n"
        "from tether._step import run_step as _run\n"
        "_began = _time.perf_counter()\n"
        "for _ in range(_bench_count):\n"
        "    _outcome = _run(_bench_request)\n"
        "_tether_reply(repr(_time.perf_counter() - _began).encode())\n"
        "_tether_reply(_outcome)\n"
    )

    def open(self) -> None:
        self.interp = Interpreter()
        failure = self.interp.exec(_INIT, unit_init(SYS_PATH, [MODULE]))
        if failure is not None or self.interp.take_reply() != b"null":
            raise RuntimeError(failure.traceback if failure else "cannot import the steps")

    def batch(self, request: bytes, count: int) -> tuple[float, bytes | None]:
        shared = {"_bench_request": request, "_bench_count": count}
        failure = self.interp.exec(self.LOOP, shared)
        if failure is not None:
            raise RuntimeError(failure.traceback)
        elapsed = float(self.interp.take_reply() or b"nan")
        return elapsed, self.interp.take_reply()

    def close(self) -> None:
        self.interp.close()


class SubinterpreterUnit(UnitThread):
    """A unit made exactly like a pool unit of the subinterpreter backend, driven by hand."""

    def open(self) -> None:
        ready: queue.SimpleQueue[Exception | None] = queue.SimpleQueue()
        self.unit = _Unit()
        self.unit.start(unit_init(SYS_PATH, [MODULE]), ready.put, lambda unit: None)
        error = ready.get()
        if error is not None:
            raise error
        assert self.unit.interp is not None
        self.interp = self.unit.interp

    def call(self, request: bytes) -> bytes | None:
        self.unit.submit(request)
        while True:  # what the event loop does for run(), blocking instead
            select.select([self.unit.done], [], [])
            if not os.read(self.unit.done, 4096):
                return None
            reply = self.interp.take_reply()
            if reply is not None:
                return reply

    def close(self) -> None:
        self.unit.disown()
        self.unit.join()


class ProcessUnit(UnitThread):
    """A unit process started like the backend starts one, driven with blocking pipe I/O."""

    def open(self) -> None:
        self.proc, self.to_child, self.from_child = spawn_unit()

    def call(self, request: bytes) -> bytes | None:
        write_frame(self.to_child, request)
        return read_frame(self.from_child)

    def close(self) -> None:
        os.close(self.to_child)
        self.proc.wait()
        os.close(self.from_child)


def spawn_unit() -> tuple[subprocess.Popen[bytes], int, int]:
    child_read, to_child = os.pipe()
    from_child, child_write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.runner.isolation._child", str(child_read), str(child_write)],
        pass_fds=(child_read, child_write),
        stdin=subprocess.DEVNULL,
        env=child_environment(),
    )
    os.close(child_read)
    os.close(child_write)
    write_frame(to_child, json.dumps({"sys_path": SYS_PATH, "preload": [MODULE]}).encode())
    if read_frame(from_child) != b'{"ok":true}':
        raise RuntimeError("the unit process could not import the benchmark steps")
    return proc, to_child, from_child


# --- cold cycles by phase (done by hand, on a thread) ---------------------------------------------

# One step run the simplest way, right after _INIT (the pool's units serve theirs in a loop).
FIRST_STEP = "from tether._step import run_step\n_tether_reply(run_step(_tether_payload))\n"


def bare_interpreter() -> dict[str, float]:
    """CPython's own floor: create and destroy an isolated interpreter, nothing of Tether's
    (no queues, no imports), through the same private module the adapter uses on 3.13."""
    import _interpreters  # type: ignore[import-not-found]

    config = _interpreters.new_config("isolated")
    marks = [time.perf_counter()]
    interp_id = _interpreters.create(config)
    marks.append(time.perf_counter())
    _interpreters.destroy(interp_id)
    marks.append(time.perf_counter())
    return phases(["create a bare isolated interpreter", "destroy it"], marks)


def subinterpreter_phases() -> dict[str, float]:
    marks = [time.perf_counter()]
    interp = Interpreter()
    marks.append(time.perf_counter())
    interp.exec(_INIT, unit_init(SYS_PATH, [MODULE]))
    interp.take_reply()
    marks.append(time.perf_counter())
    interp.exec(FIRST_STEP, {"_tether_payload": request_for("no-op")})
    check("no-op", interp.take_reply())
    marks.append(time.perf_counter())
    interp.close()
    marks.append(time.perf_counter())
    return phases(["create", "init (shim + preload)", "first no-op step", "destroy"], marks)


def process_phases() -> dict[str, float]:
    marks = [time.perf_counter()]
    proc, to_child, from_child = spawn_unit()
    marks.append(time.perf_counter())
    write_frame(to_child, request_for("no-op"))
    check("no-op", read_frame(from_child))
    marks.append(time.perf_counter())
    os.close(to_child)
    proc.wait()
    os.close(from_child)
    marks.append(time.perf_counter())
    return phases(["spawn + import (handshake)", "first no-op step", "close + reap"], marks)


def phases(names: list[str], marks: list[float]) -> dict[str, float]:
    out = {name: marks[i + 1] - marks[i] for i, name in enumerate(names)}
    out["total"] = marks[-1] - marks[0]
    return out


# --- output ---------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_header(rounds: int, quick: bool) -> None:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("isolation overhead per step: warm and cold, each backend, next to a direct call")
    print(f"cpu:     {cpu_model()}, {os.cpu_count()} cores ({usable} usable)")
    print(f"python:  {platform.python_implementation()} {sys.version.split()[0]}"
          f" ({platform.platform()}), anyio {metadata.version('anyio')}")  # fmt: skip
    print(f"load:    {load} (1, 5, 15 min) before the run")
    print(
        f"method:  median of {rounds} rounds (min, max across rounds), each round the mean of a"
        f" batch; rows interleaved per round{'; --quick' if quick else ''}"
    )
    print("times:   milliseconds per step; overhead = row median - direct median, same payload")
    print("bytecode: tether and the steps compiled ahead, as an installed package has them")


def print_table(title: str, rows: list[Row], baseline: dict[str, float]) -> None:
    print()
    print(f"{title:<34} {'payload':<8} {'batch':>5} {'median':>9} {'min':>9} {'max':>9}"
          f" {'overhead':>9}  target")  # fmt: skip
    for row in rows:
        overhead = row.median - baseline[row.payload]
        target = TARGETS_MS.get(row.label)
        verdict = ""
        if target is not None:
            met = "met" if overhead * 1e3 <= target else "missed"
            verdict = f"<= {target:g} ms: {met}"
        shown = "" if row.label.startswith("direct") else ms(overhead)
        print(
            f"{row.label:<34} {row.payload:<8} {row.batch:>5} {ms(row.median):>9}"
            f" {ms(min(row.samples)):>9} {ms(max(row.samples)):>9} {shown:>9}  {verdict}"
        )


def print_phases(title: str, samples: list[dict[str, float]]) -> None:
    print()
    print(f"{title:<34} {'median':>9} {'min':>9} {'max':>9}")
    for name in samples[0]:
        values = [sample[name] for sample in samples]
        print(
            f"  {name:<32} {ms(statistics.median(values)):>9} {ms(min(values)):>9}"
            f" {ms(max(values)):>9}"
        )


# --- the run --------------------------------------------------------------------------------------


async def run_rounds(rows: list[Row], rounds: int) -> None:
    for row in rows:  # warm-up: imports, caches, the first unit of each lazy pool
        await row.measure(row.payload, max(1, row.batch // 10))
    for _ in range(rounds):
        for row in rows:
            gc.collect()
            row.samples.append(await row.measure(row.payload, row.batch))


def precompile() -> None:
    """Write the bytecode of Tether and the steps module, as installing a package does.

    A new unit imports them afresh; without a ``__pycache__`` it compiles them from source
    every time (this checkout's environment may set ``PYTHONDONTWRITEBYTECODE``), which is
    several times the cost of loading them and no deployment pays.
    """
    import compileall

    import tether

    for folder in (Path(tether.__file__).parent, HERE):
        if not compileall.compile_dir(folder, quiet=1):
            raise RuntimeError(f"cannot compile the modules under {folder}")


async def main(rounds: int, quick: bool) -> None:
    precompile()
    print_header(rounds, quick)
    scale = 4 if quick else 1

    def batch(payload: str, fast: int, big: int) -> int:
        return max(1, (big if payload == "1 MB" else fast) // scale)

    sub = SubinterpreterBackend(size=1, sys_path=SYS_PATH, preload=[MODULE])
    proc = ProcessBackend(size=1, sys_path=SYS_PATH, preload=[MODULE])
    in_place = InPlace("bench-in-place")
    sub_unit = SubinterpreterUnit("bench-subinterpreter-unit")
    proc_unit = ProcessUnit("bench-process-unit")
    floor = WakeFloor()
    await sub.start()
    await proc.start()
    await in_place.start()
    await sub_unit.start()
    await proc_unit.start()
    await floor.start()
    try:
        warm: list[Row] = []
        for payload in PAYLOADS:
            fast, slow = batch(payload, 2000, 40), batch(payload, 400, 40)
            warm += [
                Row("direct run_step (baseline)", payload, fast, direct),
                Row("in a subinterpreter, no hand-over", payload, fast, in_place.measure),
                Row("subinterpreter unit, no event loop", payload, slow, sub_unit.measure),
                Row("process unit, no event loop", payload, slow, proc_unit.measure),
            ]
            if payload == "no-op":
                warm.append(
                    Row("floor: loop <-> thread wake-up", payload, 400 // scale, floor.measure)
                )
            warm += [
                Row("warm subinterpreter", payload, slow, run_on(sub)),
                Row("warm process", payload, slow, run_on(proc)),
            ]
        await run_rounds(warm, rounds)
        baseline = {row.payload: row.median for row in warm if row.label.startswith("direct")}
        print_table("warm (unit already running)", warm, baseline)

        cold: list[Row] = []
        for payload in PAYLOADS:
            cold += [
                Row("cold subinterpreter", payload, batch(payload, 4, 4), run_on(sub, max_runs=1)),
                Row("cold process", payload, batch(payload, 4, 4), run_on(proc, fresh=True)),
            ]
        await run_rounds(cold, rounds)
        print_table("cold (a new unit for the step)", cold, baseline)
        print("  cold subinterpreter = SubinterpreterBackend.run() with max_runs=1;"
              " cold process = ProcessBackend.run() with fresh=True")  # fmt: skip
    finally:
        await floor.stop()
        await in_place.stop()
        await sub_unit.stop()
        await proc_unit.stop()
        await sub.aclose()
        await proc.aclose()

    sub_phases, floors = [], []
    for _ in range(rounds):  # interleaved, so both see the same machine
        sub_phases.append(await anyio.to_thread.run_sync(subinterpreter_phases))
        if sys.version_info < (3, 14):
            floors.append(await anyio.to_thread.run_sync(bare_interpreter))
    print_phases("cold subinterpreter unit by phase", sub_phases)
    if floors:
        print_phases("floor: CPython alone, same rounds", floors)
    proc_phases = [await anyio.to_thread.run_sync(process_phases) for _ in range(rounds)]
    print_phases("cold process unit by phase", proc_phases)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload:    {load} (1, 5, 15 min) after the run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds per row (default 7)")
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds of smaller batches (a few seconds)"
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


if __name__ == "__main__":
    options = parse_args()
    anyio.run(main, options.rounds, options.quick, backend="asyncio")
