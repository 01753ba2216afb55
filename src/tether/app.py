"""The application object and the ``@app.task`` decorator.

``Tether`` holds where the hub is; ``@app.task`` turns a plain function into a :class:`Task`
that is still callable directly, and gains ``.delay()`` / ``.delay_async()`` to run it on the
fleet. :class:`FunctionSpec` carries the per-function options the runner and hub act on.

This module must import only the standard library: user task modules import it inside isolated
subinterpreters. The HTTP client is imported lazily, when a producer first calls ``.delay()``.
"""

from __future__ import annotations

import os

from .exceptions import ConfigError

TYPE_CHECKING = False  # typing itself costs ~8 ms to import in a new subinterpreter
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, Final, Literal, ParamSpec, TypeVar
    from typing import Generic as _Generic

    from .client import AsyncClient, AsyncRunHandle, Client, RunHandle

    Isolation = Literal["subinterpreter", "process", "auto"]
    P = ParamSpec("P")
    R = TypeVar("R")
else:
    # `class Task[**P, R]` would import typing at runtime (Generic's subscript lives there).
    class _Generic:
        def __class_getitem__(cls, params: object) -> type:
            return cls  # Task[[int], str] in an annotation read at runtime is plain Task

    P = R = None

__all__ = ["ISOLATIONS", "FunctionSpec", "Task", "Tether", "registered_tasks"]

ISOLATIONS: Final = ("subinterpreter", "process", "auto")
DEFAULT_HUB: Final = "http://127.0.0.1:7878"

_IDENTITY: Final = ("name", "module", "qualname")
OPTION_NAMES: Final = (
    "isolation",
    "concurrency",
    "timeout",
    "retries",
    "backoff",
    "queue",
    "max_runs",
    "fresh",
)


class FunctionSpec:
    """Everything the runner and the hub need to know about one task function.

    ``module`` and ``qualname`` locate the function for import inside an isolation unit;
    ``name`` is how producers address it. Immutable, compared and hashed by value: a frozen
    dataclass written out by hand, because every task module imports this one inside every new
    subinterpreter, and :mod:`dataclasses` (with :mod:`inspect` behind it) would triple what
    such a unit spends starting.
    """

    __slots__ = (*_IDENTITY, *OPTION_NAMES)

    name: str
    module: str
    qualname: str
    isolation: Isolation
    concurrency: int | None  # None: up to the runner's slots
    timeout: float | None  # seconds per attempt; None: no limit
    retries: int  # extra attempts after a retryable error
    backoff: float  # seconds before the first retry; doubles each time, with jitter
    queue: str
    max_runs: int | None  # recycle a unit after this many steps; None: never
    fresh: bool  # process isolation only: a new process for every step

    def __init__(
        self,
        *,
        name: str,
        module: str,
        qualname: str,
        isolation: Isolation = "auto",
        concurrency: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 1.0,
        queue: str = "default",
        max_runs: int | None = None,
        fresh: bool = False,
    ) -> None:
        values = {
            "name": name,
            "module": module,
            "qualname": qualname,
            "isolation": isolation,
            "concurrency": concurrency,
            "timeout": timeout,
            "retries": retries,
            "backoff": backoff,
            "queue": queue,
            "max_runs": max_runs,
            "fresh": fresh,
        }
        validate_options(name, values)
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__slots__}

    def options(self) -> dict[str, Any]:
        """The tunable options (everything but the identity fields)."""
        return {key: getattr(self, key) for key in OPTION_NAMES}

    def with_options(self, **changes: Any) -> FunctionSpec:
        validate_options(self.name, changes)  # an unknown one is named, not a TypeError
        return FunctionSpec(**{**self.as_dict(), **changes})

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"FunctionSpec is immutable: use with_options({key}=...)")

    def __delattr__(self, key: str) -> None:
        raise AttributeError("FunctionSpec is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FunctionSpec):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={getattr(self, key)!r}" for key in self.__slots__)
        return f"FunctionSpec({fields})"

    def __reduce__(self) -> tuple[Any, ...]:  # slots and a refusing __setattr__: say how
        return _rebuild_spec, (self.as_dict(),)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, key) for key in self.__slots__)


def _rebuild_spec(values: dict[str, Any]) -> FunctionSpec:
    return FunctionSpec(**values)


