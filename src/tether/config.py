"""Typed settings for the hub and the runner, and where each value came from.

One settings object per command, each field a keyword argument of the thing it configures
(``ServerSettings`` → :class:`tether.hub.Hub`, ``WorkerSettings`` → :class:`tether.runner.
worker.Runner`). Sources, lowest precedence first:

1. defaults (for function options: the ``@app.task`` decorator);
2. the config file: ``--config PATH``, else ``tether.toml`` in the working directory, else
   ``[tool.tether]`` in the nearest ``pyproject.toml``; sections ``[server]``, ``[worker]``
   and ``[functions."module.name"]``;
3. ``TETHER_<FIELD>`` environment variables (``TETHER_PORT``, ``TETHER_HUB``, ...);
4. command-line flags.

Every error names the file (or variable), the key, and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .app import DEFAULT_HUB, OPTION_NAMES, validate_options
from .exceptions import ConfigError

__all__ = [
    "ConfigFile",
    "ServerSettings",
    "Sourced",
    "WorkerSettings",
    "find_config_file",
    "function_layers",
    "load_config_file",
    "resolve_settings",
]

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


@dataclasses.dataclass(kw_only=True)
class ServerSettings:
    """``tether server`` / ``[server]``."""

    host: str = "127.0.0.1"
    port: int = 7878
    data_dir: str = ".tether"
    store: str | None = None  # sqlite:///path or postgresql://...; default: under data_dir
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    lease: float = 30.0
    handshake_timeout: float = 10.0
    max_message_bytes: int = 16 * 1024 * 1024
    token: str | None = None
    runner_token: str | None = None
    fsync: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"

    def hub_kwargs(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["log_level"], fields["log_format"]
        return fields


@dataclasses.dataclass(kw_only=True)
class WorkerSettings:
    """``tether worker`` / ``[worker]``."""

    modules: list[str] = dataclasses.field(default_factory=list)
    hub: str = DEFAULT_HUB
    token: str | None = None
    slots: int | None = None  # default: the number of CPUs
    runner_id: str | None = None
    drain_grace: float = 30.0
    max_abandoned: int = 4
    ca: str | None = None
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"

    def runner_kwargs(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["log_level"], fields["log_format"], fields["modules"]
        return fields


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigFile:
    path: Path | None
    sections: Mapping[str, Mapping[str, Any]]  # server / worker / functions
    prefix: str = ""  # "tool.tether." inside pyproject.toml, for messages

    def where(self, section: str) -> str:
        name = self.path.name if self.path else "<no file>"
        return f"{name}: [{self.prefix}{section}]"


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        return path
    local = Path.cwd() / "tether.toml"
    if local.is_file():
        return local
    for folder in (Path.cwd(), *Path.cwd().parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            try:
                data = tomllib.loads(candidate.read_text())
            except (tomllib.TOMLDecodeError, OSError):
                return None  # not ours to judge; only a [tool.tether] table would be
            return candidate if "tether" in data.get("tool", {}) else None
    return None


def load_config_file(path: Path | None) -> ConfigFile:
    if path is None:
        return ConfigFile(None, {})
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    prefix = ""
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("tether", {})
        prefix = "tool.tether."
    for key, value in data.items():
        if key not in ("server", "worker", "functions"):
            raise ConfigError(
                f"{path.name}: unknown section [{prefix}{key}]; expected server, worker"
                " or functions"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{path.name}: [{prefix}{key}] must be a table")
    functions = data.get("functions", {})
    for name, options in functions.items():
        where = f'{path.name}: [{prefix}functions."{name}"]'
        if not isinstance(options, dict):
            raise ConfigError(f"{where} must be a table of options")
        _check_options(where, options)
    return ConfigFile(path, data, prefix)


def _check_options(where: str, options: Mapping[str, Any]) -> None:
    """Validate one function's overrides. Unlike the decorator, an override may not change a
    function's identity (name, module, qualname): that would point the runner elsewhere."""
    for key in options:
        if key not in OPTION_NAMES:
            raise ConfigError(
                f"{where}: unknown option {key!r}; expected one of {', '.join(OPTION_NAMES)}"
            )
    validate_options(where, options)


@dataclasses.dataclass(frozen=True, slots=True)
class Sourced[S]:
    """Settings and, for every field, where its value came from."""

    settings: S
    sources: dict[str, str]


# Settings whose type alone admits nonsense: the bound, and how to say it in an error.
_BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "port": (lambda v: 0 <= v <= 65535, "an integer from 0 to 65535"),
    "slots": (lambda v: v >= 1, "an integer >= 1"),
    "max_abandoned": (lambda v: v >= 1, "an integer >= 1"),
    "max_message_bytes": (lambda v: v >= 1, "an integer >= 1"),
    "drain_grace": (lambda v: v >= 0, "a number of seconds >= 0"),
    **dict.fromkeys(
        ("heartbeat_interval", "heartbeat_timeout", "lease", "handshake_timeout"),
        (lambda v: v > 0, "a number of seconds > 0"),
    ),
}


