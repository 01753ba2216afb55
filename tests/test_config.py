"""Configuration: where each setting comes from, which config file is read, and how every
mistake is reported.

Settings are checked in process (``resolve_settings``, ``function_layers`` and ``tether config
show`` through click's ``CliRunner``). Anything that imports task modules (``tether worker
--check``) runs as a real subprocess, as a user would run it: importing task modules, numpy
among them, in the test process would leak into every other test.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from support import TESTS, Proc, env, free_port, poll, run_tether
from support import check_table as table
from tether.cli import main
from tether.config import (
    ConfigFile,
    ServerSettings,
    WorkerSettings,
    find_config_file,
    function_layers,
    load_config_file,
    resolve_settings,
)
from tether.exceptions import ConfigError


@pytest.fixture(autouse=True)
def _no_tether_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: no TETHER_* from the shell that started pytest."""
    for name in list(os.environ):
        if name.startswith("TETHER_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def tether(*args: str, cwd: Path = TESTS, **env_extra: str) -> subprocess.CompletedProcess[str]:
    """``tether ARGS...`` as a subprocess, with tests/ on its path (for ``apps.*``)."""
    return run_tether(*args, cwd=cwd, environ=env(**env_extra))


def check_json(*args: str, cwd: Path = TESTS, **env_extra: str) -> dict[str, Any]:
    done = tether("worker", *args, "--check", "--json", cwd=cwd, **env_extra)
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def show(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["config", "show", *args], env=env)


def show_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = show("--json", *args, env=env)
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def one_line_error(stderr: str) -> str:
    """The single ``Error: ...`` line a configuration mistake must produce."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


# -- precedence: defaults < file < TETHER_* < flags --------------------------------------------

SOURCES = ["default", "file", "env", "flag"]

# For each setting: its value from each source, as that source spells it.
SERVER = {
    "port": (7878, 7001, "7002", 7003),
    "heartbeat_interval": (1.0, 0.4, "0.3", 0.2),
}
WORKER = {
    "slots": (None, 3, "5", 7),
    "hub": ("http://127.0.0.1:7878", "http://file:1", "http://env:2", "http://flag:3"),
}


def layered(
    tmp_path: Path, section: str, values: dict[str, tuple[Any, ...]], top: int
) -> tuple[ConfigFile, dict[str, str], dict[str, Any]]:
    """The config file, env and flags that set ``values`` from every source up to ``top``."""
    lines = [f"[{section}]"] + [f"{k} = {json.dumps(v[1])}" for k, v in values.items()]
    path = write(tmp_path / "tether.toml", "\n".join(lines) + "\n")
    file = load_config_file(path if top >= 1 else None)
    environ = {f"TETHER_{k.upper()}": v[2] for k, v in values.items()} if top >= 2 else {}
    flags = {k: v[3] for k, v in values.items()} if top >= 3 else {}
    return file, environ, flags


def expected_source(top: int, name: str, path: Path) -> str:
    flag = "flag --" + name.replace("_", "-")
    return ["default", str(path), f"env TETHER_{name.upper()}", flag][top]


@pytest.mark.parametrize("top", range(4), ids=SOURCES)
def test_each_source_beats_the_one_below_for_server_settings(tmp_path: Path, top: int) -> None:
    file, environ, flags = layered(tmp_path, "server", SERVER, top)
    sourced = resolve_settings(ServerSettings, "server", file, env=environ, flags=flags)
    for name, by_source in SERVER.items():
        assert getattr(sourced.settings, name) == type(by_source[0])(by_source[top])
        assert sourced.sources[name] == expected_source(top, name, tmp_path / "tether.toml")
    assert sourced.sources["lease"] == "default"


@pytest.mark.parametrize("top", range(4), ids=SOURCES)
def test_each_source_beats_the_one_below_for_worker_settings(tmp_path: Path, top: int) -> None:
    file, environ, flags = layered(tmp_path, "worker", WORKER, top)
    sourced = resolve_settings(WorkerSettings, "worker", file, env=environ, flags=flags)
    slots = WORKER["slots"][top]
    assert sourced.settings.slots == (None if slots is None else int(slots))
    assert sourced.settings.hub == WORKER["hub"][top]
    for name in WORKER:
        assert sourced.sources[name] == expected_source(top, name, tmp_path / "tether.toml")


@pytest.mark.parametrize("top", range(3), ids=SOURCES[:3])
def test_config_show_reports_each_value_with_the_source_that_won(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, top: int
) -> None:
    monkeypatch.chdir(tmp_path)
    if top >= 1:
        write(
            tmp_path / "tether.toml",
            """\
            [server]
            port = 7001
            heartbeat_interval = 0.4

            [worker]
            slots = 3
            hub = "http://file:1"
            """,
        )
    environ = (
        {
            "TETHER_PORT": "7002",
            "TETHER_HEARTBEAT_INTERVAL": "0.3",
            "TETHER_SLOTS": "5",
            "TETHER_HUB": "http://env:2",
        }
        if top >= 2
        else {}
    )
    report = show_json(env=environ)
    path = str(tmp_path / "tether.toml")
    assert report["config_file"] == (path if top >= 1 else None)
    source = ["default", path, None][top]
    server, worker = report["server"], report["worker"]
    assert server["port"] == {
        "value": [7878, 7001, 7002][top],
        "source": source or "env TETHER_PORT",
    }
    assert server["heartbeat_interval"] == {
        "value": [1.0, 0.4, 0.3][top],
        "source": source or "env TETHER_HEARTBEAT_INTERVAL",
    }
    assert worker["slots"] == {"value": [None, 3, 5][top], "source": source or "env TETHER_SLOTS"}
    assert worker["hub"] == {
        "value": ["http://127.0.0.1:7878", "http://file:1", "http://env:2"][top],
        "source": source or "env TETHER_HUB",
    }
    assert server["lease"] == {"value": 30.0, "source": "default"}


def test_config_show_text_and_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "tether.toml", '[server]\nport = 7001\ntoken = "s3cret-file"\n')
    result = show(env={"TETHER_SLOTS": "5", "TETHER_RUNNER_TOKEN": "s3cret-env"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"# config file: {tmp_path / 'tether.toml'}"
    assert re.search(
        rf"^port = 7001 +# {re.escape(str(tmp_path))}/tether.toml$", result.stdout, re.M
    )
    assert re.search(r"^slots = 5 +# env TETHER_SLOTS$", result.stdout, re.M)
    assert re.search(r'^runner_token = "\*\*\*" +# env TETHER_RUNNER_TOKEN$', result.stdout, re.M)
    assert "s3cret" not in result.stdout


@pytest.mark.slow
def test_server_flags_beat_env_beat_file_in_a_real_hub(tmp_path: Path) -> None:
    """``tether server`` itself: the port from the flag, the heartbeat from the environment,
    the heartbeat timeout and data dir from the file."""
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    config = write(
        tmp_path / "hub.toml",
        f"""\
        [server]
        port = {file_port}
        heartbeat_interval = 0.4
        heartbeat_timeout = 3.0
        data_dir = "{tmp_path / "data"}"
        """,
    )
    hub = Proc(
        "hub",
        ["server", "--config", str(config), "--port", str(flag_port)],
        tmp_path,
        TETHER_PORT=str(env_port),
        TETHER_HEARTBEAT_INTERVAL="0.2",
    )
    url = f"http://127.0.0.1:{flag_port}"
    runner = None
    try:
        poll("the hub to serve on the flag's port", lambda: not hub.alive() or healthy(url))
        assert hub.alive(), hub.output()
        assert not healthy(f"http://127.0.0.1:{env_port}")
        assert not healthy(f"http://127.0.0.1:{file_port}")
        assert (tmp_path / "data").is_dir()
        runner = Proc("runner", ["worker", "apps.jobs", "--hub", url, "--slots", "1"], tmp_path)
        [seen] = poll("the runner to connect", lambda: runners(url))
        assert seen["heartbeat"]["interval_ms"] == 200
    finally:
        for proc in (runner, hub):
            if proc is not None:
                proc.kill()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def runners(url: str) -> list[dict[str, Any]]:
    try:
        return list(httpx.get(f"{url}/v1/runners", timeout=2).json()["runners"])
    except httpx.HTTPError:
        return []


@pytest.mark.parametrize("top", range(1, 4), ids=SOURCES[1:])
def test_worker_check_shows_file_env_and_flag_worker_settings(tmp_path: Path, top: int) -> None:
    write(tmp_path / "tether.toml", '[worker]\nslots = 3\nhub = "http://file:1"\n')
    environ = {"TETHER_SLOTS": "5", "TETHER_HUB": "http://env:2"} if top >= 2 else {}
    flags = ["--slots", "7", "--hub", "http://flag:3"] if top >= 3 else []
    report = check_json("apps.jobs", *flags, cwd=tmp_path, **environ)
    settings = report["settings"]
    path = str(tmp_path / "tether.toml")
    assert report["config_file"] == path
    assert settings["slots"] == {
        "value": [None, 3, 5, 7][top],
        "source": [None, path, "env TETHER_SLOTS", "flag --slots"][top],
    }
    assert settings["hub"] == {
        "value": [None, "http://file:1", "http://env:2", "http://flag:3"][top],
        "source": [None, path, "env TETHER_HUB", "flag --hub"][top],
    }
    assert settings["modules"] == {"value": ["apps.jobs"], "source": "arguments"}


# -- per-function options: decorator < [functions."name"] < TETHER_FUNCTIONS < --set -----------

FLAKY_FILE = """\
[functions."apps.jobs.flaky"]
timeout = 10
retries = 4
backoff = 0.5
queue = "file-q"
"""
FLAKY_ENV = json.dumps({"apps.jobs.flaky": {"timeout": 20, "retries": 5}})
FLAKY_SET = "apps.jobs.flaky.timeout=30"


def test_function_options_each_source_beats_the_one_below(tmp_path: Path) -> None:
    path = write(tmp_path / "tether.toml", FLAKY_FILE)
    report = check_json("apps.jobs", "--set", FLAKY_SET, cwd=tmp_path, TETHER_FUNCTIONS=FLAKY_ENV)
    assert report["ok"] is True
    [flaky] = [fn for fn in report["functions"] if fn["name"] == "apps.jobs.flaky"]
    assert flaky["options"] == {
        "isolation": {"value": "process", "source": "decorator"},
        "concurrency": {"value": None, "source": "decorator"},
        "timeout": {"value": 30, "source": "flag --set"},
        "retries": {"value": 5, "source": "env TETHER_FUNCTIONS"},
        "backoff": {"value": 0.5, "source": str(path)},
        "queue": {"value": "file-q", "source": str(path)},
        "max_runs": {"value": None, "source": "decorator"},
        "fresh": {"value": False, "source": "decorator"},
    }
    assert (flaky["isolation"], flaky["configured_isolation"], flaky["reason"]) == (
        "process",
        "process",
        "configured",
    )
    untouched = {fn["name"]: fn for fn in report["functions"]}["apps.jobs.boom"]
    assert {item["source"] for item in untouched["options"].values()} == {"decorator"}


def test_check_table_marks_every_value_that_is_not_the_decorators(tmp_path: Path) -> None:
    path = write(
        tmp_path / "tether.toml",
        FLAKY_FILE + '\n[functions."apps.jobs.add"]\nisolation = "process"\n',
    )
    done = tether(
        "worker",
        "apps.jobs",
        "--check",
        "--set",
        FLAKY_SET,
        "--set",
        "apps.jobs.boom.fresh=true",
        cwd=tmp_path,
        TETHER_FUNCTIONS=FLAKY_ENV,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.splitlines()[0] == f"config file: {path}"
    rows = table(out)
    assert list(rows) == sorted(rows)
    assert {"apps.jobs.add", "apps.jobs.boom", "apps.jobs.flaky", "apps.jobs.wait_for"} <= set(rows)
    assert list(rows["apps.jobs.add"]) == [
        "function",
        "isolation",
        "concurrency",
        "timeout",
        "retries",
        "backoff",
        "queue",
        "max_runs",
        "fresh",
    ]
    assert rows["apps.jobs.flaky"] == {
        "function": "apps.jobs.flaky",
        "isolation": "process",
        "concurrency": "-",
        "timeout": "30 [flag]",
        "retries": "5 [env]",
        "backoff": "0.5 [file]",
        "queue": "file-q [file]",
        "max_runs": "-",
        "fresh": "false",
    }
    assert rows["apps.jobs.add"]["isolation"] == "process [file]"
    assert rows["apps.jobs.boom"]["fresh"] == "true [flag]"
    assert rows["apps.jobs.wait_for"]["isolation"] == "subinterpreter"
    assert rows["apps.jobs.hold_first"]["retries"] == "0"
    assert f"  apps.jobs.add: configured 'process' ({path}); configured" in out
    assert "  apps.jobs.hold_first: configured 'subinterpreter' (decorator); configured" in out
    assert re.search(r"^  slots +null +default$", out, re.M)
    assert out.rstrip().endswith("ok: every function loads and can run as configured")


def test_check_json_structure_and_a_masked_token() -> None:
    report = check_json("apps.jobs", TETHER_TOKEN="s3cret")
    assert set(report) == {"ok", "config_file", "settings", "functions"}
    assert report["ok"] is True and report["config_file"] is None
    assert set(report["settings"]) == {
        "modules",
        "hub",
        "token",
        "slots",
        "runner_id",
        "drain_grace",
        "max_abandoned",
        "ca",
        "log_level",
        "log_format",
    }
    assert all(set(item) == {"value", "source"} for item in report["settings"].values())
    assert report["settings"]["token"] == {"value": "***", "source": "env TETHER_TOKEN"}
    assert "s3cret" not in json.dumps(report)
    by_name = {fn["name"]: fn for fn in report["functions"]}
    assert [fn["name"] for fn in report["functions"]] == sorted(by_name)
    for fn in report["functions"]:
        assert set(fn) == {"name", "isolation", "configured_isolation", "reason", "options"}
        assert fn["isolation"] in ("subinterpreter", "process")
        assert list(fn["options"]) == [
            "isolation",
            "concurrency",
            "timeout",
            "retries",
            "backoff",
            "queue",
            "max_runs",
            "fresh",
        ]
    add = by_name["apps.jobs.add"]
    assert (add["isolation"], add["configured_isolation"]) == ("subinterpreter", "auto")
    assert add["reason"] == "auto: apps.jobs loads in an isolated subinterpreter"
    assert by_name["apps.jobs.flaky"]["options"]["retries"] == {"value": 3, "source": "decorator"}


def test_check_connects_to_nothing() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        done = tether("worker", "apps.jobs", "--check", "--hub", f"http://127.0.0.1:{port}")
        assert done.returncode == 0, done.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody even opened a TCP connection
    closed = free_port()
    done = tether("worker", "apps.jobs", "--check", "--json", "--hub", f"http://127.0.0.1:{closed}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["settings"]["hub"]["value"] == f"http://127.0.0.1:{closed}"


# -- isolation that cannot work is refused before anything starts -------------------------------


def test_subinterpreter_function_over_numpy_is_refused_by_check_and_by_the_worker() -> None:
    done = tether("worker", "apps.numeric", "--check")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    message = done.stderr
    assert message.startswith(
        "Error: function apps.numeric.mean is configured with isolation='subinterpreter'"
    )
    assert re.search(r"extension module numpy\.[\w.]+ refused", message)
    assert "does not support loading in subinterpreters" in message
    assert "isolation='process'" in message
    assert '[functions."apps.numeric.mean"]' in message

    as_json = tether("worker", "apps.numeric", "--check", "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert "apps.numeric.mean" in report["error"] and "isolation='process'" in report["error"]

    # The worker itself refuses too, before it tries to connect (nothing listens there).
    serving = tether("worker", "apps.numeric", "--hub", f"http://127.0.0.1:{free_port()}")
    assert serving.returncode == 1
    assert "apps.numeric.mean" in serving.stderr
    assert "connection refused" not in serving.stderr.lower()


def test_process_override_fixes_it_and_auto_numpy_resolves_to_process() -> None:
    report = check_json(
        "apps.numeric", "apps.numeric_auto", "--set", "apps.numeric.mean.isolation=process"
    )
    by_name = {fn["name"]: fn for fn in report["functions"]}
    mean, norm = by_name["apps.numeric.mean"], by_name["apps.numeric_auto.norm"]
    assert (mean["isolation"], mean["configured_isolation"], mean["reason"]) == (
        "process",
        "process",
        "configured",
    )
    assert mean["options"]["isolation"] == {"value": "process", "source": "flag --set"}
    assert (norm["isolation"], norm["configured_isolation"]) == ("process", "auto")
    assert norm["reason"].startswith(
        "auto: apps.numeric_auto cannot load in an isolated subinterpreter (ImportError: module"
        " numpy."
    )


# -- which file ------------------------------------------------------------------------------


def test_config_flag_beats_tether_toml_beats_pyproject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    pyproject = write(
        project / "pyproject.toml",
        """\
        [project]
        name = "app"

        [tool.tether.server]
        port = 7101
        """,
    )
    cwd = project / "src" / "app"  # the nearest pyproject.toml is two folders up
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    assert find_config_file() == pyproject
    report = show_json()
    assert report["config_file"] == str(pyproject)
    assert report["server"]["port"] == {"value": 7101, "source": str(pyproject)}

    local = write(cwd / "tether.toml", "[server]\nport = 7102\n")
    assert find_config_file() == local
    assert show_json()["server"]["port"] == {"value": 7102, "source": str(local)}

    explicit = write(tmp_path / "elsewhere.toml", "[server]\nport = 7103\n")
    assert find_config_file(explicit) == explicit
    report = show_json("--config", str(explicit))
    assert report["server"]["port"] == {"value": 7103, "source": str(explicit)}


def test_the_nearest_pyproject_decides_and_no_file_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "pyproject.toml", "[tool.tether.server]\nport = 7101\n")
    inner = tmp_path / "inner"
    write(inner / "pyproject.toml", '[project]\nname = "inner"\n')
    monkeypatch.chdir(inner)
    assert find_config_file() is None  # the inner project has no [tool.tether]: defaults
    assert show_json()["server"]["port"] == {"value": 7878, "source": "default"}


def test_pyproject_errors_name_the_tool_tether_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "pyproject.toml", "[tool.tether.server]\nprot = 7101\n")
    monkeypatch.chdir(tmp_path)
    result = show()
    assert result.exit_code == 2
    assert one_line_error(result.stderr).startswith(
        "Error: pyproject.toml: [tool.tether.server]: unknown key 'prot'; expected one of"
    )


# -- every mistake: one line naming the file, the key and what was expected; exit 2 ------------


@pytest.mark.parametrize(
    ("toml", "environ", "message"),
    [
        pytest.param(
            "[sever]\nport = 1\n",
            {},
            "tether.toml: unknown section [sever]; expected server, worker or functions",
            id="unknown-section",
        ),
        pytest.param(
            "[server]\nprot = 7001\n",
            {},
            "tether.toml: [server]: unknown key 'prot'; expected one of data_dir, fsync,",
            id="unknown-key",
        ),
        pytest.param(
            '[server]\nport = "abc"\n',
            {},
            "tether.toml: [server]: port must be an integer from 0 to 65535, got 'abc'",
            id="port-not-int",
        ),
        pytest.param(
            "[server]\nport = 70000\n",
            {},
            "tether.toml: [server]: port must be an integer from 0 to 65535, got 70000",
            id="port-range",
        ),
        pytest.param(
            "[server]\nheartbeat_interval = 0\n",
            {},
            "tether.toml: [server]: heartbeat_interval must be a number of seconds > 0, got 0",
            id="interval-zero",
        ),
        pytest.param(
            '[server]\nlog_format = "yaml"\n',
            {},
            "tether.toml: [server]: log_format must be one of 'text', 'json', got 'yaml'",
            id="log-format",
        ),
        pytest.param(
            "[worker]\nslots = 0\n",
            {},
            "tether.toml: [worker]: slots must be an integer >= 1, got 0",
            id="slots-zero",
        ),
        pytest.param(
            '[worker]\nmodules = "app.tasks"\n',
            {},
            "tether.toml: [worker]: modules must be a list of strings, got 'app.tasks'",
            id="modules-not-list",
        ),
        pytest.param(
            "[server]\nport = 7001\n",
            {"TETHER_PORT": "abc"},
            "environment variable TETHER_PORT: expected an integer from 0 to 65535, got 'abc'",
            id="env-port",
        ),
        pytest.param(
            "",
            {"TETHER_FSYNC": "maybe"},
            "environment variable TETHER_FSYNC: expected true or false, got 'maybe'",
            id="env-bool",
        ),
        pytest.param(
            "",
            {"TETHER_LOG_LEVEL": "verbose"},
            "environment variable TETHER_LOG_LEVEL: expected one of 'debug', 'info', 'warning',",
            id="env-log-level",
        ),
        pytest.param(
            "",
            {"TETHER_FUNCTIONS": "{apps.jobs.add: 1}"},
            "environment variable TETHER_FUNCTIONS: not JSON: Expecting property name",
            id="env-functions-json",
        ),
        pytest.param(
            "",
            {"TETHER_FUNCTIONS": '["apps.jobs.add"]'},
            "environment variable TETHER_FUNCTIONS: expected a JSON object of",
            id="env-functions-shape",
        ),
        pytest.param(
            "",
            {"TETHER_FUNCTIONS": '{"apps.jobs.add": {"timeout": -1}}'},
            'env TETHER_FUNCTIONS: [functions."apps.jobs.add"]: timeout must be a number of'
            " seconds > 0, got -1",
            id="env-functions-value",
        ),
        pytest.param(
            '[functions."apps.jobs.add"]\nisolation = "thread"\n',
            {},
            'tether.toml: [functions."apps.jobs.add"]: isolation must be one of'
            " 'subinterpreter', 'process', 'auto', got 'thread'",
            id="isolation-thread",
        ),
        pytest.param(
            '[functions."apps.jobs.add"]\nisolation = "subinterpreter"\nfresh = true\n',
            {},
            "tether.toml: [functions.\"apps.jobs.add\"]: fresh=True needs isolation='process'",
            id="fresh-subinterpreter",
        ),
        pytest.param(
            '[functions."apps.jobs.add"]\ntimout = 5\n',
            {},
            "tether.toml: [functions.\"apps.jobs.add\"]: unknown option 'timout'; expected one of"
            " isolation, concurrency, timeout,",
            id="unknown-option",
        ),
        pytest.param(
            '[functions."apps.jobs.add"]\nmodule = "os"\n',
            {},
            "tether.toml: [functions.\"apps.jobs.add\"]: unknown option 'module'",
            id="identity-key",
        ),
        pytest.param(
            '[functions]\n"apps.jobs.add" = 3\n',
            {},
            'tether.toml: [functions."apps.jobs.add"] must be a table of options',
            id="function-not-table",
        ),
        pytest.param("[server\n", {}, "tether.toml: not valid TOML", id="bad-toml"),
    ],
)
def test_config_mistakes_are_one_line_naming_file_key_and_expectation(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toml: str,
    environ: dict[str, str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "tether.toml", toml)
    result = show(env=environ)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert message in one_line_error(result.stderr)


def test_a_missing_config_file_is_named() -> None:
    result = show("--config", "/nonexistent/tether.toml")
    assert result.exit_code == 2
    assert one_line_error(result.stderr) == "Error: --config /nonexistent/tether.toml: no such file"


def test_flags_are_checked_like_every_other_source() -> None:
    with pytest.raises(ConfigError, match=r"^--port: expected an integer from 0 to 65535, got -1$"):
        resolve_settings(
            ServerSettings, "server", load_config_file(None), env={}, flags={"port": -1}
        )
    with pytest.raises(ConfigError, match=r"^--log-level: expected one of 'debug', 'info',"):
        resolve_settings(
            WorkerSettings, "worker", load_config_file(None), env={}, flags={"log_level": "verbose"}
        )
    sourced = resolve_settings(
        WorkerSettings,
        "worker",
        load_config_file(None),
        env={"TETHER_LOG_LEVEL": "DEBUG", "TETHER_LOG_FORMAT": "JSON"},
    )
    assert (sourced.settings.log_level, sourced.settings.log_format) == ("debug", "json")


def test_server_with_a_bad_log_level_exits_2_without_a_traceback(tmp_path: Path) -> None:
    done = tether("server", "--log-level", "verbose", "--port", str(free_port()), cwd=tmp_path)
    assert done.returncode == 2
    assert one_line_error(done.stderr).startswith("Error: --log-level: expected one of 'debug'")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["apps.jobs.add.timeout"],
            "--set 'apps.jobs.add.timeout': expected FUNCTION.OPTION=VALUE",
        ),
        (["timeout=5"], "--set 'timeout=5': expected FUNCTION.OPTION=VALUE"),
        (["apps.jobs.add.=5"], "--set 'apps.jobs.add.=5': expected FUNCTION.OPTION=VALUE"),
        (
            ["apps.jobs.add.timeout=soon"],
            'flag --set: [functions."apps.jobs.add"]: timeout must be a number of seconds > 0,'
            " got 'soon'",
        ),
        (
            ["apps.jobs.add.colour=red"],
            "flag --set: [functions.\"apps.jobs.add\"]: unknown option 'colour'",
        ),
        (
            ["apps.jobs.add.isolation=thread"],
            'flag --set: [functions."apps.jobs.add"]: isolation must be one of',
        ),
        (
            ["apps.jobs.add.isolation=subinterpreter", "apps.jobs.add.fresh=true"],
            "flag --set: [functions.\"apps.jobs.add\"]: fresh=True needs isolation='process'",
        ),
    ],
)
def test_malformed_set_is_refused(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        function_layers(load_config_file(None), env={}, sets=sets)
    assert str(caught.value) == message or str(caught.value).startswith(message)


def test_set_values_are_json_except_for_names() -> None:
    sets = [
        "f.g.timeout=2.5",
        "f.g.retries=3",
        "f.g.fresh=true",
        "f.g.max_runs=null",
        "f.g.queue=2024",
        "f.g.isolation=process",
    ]
    [(label, layer)] = function_layers(load_config_file(None), env={}, sets=sets)
    assert label == "flag --set"
    assert layer == {
        "f.g": {
            "timeout": 2.5,
            "retries": 3,
            "fresh": True,
            "max_runs": None,
            "queue": "2024",
            "isolation": "process",
        }
    }


def test_worker_config_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "tether.toml", '[functions."apps.jobs.nope"]\ntimeout = 5\n')
    done = tether("worker", "apps.jobs", "--check", cwd=tmp_path)
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert line.startswith(
        f'Error: {path}: [functions."apps.jobs.nope"]: no loaded module'
        " defines a task named 'apps.jobs.nope' (loaded: apps.jobs.add,"
    )

    as_json = tether("worker", "apps.jobs", "--check", "--json", cwd=tmp_path)
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout) == {"ok": False, "error": line.removeprefix("Error: ")}

    malformed = tether("worker", "apps.jobs", "--check", "--set", "apps.jobs.add.timeout")
    assert malformed.returncode == 2
    assert one_line_error(malformed.stderr) == (
        "Error: --set 'apps.jobs.add.timeout': expected FUNCTION.OPTION=VALUE"
    )

    env_unknown = tether(
        "worker", "apps.jobs", "--check", TETHER_FUNCTIONS='{"apps.jobs.gone": {"retries": 1}}'
    )
    assert env_unknown.returncode == 2
    assert one_line_error(env_unknown.stderr).startswith(
        'Error: env TETHER_FUNCTIONS: [functions."apps.jobs.gone"]: no loaded module defines'
    )


def test_fresh_from_one_layer_with_subinterpreter_from_the_decorator_is_refused() -> None:
    done = tether("worker", "apps.jobs", "--check", "--set", "apps.jobs.wait_for.fresh=true")
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert "apps.jobs.wait_for" in line and "fresh=True needs isolation='process'" in line


def test_fresh_conflict_across_layers_names_the_layer() -> None:
    done = tether("worker", "apps.jobs", "--check", "--set", "apps.jobs.wait_for.fresh=true")
    assert done.returncode == 2
    assert "flag --set" in done.stderr
    assert "fresh=True needs isolation='process'" in done.stderr


def test_auto_with_fresh_resolves_to_process() -> None:
    done = tether("worker", "apps.jobs", "--check", "--json", "--set", "apps.jobs.add.fresh=true")
    assert done.returncode == 0, done.stderr
    [add] = [f for f in json.loads(done.stdout)["functions"] if f["name"] == "apps.jobs.add"]
    assert (add["isolation"], add["configured_isolation"]) == ("process", "auto")
    assert "fresh=True" in add["reason"]
