"""The hub over real loopback sockets: its HTTP API, and its scheduler driven by light runners
that speak the real protocol (dispatch, fencing, leases, heartbeat timeouts, bad frames)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from lightrunner import LightRunner, acked, light_runner
from support import UNIT, apoll
from tether.hub import Hub
from tether.hub.scheduler import MAX_HOLD_PER_SLOT
from tether.protocol import (
    SUBPROTOCOL,
    Ack,
    Cancel,
    CloseCode,
    Dispatch,
    ErrorInfo,
    Extend,
    Extended,
    FunctionInfo,
    LeaseLost,
    Outcome,
    RejectDispatch,
    Result,
    ResultAck,
    RunRef,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[str]:
    server = Hub(port=0, data_dir=tmp_path, heartbeat_interval=0.05, heartbeat_timeout=0.5,
                 lease=1.0, handshake_timeout=0.5, max_message_bytes=64 * 1024)  # fmt: skip
    async with server.running() as url:
        yield url


@pytest.fixture
async def api(hub: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hub, timeout=10 * UNIT) as client:
        yield client


async def state(api: httpx.AsyncClient, run_id: str) -> dict[str, object]:
    response = await api.get(f"/v1/runs/{run_id}")
    assert response.status_code == 200
    return dict(response.json())


async def submit(
    api: httpx.AsyncClient, function: str = "t.f", *args: object, **body: object
) -> str:
    response = await api.post("/v1/runs", json={"function": function, "args": list(args), **body})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def heartbeats(api: httpx.AsyncClient, at_least: int) -> dict[str, float] | None:
    """The only runner's heartbeat record once it has ``at_least`` heartbeats, else None."""
    [view] = (await api.get("/v1/runners")).json()["runners"]
    return dict(view["heartbeat"]) if view["heartbeat"]["count"] >= at_least else None


# -- HTTP API --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "request body is not valid JSON"),
        (b"[1, 2]", 400, "run must be a JSON object"),
        (b'{"function": 3}', 400, "run.function must be a non-empty string"),
        (b'{"function": "t.f", "args": {}}', 400, "run.args must be a list"),
        (b'{"function": "t.f", "kwargs": []}', 400, "run.kwargs must be an object"),
        (b'{"function": "t.f", "delay": -1}', 400, "run.delay must be a finite number >= 0"),
        (b'{"function": "t.f", "delay": "soon"}', 400, "run.delay must be a number"),
        (b'{"function": "t.f", "priority": 1}', 400, "unknown field 'priority'"),
        (b'{"function": "nobody.has.this"}', 404, "unknown function 'nobody.has.this'"),
        (b'{"function": "t.f", "idempotency_key": ""}', 400, "run.idempotency_key must be"),
    ],
)
async def test_bad_submissions_get_a_4xx_naming_the_problem(
    api: httpx.AsyncClient, body: bytes, status: int, message: str
) -> None:
    response = await api.post("/v1/runs", content=body)
    assert response.status_code == status
    assert message in response.json()["error"]


async def test_unknown_function_is_accepted_for_a_named_queue(api: httpx.AsyncClient) -> None:
    run_id = await submit(api, "later.f", queue="batch")
    assert (await state(api, run_id))["state"] == "queued"


async def test_body_over_the_limit_is_refused(api: httpx.AsyncClient) -> None:
    response = await api.post("/v1/runs", content=b"[" + b"0," * 40_000 + b"0]")
    assert response.status_code == 413


