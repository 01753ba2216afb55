"""The ``tether`` command: server, worker, submit, result, status, demo.

Each command is a thin layer: it resolves settings (:mod:`tether.config`), then calls the hub,
the runner or the client. Errors Tether raises are shown as one clear message and a non-zero
exit code, never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import click

from . import __version__
from .app import DEFAULT_HUB
from .config import (
    ServerSettings,
    WorkerSettings,
    find_config_file,
    load_config_file,
    resolve_settings,
)
from .exceptions import ConfigError, TaskError, TetherError

__all__ = ["main"]


class _ConfigFailure(click.ClickException):
    exit_code = 2  # like a usage error: the command cannot start as configured


def _fail(exc: TetherError) -> click.ClickException:
    if isinstance(exc, ConfigError):
        return _ConfigFailure(str(exc))
    return click.ClickException(str(exc))


def parse_arg(text: str) -> Any:
    """A command-line argument as JSON (``3``, ``[1, 2]``, ``null``), else as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: ./tether.toml, else [tool.tether] in pyproject.toml).",
)
log_options = [
    click.option("--log-level", default=None, help="debug, info, warning or error."),
    click.option(
        "--log-format", type=click.Choice(["text", "json"]), default=None, help="Log line format."
    ),
]
hub_option = click.option(
    "--hub",
    envvar="TETHER_HUB",
    default=None,
    help=f"Hub URL (env TETHER_HUB; else the config file's [worker] hub; else {DEFAULT_HUB}).",
)
token_option = click.option(
    "--token", envvar="TETHER_TOKEN", default=None, help="Bearer token (env TETHER_TOKEN)."
)
ca_option = click.option(
    "--ca", envvar="TETHER_CA", default=None, help="CA bundle to verify an https hub."
)


