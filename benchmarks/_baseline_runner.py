"""The liveness baseline: a Tether runner whose steps run on threads of its own main
interpreter, as Celery's threads pool, taskiq, dramatiq and arq do.

It exists only inside the benchmark, to show what isolation buys: it is the same runner, the
same connection thread and the same steps, with the isolation backends swapped for a thread
pool that shares the runner's GIL. Never use it for anything else.

    python benchmarks/_baseline_runner.py MODULE --hub URL --slots N --runner-id ID
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import anyio
import anyio.to_thread

from tether._step import run_step
from tether.app import FunctionSpec
from tether.runner.isolation import Backend
from tether.runner.worker import Runner


class SharedGILThreads(Backend):
    name = "thread"

    def __init__(self, *, size: int, sys_path: Sequence[str], preload: Sequence[str]) -> None:
        super().__init__(size=size, sys_path=sys_path, preload=preload)
        self._limiter = anyio.CapacityLimiter(size)

    async def start(self) -> None:
        pass

    async def run(self, request: bytes, spec: FunctionSpec) -> bytes:
        return await anyio.to_thread.run_sync(run_step, request, limiter=self._limiter)

    async def aclose(self) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("modules", nargs="+")
    parser.add_argument("--hub", required=True)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--runner-id", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runner = Runner(args.modules, hub=args.hub, slots=args.slots, runner_id=args.runner_id)
    resolved = runner.load()
    kinds = {fn.spec.isolation for fn in resolved.values()}
    backend = SharedGILThreads(size=args.slots, sys_path=sys.path, preload=[])
    runner._backends = lambda: dict.fromkeys(kinds, backend)  # type: ignore[method-assign]
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
