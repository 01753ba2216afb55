"""The program every ``process`` unit runs, and the framing its parent shares with it.

Started as ``python -m tether.runner.isolation._child READ_FD WRITE_FD`` (spawned, never
forked). It talks to its parent over two dedicated pipes, never over stdout/stderr: those stay
the user's, inherited from the runner, so a ``print`` in a step shows up and cannot corrupt the
channel. Every message is one frame: a 4-byte big-endian length, then that many bytes.

1. The first frame is the unit's configuration, JSON ``{"sys_path": [...], "preload": [...]}``;
   the child answers ``{"ok": true}`` or ``{"ok": false, "module": m, "reason": r}`` and exits.
2. Then, until end of file: read a request frame, :func:`tether._step.run_step` it, write the
   outcome frame.

It must import only the standard library, :mod:`tether._step` and the preload modules: whatever
else it imported would be loaded (and paid for) in every unit of every runner.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Final

__all__ = [
    "MAX_FRAME",
    "advance",
    "child_environment",
    "describe_exit",
    "frame_views",
    "main",
    "read_frame",
    "write_frame",
]

_HEADER: Final = 4
MAX_FRAME: Final = 2**32 - 1  # what a 4-byte length can say


def read_frame(fd: int) -> bytes | None:
    """Read one frame from a blocking ``fd``; None on end of file (including a frame cut short
    by a dying peer)."""
    header = _read_exactly(fd, _HEADER)
    if header is None:
        return None
    return _read_exactly(fd, int.from_bytes(header, "big"))


def write_frame(fd: int, payload: bytes) -> None:
    """Write one frame to a blocking ``fd``; BrokenPipeError if the peer is gone."""
    views = frame_views(payload)
    while views:
        views = advance(views, os.writev(fd, views))


def frame_views(payload: bytes) -> list[memoryview]:
    """A frame as the buffers to hand to ``os.writev``: its header, then the payload itself.

    One system call writes both, and the payload is never copied (joining it to its header
    would copy it: a megabyte argument, a megabyte copied).
    """
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds the limit of {MAX_FRAME}")
    return [memoryview(len(payload).to_bytes(_HEADER, "big")), memoryview(payload)]


def advance(views: list[memoryview], written: int) -> list[memoryview]:
    """What is left of ``views`` to write once ``written`` bytes of them went out."""
    while views and written >= len(views[0]):
        written -= len(views[0])
        views = views[1:]
    if written:
        views[0] = views[0][written:]
    return views


def _read_exactly(fd: int, size: int) -> bytes | None:
    if size == 0:
        return b""
    # A pipe usually holds the whole frame by now, and then this is the only read and the
    # bytes it returns are the frame: nothing is copied or joined. (A pipe holds 64 KiB unless
    # enlarged, so the cap costs nothing and bounds what a corrupt length could allocate.)
    first = os.read(fd, min(size, 1 << 20))
    if len(first) == size:
        return first
    if not first:
        return None
    buffer = bytearray(size)
    buffer[: len(first)] = first
    view = memoryview(buffer)
    got = len(first)
    while got < size:
        count = os.readv(fd, [view[got:]])
        if not count:
            return None
        got += count
    return bytes(buffer)


def child_environment() -> dict[str, str]:
    """The environment for a child started with ``python -m tether.runner.isolation...``.

    The parent may have found ``tether`` through a ``sys.path`` entry the child's interpreter
    would not have at start-up (a source checkout, a path added at run time), so the directory
    holding the ``tether`` package goes first on ``PYTHONPATH``.
    """
    # os.path, not pathlib: this module is imported by every unit, and pathlib is not free.
    root = os.path.realpath(__file__)
    for _ in range(4):  # .../src/tether/runner/isolation/_child.py -> .../src
        root = os.path.dirname(root)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def describe_exit(returncode: int | None) -> str:
    """``"killed by SIGSEGV"``, ``"exit code 3"``: how a unit process ended."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def main(argv: Sequence[str]) -> int:
    read_fd, write_fd = int(argv[0]), int(argv[1])
    # Ctrl-C in a terminal signals the whole process group: the runner drains on it and lets
    # in-flight steps finish, so the unit must not die of it; the runner stops it by closing
    # its pipe (or with SIGTERM/SIGKILL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tether.runner.isolation import lower_priority

    lower_priority()  # steps yield the CPU to the runner's connection thread

    from tether._step import import_modules, run_step

    init = read_frame(read_fd)
    if init is None:
        return 0
    config = json.loads(init)
    failed = import_modules(config["sys_path"], config["preload"])
    if failed is not None:
        module, reason = failed
        answer = {"ok": False, "module": module, "reason": reason}
        write_frame(write_fd, json.dumps(answer).encode())
        return 1
    write_frame(write_fd, b'{"ok":true}')
    while (request := read_frame(read_fd)) is not None:
        outcome = run_step(request)
        # A killed unit loses what it buffered: flush the step's prints before answering.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # the user closed or broke it; the outcome still matters
        try:
            write_frame(write_fd, outcome)
        except BrokenPipeError:
            return 0  # the runner went away: nobody to answer
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
