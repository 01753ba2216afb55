"""Tokens and TLS: nobody gets in without a token, and https/wss work end to end."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from support import UNIT, Cluster
from tether import AsyncClient, ConfigError, HubError, HubUnavailable
from tether.hub import Hub
from tether.protocol import SUBPROTOCOL


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    yield str(cert_path), str(key_path), str(ca_path)


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[str]:
    hub = Hub(port=0, data_dir=tmp_path, token="producer-secret", runner_token="runner-secret")
    async with hub.running() as url:
        yield url


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def runner_connects(url: str, headers: dict[str, str], ssl_context: object = None) -> bool:
    ws_url = url.replace("http", "ws", 1) + "/v1/connect"
    try:
        async with connect(ws_url, subprotocols=[Subprotocol(SUBPROTOCOL)],
                           additional_headers=headers, ssl=ssl_context):  # fmt: skip
            return True
    except InvalidStatus as exc:
        assert exc.response.status_code == 403
        return False


@pytest.mark.anyio
async def test_every_api_call_and_runner_needs_a_token_but_healthz(guarded: str) -> None:
    async with httpx.AsyncClient(base_url=guarded) as api:
        assert (await api.get("/healthz")).status_code == 200
        body = {"function": "x", "queue": "q"}
        for headers in ({}, bearer("wrong"), bearer("runner-secret"), {"authorization": "Basic x"}):
            for method, path in (("POST", "/v1/runs"), ("GET", "/v1/runners"),
                                 ("GET", "/v1/runs/x"), ("GET", "/metrics")):  # fmt: skip
                response = await api.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (headers, path)
                assert "token" in response.json()["error"]
        ok = await api.post("/v1/runs", json=body, headers=bearer("producer-secret"))
        assert ok.status_code == 201
    assert not await runner_connects(guarded, {})
    assert not await runner_connects(guarded, bearer("wrong"))
    assert await runner_connects(guarded, bearer("runner-secret"))
    assert await runner_connects(guarded, bearer("producer-secret"))


@pytest.mark.anyio
async def test_client_takes_the_token_from_the_environment(
    guarded: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncClient(guarded) as anonymous:
        with pytest.raises(HubError) as refused:
            await anonymous.runners()
    assert refused.value.status == 401
    monkeypatch.setenv("TETHER_TOKEN", "producer-secret")
    async with AsyncClient(guarded) as client:
        assert await client.runners() == []


def test_binding_beyond_loopback_without_a_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0 without a token"):
        Hub(host="0.0.0.0", data_dir=tmp_path)
    Hub(host="0.0.0.0", data_dir=tmp_path, token="t")  # with one, it may


@pytest.mark.anyio
async def test_tls_for_the_api_and_the_runner_socket(
    tmp_path: Path, tls_files: tuple[str, str, str]
) -> None:
    cert, key, ca_path = tls_files
    hub = Hub(port=0, data_dir=tmp_path, tls_cert=cert, tls_key=key, token="t")
    async with hub.running() as url:
        assert url.startswith("https://")
        async with AsyncClient(url, token="t", ca=ca_path) as client:
            assert await client.runners() == []
        async with AsyncClient(url, token="t") as unverified:
            with pytest.raises(HubUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await unverified.runners()
        context = ssl.create_default_context(cafile=ca_path)
        assert await runner_connects(url, bearer("t"), context)


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        Hub(data_dir=tmp_path, tls_cert=str(tmp_path / "cert.pem"))


@pytest.mark.slow
def test_worker_and_cli_over_tls_with_tokens(
    cluster: Cluster, tls_files: tuple[str, str, str]
) -> None:
    cert, key, ca_path = tls_files
    cluster.url = cluster.url.replace("http://", "https://")
    cluster.ca, cluster.token = ca_path, "p"
    cluster.hub("--tls-cert", cert, "--tls-key", key, "--token", "p", "--runner-token", "r",
                TETHER_CA=ca_path, TETHER_TOKEN="p")  # fmt: skip
    wrong = cluster.runner("apps.jobs", wait=False, extra=["--ca", ca_path, "--token", "nope"])
    assert wrong.wait() == 2
    assert "refused our token" in wrong.output()
    cluster.runner("apps.jobs", extra=["--ca", ca_path], TETHER_TOKEN="r")
    done = cluster.cli("submit", "apps.jobs.add", "2", "3", "--wait", "--ca", ca_path,
                       "--token", "p", timeout=30 * UNIT)  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "5"), done.stderr
