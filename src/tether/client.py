"""Producer-side clients: submit runs to a hub and read their results, over httpx.

:class:`BaseClient` holds everything but the sending: request building, argument checks,
response interpretation. :class:`Client` and :class:`AsyncClient` only send (the httpx
pattern). httpx errors are translated here, where they enter: callers see
:class:`~tether.exceptions.HubUnavailable`, :class:`~tether.exceptions.HubError`,
:class:`~tether.exceptions.TaskError` and friends, never an httpx exception.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Iterable, Sequence
from typing import Any, Self

import httpx

from .app import DEFAULT_HUB
from .exceptions import (
    HubError,
    HubUnavailable,
    RunNotFound,
    TaskCancelled,
    TaskError,
    WaitTimeout,
)

__all__ = ["AsyncClient", "AsyncRunHandle", "Client", "RunHandle"]

_LONG_POLL = 30.0  # seconds per wait request; longer waits are several requests


def _check_json(function: str, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """TypeError naming the first argument that JSON cannot carry."""
    for where, value in [*((f"argument {i}", a) for i, a in enumerate(args)),
                         *((f"keyword argument {k!r}", v) for k, v in kwargs.items())]:  # fmt: skip
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{where} of {function} ({type(value).__name__}) cannot be sent as JSON: {exc}"
            ) from None


class BaseClient:
    def __init__(
        self,
        hub: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        ca: str | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.hub = (hub or os.environ.get("TETHER_HUB") or DEFAULT_HUB).rstrip("/")
        self.token = token if token is not None else os.environ.get("TETHER_TOKEN") or None
        self.timeout = timeout
        ca = ca or os.environ.get("TETHER_CA") or None
        # ``ca``: a CA bundle to trust for an https hub (a private CA, a self-signed hub).
        self.verify = ssl.create_default_context(cafile=ca) if ca else verify

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def _run_body(
        self,
        function: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        *,
        queue: str | None = None,
        delay: float | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        kwargs = kwargs or {}
        _check_json(function, args, kwargs)
        body: dict[str, Any] = {"function": function, "args": list(args), "kwargs": kwargs}
        if queue is not None:
            body["queue"] = queue
        if delay is not None:
            body["delay"] = delay
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return body

    def _answer(self, response: httpx.Response, *, run_id: str | None = None) -> Any:
        if response.status_code < 400:
            return response.json()
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        if response.status_code == 404 and run_id is not None:
            raise RunNotFound(404, message)
        raise HubError(response.status_code, message)

    def _wait_params(self, deadline: float | None) -> dict[str, str]:
        remaining = _LONG_POLL if deadline is None else max(0.0, deadline - time.monotonic())
        return {"timeout": f"{min(remaining, _LONG_POLL):.3f}"}

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _done(view: dict[str, Any]) -> bool:
        return view["state"] in ("succeeded", "failed", "cancelled")

    @staticmethod
    def _outcome(view: dict[str, Any]) -> Any:
        if view["state"] == "succeeded":
            return view.get("result")
        error = view.get("error") or {}
        cls = TaskCancelled if view["state"] == "cancelled" else TaskError
        raise cls(
            error.get("type", "Cancelled" if cls is TaskCancelled else "Error"),
            error.get("message", f"run {view['id']} was {view['state']}"),
            error.get("traceback", ""),
            run_id=view["id"],
        )


def _unavailable(hub: str, exc: httpx.HTTPError) -> HubUnavailable:
    return HubUnavailable(f"cannot reach the hub at {hub}: {exc}")


class Client(BaseClient):
    """A blocking client: ``Client().submit("tasks.add", 2, 3).get(timeout=10)``."""

    def __init__(self, hub: str | None = None, **options: Any) -> None:
        super().__init__(hub, **options)
        self._http = httpx.Client(
            base_url=self.hub, headers=self._headers(), timeout=self.timeout, verify=self.verify
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, run_id: str | None = None, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unavailable(self.hub, exc) from exc
        return self._answer(response, run_id=run_id)

    def submit(self, function: str, /, *args: Any, **kwargs: Any) -> RunHandle:
        """Submit ``function(*args, **kwargs)``; see :meth:`apply` for queue, delay, key."""
        return self.apply(function, args, kwargs)

    def apply(
        self,
        function: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        delay: float | None = None,
        idempotency_key: str | None = None,
    ) -> RunHandle:
        body = self._run_body(
            function, args, kwargs, queue=queue, delay=delay, idempotency_key=idempotency_key
        )
        answer = self._request("POST", "/v1/runs", json=body)
        return RunHandle(self, answer["id"])

    def submit_many(
        self, function: str, calls: Iterable[Sequence[Any]], *, queue: str | None = None
    ) -> list[RunHandle]:
        """Submit one run per argument tuple in ``calls``, in one request."""
        runs = [self._run_body(function, args, None, queue=queue) for args in calls]
        answer = self._request("POST", "/v1/runs/batch", json={"runs": runs})
        return [RunHandle(self, run_id) for run_id in answer["ids"]]

    def run(self, run_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/runs/{run_id}", run_id=run_id)  # type: ignore[no-any-return]

    def wait(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The run once finished; :class:`WaitTimeout` if ``timeout`` passes first."""
        deadline = self._deadline(timeout)
        while True:
            params = self._wait_params(deadline)
            view: dict[str, Any] = self._request(
                "GET",
                f"/v1/runs/{run_id}/wait",
                run_id=run_id,
                params=params,
                timeout=float(params["timeout"]) + self.timeout,
            )
            if self._done(view):
                return view
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"run {run_id} is still {view['state']} after {timeout}s")

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/runs/{run_id}/cancel", run_id=run_id)  # type: ignore[no-any-return]

    def runners(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/runners")["runners"]  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status")  # type: ignore[no-any-return]


