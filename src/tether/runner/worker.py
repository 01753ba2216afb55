"""The runner process's main thread: load, resolve isolation, start the connection thread,
supervise.

The main thread imports the user's modules, decides where each function runs (refusing, before
anything connects, a function that cannot run where it was configured), starts the pools and
the connection thread through ``anyio.from_thread.start_blocking_portal``, then only waits for
signals: the first SIGTERM/SIGINT drains, a second one stops at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from types import FrameType
from typing import Any

import anyio
from anyio.from_thread import start_blocking_portal

from ..app import DEFAULT_HUB, OPTION_NAMES, FunctionSpec, validate_options
from ..exceptions import ConfigError, IsolationError
from ..protocol import FunctionInfo
from .connection import EXIT_RESTART, HubLink
from .isolation import Backend, create_backend
from .loader import load_tasks

__all__ = ["ResolvedFunction", "Runner"]

log = logging.getLogger("tether.runner")


@dataclasses.dataclass(frozen=True, slots=True)
class ResolvedFunction:
    """A function with its isolation decided, and why."""

    spec: FunctionSpec  # spec.isolation is "subinterpreter" or "process", never "auto"
    configured: str  # the isolation asked for
    reason: str
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)  # option -> source

    def info(self) -> FunctionInfo:
        s = self.spec
        return FunctionInfo(
            name=s.name,
            queue=s.queue,
            concurrency=s.concurrency,
            retries=s.retries,
            backoff=s.backoff,
            timeout=s.timeout,
            isolation=s.isolation,
            reason=self.reason,
            options={**s.options(), "configured_isolation": self.configured},
        )


def resolve_isolation(
    specs: Mapping[str, FunctionSpec], sources: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, ResolvedFunction]:
    """Decide each function's backend; IsolationError for one that cannot run as configured."""
    sources = sources or {}
    needs_probe = sorted({s.module for s in specs.values() if s.isolation != "process"})
    verdicts: dict[str, str | None] = {}
    if needs_probe:
        from .isolation.probe import probe_modules

        verdicts = probe_modules(needs_probe, list(sys.path))
    resolved: dict[str, ResolvedFunction] = {}
    for name, spec in specs.items():
        if spec.isolation == "process":
            resolved[name] = ResolvedFunction(spec, "process", "configured", sources.get(name, {}))
            continue
        if spec.fresh:  # only "auto" can get here: subinterpreter + fresh is refused earlier
            reason = "auto: fresh=True needs a new process for every step"
            spec = spec.with_options(isolation="process")
            resolved[name] = ResolvedFunction(spec, "auto", reason, sources.get(name, {}))
            continue
        refusal = verdicts.get(spec.module)
        if refusal is None:
            reason = (
                "configured"
                if spec.isolation == "subinterpreter"
                else f"auto: {spec.module} loads in an isolated subinterpreter"
            )
            resolved[name] = ResolvedFunction(
                spec.with_options(isolation="subinterpreter"),
                spec.isolation,
                reason,
                sources.get(name, {}),
            )
        elif spec.isolation == "auto":
            reason = f"auto: {spec.module} cannot load in an isolated subinterpreter ({refusal})"
            resolved[name] = ResolvedFunction(
                spec.with_options(isolation="process"), "auto", reason, sources.get(name, {})
            )
        else:
            from .isolation.probe import refusing_extension

            ext = refusing_extension(refusal)
            culprit = f"extension module {ext}" if ext else f"module {spec.module}"
            raise IsolationError(
                f"function {name} is configured with isolation='subinterpreter', but its module"
                f" {spec.module} cannot load in an isolated subinterpreter: {culprit} refused"
                f" ({refusal}).\nFix: use isolation='process' for it (in @app.task(...), or"
                f' isolation = "process" under [functions."{name}"] in tether.toml).'
            )
    return resolved


