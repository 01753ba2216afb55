"""A real hub fed junk: generated WebSocket frames, generated HTTP bodies, and connections
that never finish a handshake. Each gets a clean 4xx or close code; the hub keeps serving."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from support import UNIT, Cluster
from tether import Client
from tether.protocol import SUBPROTOCOL, CloseCode, FunctionInfo, Hello, encode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One hub (0.5 s handshake timeout) and one real runner for the whole module."""
    cluster = Cluster(tmp_path_factory.mktemp("hub"))
    try:
        cluster.hub(TETHER_HANDSHAKE_TIMEOUT="0.5", TETHER_MAX_MESSAGE_BYTES="65536")
        cluster.runner("apps.jobs")
        yield cluster
    finally:
        cluster.close()


def still_serving(cluster: Cluster) -> None:
    with Client(cluster.url) as client:
        assert client.submit("apps.jobs.add", 1, 2).get(timeout=20 * UNIT) == 3


# One hub serves every example: the module-scoped fixture is deliberate.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLOSE_CODES = {int(c) for c in CloseCode}
HELLO = encode(Hello(runner_id="fuzz", host="h", pid=1, slots=1,
                     functions=(FunctionInfo(name="fuzz.f"),)))  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
message_types = st.sampled_from(
    ["hello", "heartbeat", "ack", "reject", "extend", "result", "draining", "welcome",
     "dispatch", "nope", ""]
)  # fmt: skip
objects = st.builds(
    lambda kind, fields: json.dumps({"type": kind, **fields}),
    message_types,
    st.dictionaries(st.sampled_from(["seq", "run_id", "attempt", "runs", "ok", "slots"]),
                    json_values, max_size=4),  # fmt: skip
)
frames = st.one_of(st.binary(max_size=200), st.text(max_size=200), objects)


@settings(FUZZ, max_examples=60)
@given(after_hello=st.booleans(), junk=st.lists(frames, min_size=1, max_size=4))
def test_generated_frames_get_a_clean_close_and_nobody_else_notices(
    live: Cluster, after_hello: bool, junk: list[bytes | str]
) -> None:
    url = live.url.replace("http://", "ws://") + "/v1/connect"
    with connect(url, subprotocols=[Subprotocol(SUBPROTOCOL)], open_timeout=5) as ws:
        sent = [HELLO] if after_hello else []
        try:
            for frame in [*sent, *junk]:
                ws.send(frame)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                ws.recv(timeout=deadline - time.monotonic())
        except TimeoutError:
            return  # every frame was acceptable: the connection is still open, which is fine
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            assert closed.rcvd.code in CLOSE_CODES | {1000}
    assert live.healthy()


def test_the_runner_endpoint_survived_the_fuzzing(live: Cluster) -> None:
    still_serving(live)


http_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={"function": json_values, "args": json_values, "kwargs": json_values,
                  "queue": json_values, "idempotency_key": json_values, "delay": json_values,
                  "extra": json_values},
    ).map(lambda v: json.dumps(v).encode()),
)  # fmt: skip


@settings(FUZZ, max_examples=150)
@given(body=http_bodies, batch=st.booleans())
def test_generated_api_bodies_get_a_4xx_never_a_500(
    live: Cluster, body: bytes, batch: bool
) -> None:
    path = "/v1/runs/batch" if batch else "/v1/runs"
    if batch:
        body = b'{"runs": [' + body + b"]}"
    with live.http() as http:
        response = http.post(path, content=body)
    assert response.status_code in (200, 201, 400, 404, 413), response.text
    if response.status_code >= 400:
        assert response.json()["error"]


@settings(FUZZ, max_examples=40)
@given(run_id=st.text(min_size=1, max_size=40), timeout=st.text(max_size=12))
def test_generated_reads_get_a_4xx_never_a_500(live: Cluster, run_id: str, timeout: str) -> None:
    run_id = urllib.parse.quote(run_id, safe="")
    with live.http() as http:
        for response in (
            http.get(f"/v1/runs/{run_id}"),
            http.get(f"/v1/runs/{run_id}/wait", params={"timeout": timeout}),
            http.post(f"/v1/runs/{run_id}/cancel"),
        ):
            assert response.status_code in (200, 400, 404, 405), response.text


def test_connections_that_never_send_a_request_are_dropped(live: Cluster) -> None:
    idle = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(300)]
    half = socket.create_connection(("127.0.0.1", live.port))
    half.sendall(b"GET /v1/runners HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    idle.append(half)
    try:
        for s in idle:
            s.settimeout(10 * UNIT)
        # Each is closed by the hub (recv returns b"") after the 0.5 s handshake timeout.
        assert all(s.recv(1) == b"" for s in idle)
        still_serving(live)
    finally:
        for s in idle:
            s.close()


def test_huge_bodies_are_refused_without_reading_them_whole(live: Cluster) -> None:
    with live.http() as http:
        response = http.post("/v1/runs", content=b"x" * 1_000_000)
    assert response.status_code == 413
    assert "exceeds" in response.json()["error"]