class AsyncClient(BaseClient):
    """The same as :class:`Client`, over ``httpx.AsyncClient``."""

    def __init__(self, hub: str | None = None, **options: Any) -> None:
        super().__init__(hub, **options)
        self._http = httpx.AsyncClient(
            base_url=self.hub, headers=self._headers(), timeout=self.timeout, verify=self.verify
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, path: str, *, run_id: str | None = None, **kwargs: Any
    ) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unavailable(self.hub, exc) from exc
        return self._answer(response, run_id=run_id)

    async def submit(self, function: str, /, *args: Any, **kwargs: Any) -> AsyncRunHandle:
        return await self.apply(function, args, kwargs)

    async def apply(
        self,
        function: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        queue: str | None = None,
        delay: float | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncRunHandle:
        body = self._run_body(
            function, args, kwargs, queue=queue, delay=delay, idempotency_key=idempotency_key
        )
        answer = await self._request("POST", "/v1/runs", json=body)
        return AsyncRunHandle(self, answer["id"])

    async def submit_many(
        self, function: str, calls: Iterable[Sequence[Any]], *, queue: str | None = None
    ) -> list[AsyncRunHandle]:
        runs = [self._run_body(function, args, None, queue=queue) for args in calls]
        answer = await self._request("POST", "/v1/runs/batch", json={"runs": runs})
        return [AsyncRunHandle(self, run_id) for run_id in answer["ids"]]

    async def run(self, run_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/runs/{run_id}", run_id=run_id)  # type: ignore[no-any-return]

    async def wait(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = self._deadline(timeout)
        while True:
            params = self._wait_params(deadline)
            view: dict[str, Any] = await self._request(
                "GET",
                f"/v1/runs/{run_id}/wait",
                run_id=run_id,
                params=params,
                timeout=float(params["timeout"]) + self.timeout,
            )
            if self._done(view):
                return view
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"run {run_id} is still {view['state']} after {timeout}s")

    async def cancel(self, run_id: str) -> dict[str, Any]:
        return await self._request("POST", f"/v1/runs/{run_id}/cancel", run_id=run_id)  # type: ignore[no-any-return]

    async def runners(self) -> list[dict[str, Any]]:
        return (await self._request("GET", "/v1/runners"))["runners"]  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/status")  # type: ignore[no-any-return]


class RunHandle:
    """A submitted run. ``get()`` waits and returns the result or raises the task's error."""

    def __init__(self, client: Client, run_id: str) -> None:
        self.client = client
        self.id = run_id

    def __repr__(self) -> str:
        return f"<RunHandle {self.id}>"

    def status(self) -> dict[str, Any]:
        return self.client.run(self.id)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        return self.client.wait(self.id, timeout)

    def get(self, timeout: float | None = None) -> Any:
        return BaseClient._outcome(self.wait(timeout))

    def cancel(self) -> dict[str, Any]:
        return self.client.cancel(self.id)


class AsyncRunHandle:
    def __init__(self, client: AsyncClient, run_id: str) -> None:
        self.client = client
        self.id = run_id

    def __repr__(self) -> str:
        return f"<AsyncRunHandle {self.id}>"

    async def status(self) -> dict[str, Any]:
        return await self.client.run(self.id)

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.client.wait(self.id, timeout)

    async def get(self, timeout: float | None = None) -> Any:
        return BaseClient._outcome(await self.wait(timeout))

    async def cancel(self) -> dict[str, Any]:
        return await self.client.cancel(self.id)