def _with(options: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def apply(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tether")
def main() -> None:
    """Tether: a task runner whose workers never miss a heartbeat."""


@main.command()
@config_option
@click.option("--host", default=None, help="Address to bind [127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port for the API and runners [7878].")
@click.option("--data-dir", default=None, help="Where the SQLite store lives [./.tether].")
@click.option("--store", default=None, help="Store URL (sqlite:///path.db).")
@click.option("--heartbeat-interval", type=float, default=None, help="Seconds [1.0].")
@click.option("--heartbeat-timeout", type=float, default=None, help="Seconds [5.0].")
@click.option("--lease", type=float, default=None, help="Lease length in seconds [30].")
@click.option("--token", default=None, help="Token producers and runners must present.")
@click.option("--runner-token", default=None, help="A separate token for runners only.")
@click.option("--fsync/--no-fsync", default=None, help="fsync every commit (survive power loss).")
@click.option("--tls-cert", default=None, help="Certificate (PEM) to serve https/wss.")
@click.option("--tls-key", default=None, help="Private key (PEM) for --tls-cert.")
@_with(log_options)
def server(config_path: str | None, **flags: Any) -> None:
    """Start a hub: the HTTP API and the runner endpoint on one port."""
    from ._logging import configure_logging
    from .hub import Hub

    try:
        file = load_config_file(find_config_file(config_path))
        settings = resolve_settings(ServerSettings, "server", file, flags=flags).settings
        configure_logging(settings.log_level, settings.log_format)
        hub = Hub(**settings.hub_kwargs())
    except TetherError as exc:
        raise _fail(exc) from None
    hub.run()


@main.command()
@click.argument("modules", nargs=-1)
@config_option
@click.option("--hub", default=None, help="Hub URL [http://127.0.0.1:7878] (env TETHER_HUB).")
@click.option("--slots", type=int, default=None, help="Steps run at once [number of CPUs].")
@click.option("--token", default=None, help="Bearer token (env TETHER_TOKEN).")
@click.option("--runner-id", default=None, help="Stable id for this runner [host-pid-random].")
@click.option("--drain-grace", type=float, default=None, help="Seconds to finish work [30].")
@click.option(
    "--max-abandoned",
    type=int,
    default=None,
    help="Restart after this many subinterpreters are stuck in timed-out steps [4].",
)
@click.option("--ca", default=None, help="CA bundle to verify an https/wss hub.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="FUNCTION.OPTION=VALUE",
    help="Override one function's option, e.g. --set app.tasks.resize.timeout=60.",
)
@click.option("--check", is_flag=True, help="Load and resolve everything, print it, exit.")
@click.option("--json", "as_json", is_flag=True, help="With --check: print JSON.")
@_with(log_options)
def worker(
    modules: tuple[str, ...],
    config_path: str | None,
    sets: tuple[str, ...],
    check: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Start a runner serving the tasks in MODULES (e.g. app.tasks)."""
    from ._logging import configure_logging
    from .config import function_layers
    from .runner.worker import Runner

    try:
        file = load_config_file(find_config_file(config_path))
        sourced = resolve_settings(
            WorkerSettings, "worker", file, flags={"modules": modules, **flags}
        )
        settings = sourced.settings
        configure_logging("warning" if check else settings.log_level, settings.log_format)
        runner = Runner(
            settings.modules,
            function_layers=function_layers(file, sets=sets),
            **settings.runner_kwargs(),
        )
        runner.load()
    except TetherError as exc:
        if check and as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc)}, indent=2))
            sys.exit(2 if isinstance(exc, ConfigError) else 1)
        raise _fail(exc) from None
    if check:
        report = _check_report(file.path, sourced.settings, sourced.sources, runner)
        click.echo(json.dumps(report, indent=2) if as_json else _render_check(report))
        return
    sys.exit(runner.run())


def _check_report(path: Any, settings: Any, sources: dict[str, str], runner: Any) -> Any:
    import dataclasses

    return {
        "ok": True,
        "config_file": None if path is None else str(path),
        "settings": {
            name: {"value": value, "source": sources[name]}
            for name, value in dataclasses.asdict(settings).items()
            if name != "token"
        }
        | ({"token": {"value": "***", "source": sources["token"]}} if settings.token else {}),
        "functions": [
            {
                "name": name,
                "isolation": fn.spec.isolation,
                "configured_isolation": fn.configured,
                "reason": fn.reason,
                "options": {
                    option: {"value": value, "source": fn.sources.get(option, "decorator")}
                    for option, value in fn.spec.options().items()
                },
            }
            for name, fn in sorted(runner.resolved.items())
        ],
    }


_LAYER_LABELS = frozenset({"env TETHER_FUNCTIONS", "flag --set"})  # others: a file's path


def _render_check(report: dict[str, Any]) -> str:
    """The --check report as text: settings with sources, then one row per function; a value
    that does not come from the decorator is marked with its source."""
    lines = [f"config file: {report['config_file'] or '(none)'}", "", "worker settings:"]
    for name, item in report["settings"].items():
        lines.append(f"  {name:<14} {json.dumps(item['value']):<32} {item['source']}")
    columns = ["concurrency", "timeout", "retries", "backoff", "queue", "max_runs", "fresh"]
    rows = [["function", "isolation", *columns]]
    notes = []
    for fn in report["functions"]:
        row = [fn["name"]]
        for option in ["isolation", *columns]:
            item = fn["options"][option]
            value = "-" if item["value"] is None else str(item["value"]).lower()
            if item["source"] != "decorator":
                marker = item["source"].split(" ", 1)[0]  # env / flag / the file's path
                value += f" [{marker if item['source'] in _LAYER_LABELS else 'file'}]"
            row.append(value)
        rows.append(row)
        source = fn["options"]["isolation"]["source"]
        configured = f"configured {fn['configured_isolation']!r} ({source})"
        notes.append(f"  {fn['name']}: {configured}; {fn['reason']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["", f"functions: {len(report['functions'])}"]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    lines += ["", "isolation:", *notes, "", "ok: every function loads and can run as configured"]
    return "\n".join(lines)


@main.group()
def config() -> None:
    """Inspect configuration."""


@config.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_show(config_path: str | None, as_json: bool) -> None:
    """Print the effective server and worker settings, each with its source."""
    import dataclasses

    from .config import function_layers

    try:
        file = load_config_file(find_config_file(config_path))
        server = resolve_settings(ServerSettings, "server", file)
        worker_ = resolve_settings(WorkerSettings, "worker", file)
        layers = function_layers(file)
    except TetherError as exc:
        raise _fail(exc) from None

    def table(sourced: Any) -> dict[str, Any]:
        values = dataclasses.asdict(sourced.settings)
        for secret in ("token", "runner_token"):
            if values.get(secret):
                values[secret] = "***"
        return {k: {"value": v, "source": sourced.sources[k]} for k, v in values.items()}

    functions: dict[str, dict[str, Any]] = {}
    for label, layer in layers:
        for name, options in layer.items():
            for option, value in options.items():
                functions.setdefault(name, {})[option] = {"value": value, "source": label}
    report: dict[str, Any] = {
        "config_file": None if file.path is None else str(file.path),
        "server": table(server),
        "worker": table(worker_),
        "functions": functions,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"# config file: {report['config_file'] or '(none)'}")
    for section in ("server", "worker"):
        click.echo(f"\n[{section}]")
        for name, item in report[section].items():
            shown = f"{name} = {json.dumps(item['value'])}"
            click.echo(f"{shown:<48} # {item['source']}")
    for name, options in functions.items():
        click.echo(f'\n[functions."{name}"]')
        for option, item in options.items():
            shown = f"{option} = {json.dumps(item['value'])}"
            click.echo(f"{shown:<48} # {item['source']}")


def _client(hub: str | None, token: str | None, ca: str | None) -> Any:
    from .client import Client

    return Client(hub or _configured_hub(), token=token, ca=ca)


def _configured_hub() -> str:
    """The hub for submit/result/status when neither --hub nor TETHER_HUB names one: the one
    this directory's config file points its runners at, so that a config-file deployment is
    inspected where it is configured."""
    file = load_config_file(find_config_file())
    hub = file.sections.get("worker", {}).get("hub", DEFAULT_HUB)
    if not isinstance(hub, str):
        raise ConfigError(f"{file.where('worker')}: hub must be a string, got {hub!r}")
    return hub


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None if not isinstance(value, dict) else 2))


@main.command()
@click.argument("function")
@click.argument("args", nargs=-1)
@click.option("-k", "--kwarg", "kwargs", multiple=True, help="KEY=VALUE (VALUE parsed as JSON).")
@click.option("--queue", default=None, help="Queue to submit to.")
@click.option("--delay", type=float, default=None, help="Seconds before the run may start.")
@click.option("--idempotency-key", default=None, help="Submitting the same key twice is one run.")
@click.option("--count", type=int, default=1, show_default=True, help="Submit this many runs.")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait with --wait.")
@hub_option
@token_option
@ca_option
def submit(
    function: str,
    args: tuple[str, ...],
    kwargs: tuple[str, ...],
    queue: str | None,
    delay: float | None,
    idempotency_key: str | None,
    count: int,
    wait: bool,
    timeout: float | None,
    hub: str | None,
    token: str | None,
    ca: str | None,
) -> None:
    """Submit FUNCTION(ARGS...); each ARG is parsed as JSON, else taken as a string."""
    keywords: dict[str, Any] = {}
    for item in kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--kwarg")
        keywords[key] = parse_arg(value)
    values = [parse_arg(a) for a in args]
    try:
        with _client(hub, token, ca) as client:
            handles = []
            with click.progressbar(
                length=count, label="submitting", file=sys.stderr, hidden=count < 100
            ) as bar:
                for _ in range(count):
                    handles.append(
                        client.apply(
                            function,
                            values,
                            keywords,
                            queue=queue,
                            delay=delay,
                            idempotency_key=idempotency_key,
                        )  # fmt: skip
                    )
                    bar.update(1)
            if not wait:
                for handle in handles:
                    click.echo(handle.id)
                return
            failed = 0
            with click.progressbar(
                handles, label="waiting", file=sys.stderr, hidden=count < 100
            ) as waiting:
                for handle in waiting:
                    try:
                        _echo_json(handle.get(timeout=timeout))
                    except TaskError as exc:
                        failed += 1
                        click.echo(f"run {handle.id} failed: {exc}", err=True)
            if failed:
                sys.exit(1)
    except TypeError as exc:
        raise click.ClickException(str(exc)) from None
    except TetherError as exc:
        raise _fail(exc) from None


@main.command()
@click.argument("run_id")
@click.option("--wait", is_flag=True, help="Wait until the run finishes.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait with --wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole run as JSON.")
@hub_option
@token_option
@ca_option
def result(
    run_id: str,
    wait: bool,
    timeout: float | None,
    as_json: bool,
    hub: str | None,
    token: str | None,
    ca: str | None,
) -> None:
    """Print a run's result (or its state, or its error)."""
    try:
        with _client(hub, token, ca) as client:
            view = client.wait(run_id, timeout) if wait else client.run(run_id)
    except TetherError as exc:
        raise _fail(exc) from None
    if as_json:
        _echo_json(view)
    elif view["state"] == "succeeded":
        _echo_json(view.get("result"))
    elif view.get("error"):
        e = view["error"]
        click.echo(f"run {run_id} {view['state']}: {e['type']}: {e['message']}", err=True)
        if e.get("traceback"):
            click.echo(e["traceback"].rstrip(), err=True)
    else:
        click.echo(view["state"])
    if view["state"] in ("failed", "cancelled"):
        sys.exit(1)


def _render_status(status: dict[str, Any]) -> str:
    lines = []
    runners = status["runners"]
    lines.append(f"runners: {len(runners)}")
    if runners:
        lines.append(
            f"  {'id':<32} {'host':<16} {'pid':>7} {'busy/slots':>10} {'hb ms':>6}"
            f" {'last ms':>8} {'max gap':>8}"
        )
        for r in runners:
            hb = r["heartbeat"]
            busy = r["slots"] - r["free_slots"]
            last = hb["last_age_ms"]
            lines.append(
                f"  {r['id'][:32]:<32} {r['host'][:16]:<16} {r['pid']:>7}"
                f" {f'{busy}/{r["slots"]}':>10} {hb['interval_ms']:>6}"
                f" {'-' if last is None else f'{last:.0f}':>8} {hb['max_gap_ms']:>8.1f}"
                + ("  draining" if r["draining"] else "")
            )
    functions: dict[str, Any] = {}
    for r in runners:
        for f in r["functions"]:
            functions.setdefault(f["name"], f)
    lines.append(f"functions: {len(functions)}")
    for name, f in sorted(functions.items()):
        lines.append(f"  {name:<48} {f['isolation']:<15} {f.get('reason', '')}")
    queues = status.get("queues", {})
    lines.append("queues: " + (", ".join(f"{q}={n}" for q, n in sorted(queues.items())) or "-"))
    runs = status.get("runs", {})
    lines.append("runs: " + (", ".join(f"{s}={n}" for s, n in sorted(runs.items())) or "-"))
    return "\n".join(lines)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Refresh every N s.",
)
@hub_option
@token_option
@ca_option
def status(
    as_json: bool, watch: float | None, hub: str | None, token: str | None, ca: str | None
) -> None:
    """Show runners, functions, queue depths and runs by state."""
    try:
        with _client(hub, token, ca) as client:
            while True:
                current = client.status()
                if as_json:
                    _echo_json(current)
                else:
                    if watch:
                        click.clear()
                    click.echo(_render_status(current))
                if not watch:
                    return
                time.sleep(watch)
    except TetherError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        return


@main.command()
@click.option("--runs", type=int, default=200, show_default=True, help="Runs in the batch part.")
def demo(runs: int) -> None:
    """Start a hub and a runner, run the quickstart tasks, print results, stop."""
    from ._demo import run_demo

    sys.exit(run_demo(batch=runs))