def validate_options(where: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming ``where`` and the key for any bad option value."""

    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} must be {expected}, got {options[key]!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    for key in options:
        if key not in OPTION_NAMES and key not in _IDENTITY:
            raise ConfigError(
                f"{where}: unknown option {key!r}; expected one of {', '.join(OPTION_NAMES)}"
            )
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "isolation": (lambda v: v in ISOLATIONS, "one of " + ", ".join(map(repr, ISOLATIONS))),
        "concurrency": (lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1"),
        "timeout": (lambda v: v is None or (is_number(v) and v > 0), "a number of seconds > 0"),
        "retries": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "backoff": (lambda v: is_number(v) and v >= 0, "a number of seconds >= 0"),
        "queue": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        "max_runs": (lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1"),
        "fresh": (lambda v: isinstance(v, bool), "true or false"),
    }
    for key, (ok, expected) in checks.items():
        if key in options and not ok(options[key]):
            raise bad(key, expected)
    if options.get("fresh") and options.get("isolation") == "subinterpreter":
        raise ConfigError(f"{where}: fresh=True needs isolation='process'")


# Every task defined in this interpreter, by name. The runner reads it after importing the
# user's modules; a unit reads nothing from it (it resolves module + qualname directly).
_registry: dict[str, Task[..., Any]] = {}


def registered_tasks() -> dict[str, Task[..., Any]]:
    """Tasks defined so far in this interpreter, by name."""
    return dict(_registry)


class Task(_Generic[P, R]):
    """A task function: call it to run it here, ``.delay()`` to run it on a runner."""

    def __init__(self, app: Tether, fn: Callable[P, R], spec: FunctionSpec) -> None:
        self.app = app
        self.fn = fn
        self.spec = spec
        self.name = spec.name
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", spec.name)
        self.__qualname__ = getattr(fn, "__qualname__", spec.qualname)
        self.__module__ = spec.module
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} isolation={self.spec.isolation}>"

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> RunHandle:
        """Submit a run to the hub and return its handle (``.get()`` waits for the result)."""
        return self.app.client().submit(self.name, *args, **kwargs)

    async def delay_async(self, *args: P.args, **kwargs: P.kwargs) -> AsyncRunHandle:
        """``delay()`` through ``httpx.AsyncClient``."""
        return await self.app.async_client().submit(self.name, *args, **kwargs)


class Tether:
    """A Tether application: where the hub is, and the tasks defined against it.

    ``hub`` and ``token`` default to ``TETHER_HUB`` / ``TETHER_TOKEN`` from the environment,
    read when a producer first submits (so the same module works for every deployment).
    """

    def __init__(self, name: str = "tether", *, hub: str | None = None, token: str | None = None):
        self.name = name
        self._hub = hub
        self._token = token
        self.tasks: dict[str, Task[..., Any]] = {}
        self._client: Client | None = None
        self._async_client: AsyncClient | None = None

    @property
    def hub(self) -> str:
        return self._hub or os.environ.get("TETHER_HUB") or DEFAULT_HUB

    @property
    def token(self) -> str | None:
        return self._token or os.environ.get("TETHER_TOKEN") or None

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        isolation: Isolation = "auto",
        concurrency: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 1.0,
        queue: str = "default",
        max_runs: int | None = None,
        fresh: bool = False,
    ) -> Any:
        """Declare a task; usable bare (``@app.task``) or with options (``@app.task(...)``)."""

        def decorate(f: Callable[..., Any]) -> Task[..., Any]:
            if not callable(f) or not hasattr(f, "__qualname__"):
                raise TypeError(f"@task expects a function, got {f!r}")
            if "<locals>" in f.__qualname__:
                raise ConfigError(
                    f"@task {f.__qualname__}: tasks must be defined at module level so that a"
                    " subinterpreter or spawned process can import them"
                )
            module = f.__module__
            spec = FunctionSpec(
                name=name or f"{module}.{f.__qualname__}",
                module=module,
                qualname=f.__qualname__,
                isolation=isolation,
                concurrency=concurrency,
                timeout=timeout,
                retries=retries,
                backoff=backoff,
                queue=queue,
                max_runs=max_runs,
                fresh=fresh,
            )
            task = Task(self, f, spec)
            self.tasks[spec.name] = task
            _registry[spec.name] = task
            return task

        if fn is not None:
            return decorate(fn)
        return decorate

    def client(self) -> Client:
        if self._client is None:
            from .client import Client

            self._client = Client(self.hub, token=self.token)
        return self._client

    def close(self) -> None:
        """Close the blocking client ``.delay()`` opened, if any."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        """Close both clients ``.delay()`` and ``.delay_async()`` opened, if any."""
        self.close()
        if self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None

    def async_client(self) -> AsyncClient:
        if self._async_client is None:
            from .client import AsyncClient

            self._async_client = AsyncClient(self.hub, token=self.token)
        return self._async_client