def _expected(tp: Any, name: str | None = None) -> str:
    if name in _BOUNDS:
        return _BOUNDS[name][1]
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _expected(inner[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list of strings"
    return names.get(tp, str(tp))


def _coerce(tp: Any, value: Any, *, from_text: bool) -> Any:
    """``value`` as type ``tp``; ValueError if it is not one. Text (env, flags) is parsed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and value == ""):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner[0], value, from_text=from_text)
    if origin is Literal:
        choice = value.lower() if isinstance(value, str) else value  # INFO, JSON, ... too
        if choice not in typing.get_args(tp):
            raise ValueError
        return choice
    if origin is list:
        if from_text and isinstance(value, str):
            return [part for part in value.replace(",", " ").split() if part]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError
        return value
    if tp is bool:
        if from_text and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if not isinstance(value, bool):
            raise ValueError
        return value
    if tp is int:
        if from_text and isinstance(value, str):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        return value
    if tp is float:
        if from_text and isinstance(value, str):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    raise TypeError(f"unsupported settings type {tp!r}")  # a bug in this module


def _setting(hints: Mapping[str, Any], name: str, value: Any, *, from_text: bool) -> Any:
    """``value`` checked for setting ``name``: its type, then its bounds; ValueError if bad."""
    result = _coerce(hints[name], value, from_text=from_text)
    if result is not None and name in _BOUNDS and not _BOUNDS[name][0](result):
        raise ValueError
    return result


def resolve_settings[S](
    cls: type[S],
    section: str,
    file: ConfigFile,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Sourced[S]:
    """Fill ``cls`` from defaults < file section < ``TETHER_*`` env < flags (None = unset)."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    sources = {name: "default" for name in fields}
    table = file.sections.get(section, {})
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(
                f"{file.where(section)}: unknown key {key!r}; expected one of"
                f" {', '.join(sorted(fields))}"
            )
        try:
            values[key] = _setting(hints, key, value, from_text=False)
        except ValueError:
            raise ConfigError(
                f"{file.where(section)}: {key} must be {_expected(hints[key], key)}, got {value!r}"
            ) from None
        sources[key] = str(file.path)
    for name in sorted(fields):
        var = f"TETHER_{name.upper()}"
        if var in env:
            try:
                values[name] = _setting(hints, name, env[var], from_text=True)
            except ValueError:
                raise ConfigError(
                    f"environment variable {var}: expected {_expected(hints[name], name)},"
                    f" got {env[var]!r}"
                ) from None
            sources[name] = f"env {var}"
    for name, value in (flags or {}).items():
        if value is None or value == () or value == []:
            continue
        flag = "--" + name.replace("_", "-")
        try:
            values[name] = _setting(
                hints, name, list(value) if isinstance(value, tuple) else value, from_text=True
            )
        except ValueError:
            raise ConfigError(
                f"{flag}: expected {_expected(hints[name], name)}, got {value!r}"
            ) from None
        sources[name] = "flag " + flag if name != "modules" else "arguments"
    return Sourced(cls(**values), sources)


type Overrides = dict[str, dict[str, Any]]

_TEXT_OPTIONS = frozenset({"isolation", "queue"})  # --set takes these verbatim, not as JSON


def function_layers(
    file: ConfigFile,
    *,
    env: Mapping[str, str] | None = None,
    sets: Sequence[str] = (),
) -> list[tuple[str, Overrides]]:
    """Per-function overrides, lowest precedence first, each labelled with where it came from:
    the file's ``[functions."name"]`` tables, ``TETHER_FUNCTIONS`` (a JSON object of the same
    shape), then ``--set NAME.OPTION=VALUE`` flags."""
    env = os.environ if env is None else env
    layers: list[tuple[str, Overrides]] = []
    table = file.sections.get("functions")
    if table:
        layers.append((str(file.path), {name: dict(opts) for name, opts in table.items()}))
    if "TETHER_FUNCTIONS" in env:
        try:
            parsed = json.loads(env["TETHER_FUNCTIONS"])
        except ValueError as exc:
            raise ConfigError(f"environment variable TETHER_FUNCTIONS: not JSON: {exc}") from None
        if not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
            raise ConfigError(
                "environment variable TETHER_FUNCTIONS: expected a JSON object of"
                ' {"function.name": {"option": value}}'
            )
        for name, options in parsed.items():
            _check_options(f'env TETHER_FUNCTIONS: [functions."{name}"]', options)
        layers.append(("env TETHER_FUNCTIONS", parsed))
    flagged: Overrides = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        name, dot, option = key.rpartition(".")
        if not sep or not dot or not name or not option:
            raise ConfigError(f"--set {item!r}: expected FUNCTION.OPTION=VALUE")
        if option in _TEXT_OPTIONS:
            value: Any = raw  # a queue named 2024 is still a name
        else:
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw  # a bare word, for validation to refuse by name
        flagged.setdefault(name, {})[option] = value
    for name, options in flagged.items():
        _check_options(f'flag --set: [functions."{name}"]', options)
    if flagged:
        layers.append(("flag --set", flagged))
    return layers