async def test_a_run_whose_dispatch_would_not_fit_a_runner_is_refused(
    api: httpx.AsyncClient,
) -> None:
    # The hub's limit is 64 KiB, for request bodies and for the frames runners accept.
    before = (await api.get("/v1/status")).json()["runs"]
    near = {"function": "t.f", "queue": "q", "args": ["y" * (64 * 1024 - 100)]}
    refused = await api.post("/v1/runs", json=near)
    assert refused.status_code == 413
    assert refused.json()["error"].startswith("run would be a dispatch of 65,")
    assert "over the runners' message limit of 65,536 bytes" in refused.json()["error"]
    # 1e15 is re-encoded as 1000000000000000.0: 20 kB of them would be a 90 kB dispatch.
    short = b'{"runs": [{"function": "t.f", "queue": "q"}, {"function": "t.f", "queue": "q",'
    short += b' "args": [' + b",".join([b"1e15"] * 4_000) + b"]}]}"
    refused = await api.post("/v1/runs/batch", content=short)
    assert refused.status_code == 413
    assert refused.json()["error"].startswith("runs[1] would be a dispatch of")
    assert (await api.get("/v1/status")).json()["runs"] == before  # nothing was stored
    fits = {"function": "t.f", "queue": "q", "args": ["y" * (48 * 1024)]}
    assert (await api.post("/v1/runs", json=fits)).status_code == 201


