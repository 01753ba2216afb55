"""AsyncClient's submits against a real hub: submits made while others are in flight go out
together in one request, and each caller still gets its own run, or its own error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import tether.client
from support import free_port
from tether import AsyncClient, HubError, HubUnavailable
from tether.hub import Hub

pytestmark = pytest.mark.anyio


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[str]:
    async with Hub(port=0, data_dir=tmp_path).running() as url:
        yield url


class Counting(AsyncClient):
    """An AsyncClient that counts the requests it makes (and changes nothing else)."""

    def __init__(self, hub: str) -> None:
        super().__init__(hub)
        self.requests: list[str] = []

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        self.requests.append(f"{method} {path}")
        return await super()._request(method, path, **kwargs)


async def test_concurrent_submits_share_requests_and_each_gets_its_own_run(hub: str) -> None:
    async with Counting(hub) as client:
        handles = await asyncio.gather(
            *(client.apply(f"jobs.f{i}", (i,), queue="q") for i in range(100))
        )
        submits = len(client.requests)
        views = [await h.status() for h in handles]
    assert [v["function"] for v in views] == [f"jobs.f{i}" for i in range(100)]
    assert len({h.id for h in handles}) == 100
    assert {v["state"] for v in views} == {"queued"}
    # Two go out at once; each of the others waits for one of those and goes with the rest.
    assert submits <= 10, client.requests


async def test_a_refused_submit_fails_alone(hub: str) -> None:
    async with Counting(hub) as client:
        outcomes = await asyncio.gather(
            *(client.apply("nobody.has.this" if i == 7 else "jobs.f", (i,),
                           queue=None if i == 7 else "q") for i in range(20)),
            return_exceptions=True,
        )  # fmt: skip
        refused = outcomes.pop(7)
        assert isinstance(refused, HubError) and refused.status == 404
        assert "unknown function 'nobody.has.this'" in str(refused)
        assert all(not isinstance(o, BaseException) for o in outcomes), outcomes
        assert (await client.status())["runs"] == {"queued": 19}


async def test_submits_to_an_unreachable_hub_all_fail(hub: str) -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        outcomes = await asyncio.gather(
            *(client.apply("jobs.f", queue="q") for _ in range(10)), return_exceptions=True
        )
    assert all(isinstance(o, HubUnavailable) for o in outcomes), outcomes


async def test_a_submit_cancelled_while_it_waits_is_never_sent(hub: str) -> None:
    async with Counting(hub) as client:
        limit = tether.client._SUBMITS_IN_FLIGHT
        sent = [asyncio.create_task(client.apply("jobs.f", queue="q")) for _ in range(limit)]
        waiting = [asyncio.create_task(client.apply("jobs.f", queue="q")) for _ in range(3)]
        await asyncio.sleep(0)  # every task has started: the first ones are in flight
        assert len(client.requests) == limit
        for task in waiting:
            task.cancel()
        await asyncio.gather(*sent)
        assert all(task.cancelled() for task in waiting)
        assert (await client.status())["runs"] == {"queued": limit}
        assert client.requests == ["POST /v1/runs"] * limit + ["GET /v1/status"]
