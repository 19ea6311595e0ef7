"""The SDK over REST (httpx): `Client` and `AsyncClient`."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

import httpx
import orjson

from modelmora.client import ops
from modelmora.client.api import AsyncApi, SyncApi
from modelmora.client.credentials import PathLike, bearer, resolve_api_key, rest_verify
from modelmora.client.errors import ApiError, TransportError, from_body
from modelmora.client.ops import Op, RestCall
from modelmora.client.retry import RetryPolicy

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"


def _error(response: httpx.Response) -> ApiError:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or "error_code" not in body:
        return ApiError(None, response.text[:500], http_status=response.status_code)
    return from_body(body, response.status_code, response.headers.get("retry-after"))


def _decode(call: RestCall, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error(response)
    return call.convert(orjson.loads(response.content))


def _stream_request(item: dict[str, Any]) -> tuple[str, Op]:
    fields = {k: v for k, v in item.items() if k not in ("request_id", "model", "input_data", "parameters")}
    return str(item.get("request_id", "")), ops.infer(
        item["model"], item["input_data"], item.get("parameters"), **fields
    )


def _sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def _event(name: str, raw: str) -> dict[str, Any]:
    data = orjson.loads(raw)
    if name == "error":
        raise from_body(data, 200, None)
    if name == "done":
        data = ops.with_numpy(data)
    return {"event": name, "data": data}


class Client(SyncApi):
    """ModelMora over REST, blocking. `Client("http://host:8000")`; use as a context manager
    or call `close()`. `api_key` (default: MODELMORA_API_KEY) is sent as a Bearer token; an
    `https://` URL verifies the server against certifi's CAs, or `ca_certs`; `client_cert` and
    `client_key` for mTLS; `verify=False` turns the check off (never in production)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
        verify: bool | PathLike | ssl.SSLContext = True,
        ca_certs: PathLike | None = None,
        client_cert: PathLike | None = None,
        client_key: PathLike | None = None,
    ) -> None:
        super().__init__()
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=timeout,
            headers={**bearer(resolve_api_key(api_key)), **(headers or {})},
            verify=rest_verify(verify, ca_certs, client_cert, client_key),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: RestCall) -> Any:
        try:
            response = self._http.request(
                call.method, call.path, params=call.params, json=call.json, headers=call.headers
            )
        except httpx.TransportError as exc:
            raise TransportError(None, f"{type(exc).__name__}: {exc}") from exc
        return _decode(call, response)

    def _retrying(self, fn: Callable[[], T], idempotent: bool) -> T:
        return self.retry.call(fn, idempotent)

    def _run(self, op: Op) -> Any:
        return self._retrying(lambda: self._send(op.rest), op.idempotent)

    def infer_stream(
        self, requests: Iterable[dict[str, Any]], *, concurrency: int = 16
    ) -> Iterator[dict[str, Any]]:
        """REST has no stream: the requests run concurrently (`concurrency` at a time) and
        answers come in completion order, as over gRPC's InferStream."""
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = {}
            for item in requests:
                request_id, op = _stream_request(item)
                futures[pool.submit(self._run, op)] = request_id
            for future in as_completed(futures):
                try:
                    yield {"request_id": futures[future], "response": future.result()}
                except ApiError as exc:
                    yield {"request_id": futures[future], "error": exc}

    def generate_stream(
        self, model: str, input_data: dict[str, Any], parameters: dict[str, Any] | None = None, **options: Any
    ) -> Iterator[dict[str, Any]]:
        """Events as they come (`token`, `progress`, ..., then `done`); an `error` event raises."""
        body = {**ops.infer_body(input_data, parameters, None, None, None), **options, "stream": True}
        try:
            with self._http.stream("POST", f"/api/v1/infer/{model}", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for name, raw in _sse_events(response.iter_lines()):
                    yield _event(name, raw)
        except httpx.TransportError as exc:
            raise TransportError(None, f"{type(exc).__name__}: {exc}") from exc

    def result(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self._retrying(lambda: self._send(ops.rest_result(job_id)), True)
        return body

    def download_result(self, key: str) -> bytes:
        """A stored result file (`GET /api/v1/results/{key}`), as bytes."""

        def fetch() -> bytes:
            try:
                response = self._http.get(f"/api/v1/results/{key}")
            except httpx.TransportError as exc:
                raise TransportError(None, f"{type(exc).__name__}: {exc}") from exc
            if response.status_code >= 400:
                raise _error(response)
            return response.content

        return self._retrying(fetch, True)

    def health(self) -> dict[str, Any]:
        """Readiness and every model's state; a draining server is `ready: false`, not an error."""
        try:
            ready = self._http.get("/health/ready")
        except httpx.TransportError as exc:
            raise TransportError(None, f"{type(exc).__name__}: {exc}") from exc
        models = self._run(ops.model_health())
        return {"ready": ready.status_code == 200, "models": models}


class AsyncClient(AsyncApi):
    """ModelMora over REST, for asyncio. `async with AsyncClient(url) as mm: ...`"""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
        verify: bool | PathLike | ssl.SSLContext = True,
        ca_certs: PathLike | None = None,
        client_cert: PathLike | None = None,
        client_key: PathLike | None = None,
    ) -> None:
        super().__init__()
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=timeout,
            headers={**bearer(resolve_api_key(api_key)), **(headers or {})},
            verify=rest_verify(verify, ca_certs, client_cert, client_key),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: RestCall) -> Any:
        try:
            response = await self._http.request(
                call.method, call.path, params=call.params, json=call.json, headers=call.headers
            )
        except httpx.TransportError as exc:
            raise TransportError(None, f"{type(exc).__name__}: {exc}") from exc
        return _decode(call, response)

    async def _retrying(self, fn: Callable[[], Awaitable[T]], idempotent: bool) -> T:
        return await self.retry.acall(fn, idempotent)

    async def _run(self, op: Op) -> Any:
        return await self._retrying(lambda: self._send(op.rest), op.idempotent)

    async def infer_stream(
        self, requests: Iterable[dict[str, Any]], *, concurrency: int = 64
    ) -> AsyncIterator[dict[str, Any]]:
        """Concurrent requests, answers in completion order (see `Client.infer_stream`)."""
        gate = asyncio.Semaphore(concurrency)

        async def one(request_id: str, op: Op) -> dict[str, Any]:
            async with gate:
                try:
                    return {"request_id": request_id, "response": await self._run(op)}
                except ApiError as exc:
                    return {"request_id": request_id, "error": exc}

        tasks = [asyncio.ensure_future(one(*_stream_request(item))) for item in requests]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()

    async def generate_stream(
        self, model: str, input_data: dict[str, Any], parameters: dict[str, Any] | None = None, **options: Any
    ) -> AsyncIterator[dict[str, Any]]:
        body = {**ops.infer_body(input_data, parameters, None, None, None), **options, "stream": True}
        try:
            async with self._http.stream("POST", f"/api/v1/infer/{model}", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error(response)
                event, data = "message", list[str]()
                async for line in response.aiter_lines():
                    if line:
                        key, _, value = line.partition(":")
                        if key == "event":
                            event = value.strip()
                        elif key == "data":
                            data.append(value.strip())
                        continue
                    if data:
                        yield _event(event, "\n".join(data))
                    event, data = "message", []
        except httpx.TransportError as exc:
            raise TransportError(None, f"{type(exc).__name__}: {exc}") from exc

    async def result(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = await self._retrying(lambda: self._send(ops.rest_result(job_id)), True)
        return body

    async def download_result(self, key: str) -> bytes:
        async def fetch() -> bytes:
            try:
                response = await self._http.get(f"/api/v1/results/{key}")
            except httpx.TransportError as exc:
                raise TransportError(None, f"{type(exc).__name__}: {exc}") from exc
            if response.status_code >= 400:
                raise _error(response)
            return response.content

        return await self._retrying(fetch, True)

    async def health(self) -> dict[str, Any]:
        try:
            ready = await self._http.get("/health/ready")
        except httpx.TransportError as exc:
            raise TransportError(None, f"{type(exc).__name__}: {exc}") from exc
        models = await self._run(ops.model_health())
        return {"ready": ready.status_code == 200, "models": models}