class Runner:
    """A Tether runner. Every keyword maps one-to-one to a ``[worker]`` setting."""

    def __init__(
        self,
        modules: Sequence[str],
        *,
        hub: str | None = None,
        token: str | None = None,
        slots: int | None = None,
        runner_id: str | None = None,
        drain_grace: float = 30.0,
        max_abandoned: int = 4,
        ca: str | None = None,
        functions: Mapping[str, Mapping[str, Any]] | None = None,
        function_layers: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]] = (),
    ) -> None:
        self.modules = list(modules)
        self.hub = hub or os.environ.get("TETHER_HUB") or DEFAULT_HUB
        self.token = token
        self.slots = slots if slots is not None else os.cpu_count() or 1
        if self.slots < 1:
            raise ConfigError(f"slots must be at least 1, got {self.slots}")
        self.runner_id = runner_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.drain_grace = drain_grace
        self.max_abandoned = max_abandoned
        self.ca = ca
        # Per-function overrides, lowest precedence first, each labelled with its source.
        self.function_layers = [("functions", functions)] if functions else []
        self.function_layers += list(function_layers)
        self.resolved: dict[str, ResolvedFunction] = {}
        self.link: HubLink | None = None

    def load(self) -> dict[str, ResolvedFunction]:
        """Import the modules, apply per-function overrides, resolve isolation."""
        specs = load_tasks(self.modules)
        sources = {name: dict.fromkeys(OPTION_NAMES, "decorator") for name in specs}
        for label, layer in self.function_layers:
            for name, options in layer.items():
                where = f'{label}: [functions."{name}"]'
                if name not in specs:
                    raise ConfigError(
                        f"{where}: no loaded module defines a task named {name!r}"
                        f" (loaded: {', '.join(sorted(specs))})"
                    )
                validate_options(where, options)
                try:
                    specs[name] = specs[name].with_options(**options)
                except ConfigError as exc:  # options that only conflict once merged
                    raise ConfigError(f"{where}: {exc}") from None
                sources[name].update(dict.fromkeys(options, label))
        self.resolved = resolve_isolation(specs, sources)
        return self.resolved

    def _backends(self) -> dict[str, Backend]:
        by_kind: dict[str, list[FunctionSpec]] = {}
        for fn in self.resolved.values():
            by_kind.setdefault(fn.spec.isolation, []).append(fn.spec)
        backends = {}
        for kind, specs in by_kind.items():
            wanted = sum(s.concurrency or self.slots for s in specs)
            backends[kind] = create_backend(
                kind,
                size=max(1, min(self.slots, wanted)),
                sys_path=sys.path,
                preload=sorted({s.module for s in specs}),
            )
        return backends

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.hub.startswith("https://"):
            return None
        return ssl.create_default_context(cafile=self.ca)

    def run(self) -> int:
        """Serve until drained; returns the process exit code (re-executes on EXIT_RESTART)."""
        if not self.resolved:
            self.load()
        for fn in self.resolved.values():
            log.info("function %s: %s (%s)", fn.spec.name, fn.spec.isolation, fn.reason)
        backends = self._backends()
        link = HubLink(
            hub=self.hub,
            specs={name: fn.spec for name, fn in self.resolved.items()},
            backends=backends,
            functions=[fn.info() for fn in self.resolved.values()],
            slots=self.slots,
            runner_id=self.runner_id,
            token=self.token,
            ssl_context=self._ssl_context(),
            drain_grace=self.drain_grace,
            max_abandoned=self.max_abandoned,
        )
        self.link = link
        with start_blocking_portal("asyncio", name="tether-connection") as portal:
            try:
                portal.call(_start_all, backends)
                future = portal.start_task_soon(link.run)
                signals = 0

                def on_signal(signum: int, frame: FrameType | None) -> None:
                    nonlocal signals
                    signals += 1
                    if signals == 1:
                        log.info("%s: draining (again to stop at once)", signal.strsignal(signum))
                        portal.start_task_soon(link.drain, signal.Signals(signum).name)
                    else:
                        log.warning("second signal: stopping now")
                        portal.start_task_soon(_stop, link, 130)

                previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
                try:
                    while True:
                        try:
                            code: int = future.result(timeout=0.5)
                            break
                        except FutureTimeout:
                            continue
                finally:
                    for s, handler in previous.items():
                        signal.signal(s, handler)
            finally:
                portal.call(_close_all, backends)
        if code == EXIT_RESTART:
            log.warning("re-executing the runner to replace stuck subinterpreters")
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        return code


async def _start_all(backends: Mapping[str, Backend]) -> None:
    async with anyio.create_task_group() as tg:
        for backend in backends.values():
            tg.start_soon(backend.start)


async def _close_all(backends: Mapping[str, Backend]) -> None:
    for backend in backends.values():
        await backend.aclose()


async def _stop(link: HubLink, code: int) -> None:
    link.stop(code)