async def test_idempotency_key_returns_the_first_run(api: httpx.AsyncClient) -> None:
    first = await api.post("/v1/runs", json={"function": "x", "queue": "q", "idempotency_key": "k"})
    again = await api.post("/v1/runs", json={"function": "x", "queue": "q", "idempotency_key": "k"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]


async def test_a_key_seen_again_finds_its_run_as_it_is(hub: str, api: httpx.AsyncClient) -> None:
    """A run found by its idempotency key is read after the running marks still in memory
    are written: dispatched, it is running, whatever the store held a moment before."""
    body = {"function": "t.f", "idempotency_key": "k"}
    async with light_runner(hub) as runner:
        first = await api.post("/v1/runs", json=body)
        await runner.recv_run()
        again = await api.post("/v1/runs", json=body)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json() == {"id": first.json()["id"], "state": "running"}


async def test_batch_is_validated_entry_by_entry(api: httpx.AsyncClient) -> None:
    bad = await api.post("/v1/runs/batch", json={"runs": [{"function": "x", "queue": "q"}, {}]})
    assert bad.status_code == 400
    assert "runs[1].function" in bad.json()["error"]
    good = await api.post("/v1/runs/batch", json={"runs": [{"function": "x", "queue": "q"}] * 3})
    assert good.status_code == 201
    assert len(set(good.json()["ids"])) == 3


async def test_reading_runs(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    missing = await api.get("/v1/runs/nope")
    assert missing.status_code == 404
    assert "nope" in missing.json()["error"]
    bad_wait = await api.get("/v1/runs/nope/wait", params={"timeout": "soon"})
    assert bad_wait.status_code == 400
    run_id = await submit(api, "x", queue="q")
    waited = await api.get(f"/v1/runs/{run_id}/wait", params={"timeout": "0.05"})
    assert waited.json()["state"] == "queued"
    cancelled = await api.post(f"/v1/runs/{run_id}/cancel")
    assert cancelled.json()["state"] == "cancelled"
    assert (await api.get("/v1/runners")).json() == {"runners": []}


# -- dispatch, results, fencing -------------------------------------------------------------


async def test_dispatch_result_and_long_poll(hub: str, api: httpx.AsyncClient) -> None:
    async with light_runner(hub) as runner:
        run_id = await submit(api, "t.f", 2, 3)
        dispatch = await runner.recv_run()
        assert (dispatch.run_id, dispatch.attempt, dispatch.args) == (run_id, 1, [2, 3])
        await runner.send(Ack(runs=(RunRef(run_id=run_id, attempt=1),)))
        assert (await state(api, run_id))["state"] == "running"
        async with anyio.create_task_group() as tg:
            waited: dict[str, object] = {}

            async def wait() -> None:
                response = await api.get(f"/v1/runs/{run_id}/wait", params={"timeout": "10"})
                waited.update(response.json())

            tg.start_soon(wait)
            await runner.result(run_id, 1, 5)
            assert await runner.recv() == acked(run_id, 1)
        assert waited["state"] == "succeeded"
        assert waited["result"] == 5
        [view] = (await api.get("/v1/runners")).json()["runners"]
        assert view["id"] == "light"
        assert view["heartbeat"]["count"] > 0
        assert view["heartbeat"]["interval_ms"] == 50


def stored_row(data_dir: Path, run_id: str) -> dict[str, object]:
    """A run as the store file holds it, read beside the hub (which writes marks lazily)."""
    db = sqlite3.connect(f"file:{data_dir / 'tether.db'}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return dict(row)
    finally:
        db.close()


async def test_a_dispatched_run_is_written_as_running_then_with_its_result(
    hub: str, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The running mark waits in memory a moment (scheduler.MARK_DELAY), then is written on its
    own; a run that finishes first gets it written with its result. Either way the store ends
    up with who ran which attempt, and when."""
    async with light_runner(hub) as runner:
        slow = await submit(api, "t.f")
        await runner.recv_run()

        async def marked() -> bool:
            return stored_row(tmp_path, slow)["state"] == "running"

        await apoll("the running mark to be written", marked)
        row = stored_row(tmp_path, slow)
        assert (row["runner_id"], row["attempt"]) == ("light", 1)
        assert row["started_at"] is not None
        quick = await submit(api, "t.f")
        await runner.recv_run()
        for run_id in (quick, slow):
            await runner.result(run_id, 1, run_id)
            assert await runner.recv() == acked(run_id, 1)
    for run_id in (quick, slow):
        row = stored_row(tmp_path, run_id)
        assert (row["state"], row["result"], row["attempt"]) == ("succeeded", f'"{run_id}"', 1)
        assert row["runner_id"] == "light"
        assert row["created_at"] <= row["started_at"] <= row["finished_at"]


async def until_acked(runner: LightRunner, refs: set[RunRef]) -> list[Dispatch]:
    """Read until every ref in ``refs`` is acknowledged; the dispatches that came meanwhile."""
    dispatches = []
    while refs:
        message = await runner.recv()
        if isinstance(message, ResultAck):
            refs -= set(message.runs)
        else:
            assert isinstance(message, Dispatch), message
            dispatches.append(message)
    return dispatches


async def test_outcomes_sent_together_are_recorded_and_acknowledged_together(
    hub: str, api: httpx.AsyncClient
) -> None:
    async with light_runner(hub, slots=3) as runner:
        ids = [await submit(api, "t.f", i) for i in range(3)]
        runs = [await runner.recv_run() for _ in ids]
        assert [run.run_id for run in runs] == ids
        fail = ErrorInfo(type="KeyError", message="k", retryable=False)
        outcomes = (
            Outcome(run_id=ids[0], attempt=1, ok=True, value="first"),
            Outcome(run_id=ids[1], attempt=1, ok=False, error=fail),
            Outcome(run_id=ids[2], attempt=7, ok=True, value="stale"),  # no such attempt
            Outcome(run_id=ids[2], attempt=1, ok=True, value=[3]),
        )
        await runner.send(Result(outcomes=outcomes))
        ack = await runner.recv()
        assert isinstance(ack, ResultAck)
        assert sorted(ack.runs, key=repr) == sorted(
            (RunRef(run_id=o.run_id, attempt=o.attempt) for o in outcomes), key=repr
        )
    views = [await state(api, run_id) for run_id in ids]
    assert [v["state"] for v in views] == ["succeeded", "failed", "succeeded"]
    assert (views[0]["result"], views[2]["result"]) == ("first", [3])
    assert views[1]["error"]["type"] == "KeyError"  # type: ignore[index]


async def test_runs_waiting_on_a_busy_runner_are_sent_in_batches(
    hub: str, api: httpx.AsyncClient
) -> None:
    # One slot. Until a step's duration is known the hub sends 2 runs per slot (one to run, one
    # to wait); once steps are known to be quick, up to MAX_HOLD_PER_SLOT, topped up only once
    # a quarter of those are done, each top-up in one message.
    hold = MAX_HOLD_PER_SLOT
    async with light_runner(hub, slots=1, hold_per_slot=hold) as runner:
        runs = [{"function": "t.f"}] * (2 * hold + 4)
        created = await api.post("/v1/runs/batch", json={"runs": runs})
        assert created.status_code == 201
        first = await runner.recv()
        assert isinstance(first, Dispatch) and len(first.runs) == 2
        held = list(first.runs)

        async def finish_next() -> list[Dispatch]:
            run = held.pop(0)
            await runner.result(run.run_id, run.attempt)  # duration 0: a quick step
            dispatches = await until_acked(runner, {RunRef(run_id=run.run_id, attempt=1)})
            for dispatch in dispatches:
                held.extend(dispatch.runs)
            return dispatches

        assert [len(d.runs) for d in await finish_next()] == [hold - 1]  # topped up to hold
        for _ in range(hold // 4 - 1):
            assert await finish_next() == []  # fewer than a quarter done: not yet
        assert [len(d.runs) for d in await finish_next()] == [hold // 4]  # back to hold
        while held:
            await finish_next()
        ids = created.json()["ids"]
    assert {(await state(api, run_id))["state"] for run_id in ids} == {"succeeded"}


async def test_a_runner_is_sent_no_more_runs_than_it_holds(
    hub: str, api: httpx.AsyncClient
) -> None:
    """A runner says in its hello how many runs it accepts per slot (one that does not, 8):
    quick steps or not, the hub never has more than that on it."""
    async with light_runner(hub, slots=1, hold_per_slot=4) as runner:
        created = await api.post("/v1/runs/batch", json={"runs": [{"function": "t.f"}] * 16})
        assert created.status_code == 201
        first = await runner.recv()
        assert isinstance(first, Dispatch)
        held = list(first.runs)
        while held:
            run = held.pop(0)
            await runner.result(run.run_id, run.attempt)  # a quick step
            for dispatch in await until_acked(runner, {RunRef(run_id=run.run_id, attempt=1)}):
                held.extend(dispatch.runs)
            assert len(held) <= 4
        ids = created.json()["ids"]
    assert {(await state(api, run_id))["state"] for run_id in ids} == {"succeeded"}


async def test_a_late_result_from_a_lost_lease_is_fenced_off(
    hub: str, api: httpx.AsyncClient
) -> None:
    async with light_runner(hub) as runner:
        run_id = await submit(api)
        first = await runner.recv_run()
        assert first.attempt == 1
        # Never extend: the 1 s lease expires, the hub takes the run back and dispatches it again.
        lost = await runner.recv(timeout=5 * UNIT)
        assert lost == LeaseLost(run_id=run_id, attempt=1, reason="lease expired")
        second = await runner.recv_run(timeout=5 * UNIT)
        assert second.attempt == 2
        await runner.result(run_id, 1, "stale")
        assert await runner.recv() == acked(run_id, 1)
        assert (await state(api, run_id))["state"] == "running"
        await runner.result(run_id, 2, "fresh")
        assert await runner.recv() == acked(run_id, 2)
    view = await state(api, run_id)
    assert (view["state"], view["attempt"], view["result"]) == ("succeeded", 2, "fresh")


async def test_extensions_keep_a_step_longer_than_its_lease(
    hub: str, api: httpx.AsyncClient
) -> None:
    async with light_runner(hub) as runner:
        run_id = await submit(api)
        assert isinstance(await runner.recv(), Dispatch)
        for _ in range(8):  # 2.4 s in all, against a 1 s lease
            await runner.send(Extend(runs=(RunRef(run_id=run_id, attempt=1),)))
            assert isinstance(await runner.recv(), Extended)
            await anyio.sleep(0.3)
        await runner.result(run_id, 1, "done")
        assert await runner.recv() == acked(run_id, 1)
    view = await state(api, run_id)
    assert (view["state"], view["attempt"]) == ("succeeded", 1)


async def test_a_silent_runner_is_declared_dead_and_its_run_moves(
    hub: str, api: httpx.AsyncClient
) -> None:
    # The hub dispatches to the runner with the most free slots: a.
    async with light_runner(hub, "a", slots=2) as a, light_runner(hub, "b", slots=1) as b:
        run_id = await submit(api)
        first = await a.recv_run()
        assert first.attempt == 1
        a.beating = False
        with pytest.raises(ConnectionClosed) as closed:
            await a.recv(timeout=5 * UNIT)
        assert (
            closed.value.rcvd is not None and closed.value.rcvd.code == CloseCode.HEARTBEAT_TIMEOUT
        )
        second = await b.recv_run(timeout=5 * UNIT)
        assert (second.run_id, second.attempt) == (run_id, 2)
        await b.result(run_id, 2, "ok")
        assert isinstance(await b.recv(), ResultAck)
        ids = [r["id"] for r in (await api.get("/v1/runners")).json()["runners"]]
        assert ids == ["b"]
    view = await state(api, run_id)
    assert view["errors"][0]["type"] == "tether.RunnerLost"


async def test_retries_then_failure_keep_every_error(hub: str, api: httpx.AsyncClient) -> None:
    info = FunctionInfo(name="t.f", retries=2, backoff=0.01)
    async with light_runner(hub, functions=[info]) as runner:
        run_id = await submit(api)
        for attempt in (1, 2, 3):
            dispatch = await runner.recv_run()
            assert dispatch.attempt == attempt
            await runner.result(run_id, attempt, error=ErrorInfo(type="E", message=f"no {attempt}"))
            assert isinstance(await runner.recv(), ResultAck)
    view = await state(api, run_id)
    assert view["state"] == "failed"
    assert view["error"]["message"] == "no 3"
    assert [e["message"] for e in view["errors"]] == ["no 1", "no 2", "no 3"]


async def test_non_retryable_error_fails_at_once(hub: str, api: httpx.AsyncClient) -> None:
    info = FunctionInfo(name="t.f", retries=5)
    async with light_runner(hub, functions=[info]) as runner:
        run_id = await submit(api)
        assert isinstance(await runner.recv(), Dispatch)
        await runner.result(
            run_id, 1, error=ErrorInfo(type="Reject", message="no", retryable=False)
        )
        assert isinstance(await runner.recv(), ResultAck)
    assert (await state(api, run_id))["state"] == "failed"


async def test_rejected_dispatch_goes_to_another_runner(hub: str, api: httpx.AsyncClient) -> None:
    async with light_runner(hub, "a", slots=3) as a:
        run_id = await submit(api)
        assert isinstance(await a.recv(), Dispatch)
        async with light_runner(hub, "b", slots=1) as b:
            await a.send(RejectDispatch(run_id=run_id, attempt=1, reason="draining"))
            again = await b.recv_run()
            assert again.attempt == 2


async def test_cancel_of_a_running_run_reaches_its_runner(hub: str, api: httpx.AsyncClient) -> None:
    async with light_runner(hub) as runner:
        run_id = await submit(api)
        assert isinstance(await runner.recv(), Dispatch)
        view = (await api.post(f"/v1/runs/{run_id}/cancel")).json()
        assert view["state"] == "cancelled"
        assert await runner.recv() == Cancel(run_id=run_id, attempt=1)
        await runner.result(run_id, 1, "too late")
        assert isinstance(await runner.recv(), ResultAck)
    assert (await state(api, run_id))["state"] == "cancelled"


# -- bad runners -------------------------------------------------------------------------------


async def closed_with(hub: str, *frames: bytes | str, headers: dict[str, str] | None = None) -> int:
    url = hub.replace("http://", "ws://") + "/v1/connect"
    async with connect(url, subprotocols=[Subprotocol(SUBPROTOCOL)], additional_headers=headers,
                       ping_interval=None, max_size=None) as ws:  # fmt: skip
        for frame in frames:
            await ws.send(frame)
        with pytest.raises(ConnectionClosed) as closed:
            with anyio.fail_after(5 * UNIT):
                while True:
                    await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ((b"\x00\xff junk",), CloseCode.INVALID_PAYLOAD),
        (("not json",), CloseCode.INVALID_PAYLOAD),
        (('{"type": "teleport"}',), CloseCode.PROTOCOL_ERROR),
        (
            ('{"type": "heartbeat", "seq": 1, "free_slots": 1, "in_flight": 0}',),
            CloseCode.PROTOCOL_ERROR,
        ),  # before hello
        (("x" * 70_000,), CloseCode.MESSAGE_TOO_BIG),
        ((), CloseCode.HANDSHAKE_TIMEOUT),  # hello never comes
    ],
)
async def test_bad_frames_get_a_meaningful_close_and_others_are_unaffected(
    hub: str, api: httpx.AsyncClient, frames: tuple[bytes | str, ...], code: int
) -> None:
    async with light_runner(hub) as good:
        assert await closed_with(hub, *frames) == code
        run_id = await submit(api)
        dispatch = await good.recv_run()
        assert dispatch.run_id == run_id


async def test_connection_without_the_subprotocol_is_refused(hub: str) -> None:
    url = hub.replace("http://", "ws://") + "/v1/connect"
    for offered, named in ((None, "none"), ([Subprotocol("tether.v1")], "tether.v1")):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, subprotocols=offered, ping_interval=None):
                pass
        # 426, not 403: a runner of another version can say so rather than blame its token.
        assert refused.value.response.status_code == 426
        said = json.loads(refused.value.response.body)["error"]
        assert said == f"this hub speaks tether.v2; offered: {named}"


async def test_metrics_after_real_runs_parse_as_prometheus_text(
    hub: str, api: httpx.AsyncClient
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    info = FunctionInfo(name="t.f", retries=1, backoff=0.01)
    async with light_runner(hub, functions=[info]) as runner:
        ok = await submit(api)
        await submit(api)  # fails
        acks = 0
        while acks < 3:  # ok succeeds; bad fails, is retried once, fails for good
            message = await runner.recv()
            if isinstance(message, ResultAck):
                acks += len(message.runs)
            elif isinstance(message, Dispatch):
                for run in message.runs:
                    error = None if run.run_id == ok else ErrorInfo(type="E", message="x")
                    await runner.result(run.run_id, run.attempt, 1, error=error)
        await apoll("two heartbeats (the gap histogram needs them)", lambda: heartbeats(api, 2))
        response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    f = (("function", "t.f"),)
    assert samples[("tether_runs_submitted_total", f)] == 2
    assert samples[("tether_runs_started_total", f)] == 3
    assert samples[("tether_runs_succeeded_total", f)] == 1
    assert samples[("tether_runs_retried_total", f)] == 1
    assert samples[("tether_runs_failed_total", f)] == 1
    assert samples[("tether_run_duration_seconds_count", f)] == 1
    assert samples[("tether_run_queue_wait_seconds_count", f)] == 3
    assert samples[("tether_runners_connected", ())] == 1
    assert samples[("tether_heartbeat_gap_seconds_count", ())] >= 1
    assert samples[("tether_queue_depth", (("queue", "default"),))] == 0


async def test_heartbeat_record_spans_a_reconnect(hub: str, api: httpx.AsyncClient) -> None:
    async with light_runner(hub, "r"):
        before = await apoll("three heartbeats", lambda: heartbeats(api, 3))
    await anyio.sleep(0.3)  # the time away is the scenario itself, not a wait for a condition
    async with light_runner(hub, "r"):
        after = await apoll("more heartbeats", lambda: heartbeats(api, before["count"] + 1))
    assert after["max_gap_ms"] >= 300  # the record continued: the gap spans the time away
    assert before["max_gap_ms"] < 300
