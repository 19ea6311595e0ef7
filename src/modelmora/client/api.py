"""The SDK's typed methods (API.md's SDK column), written once for sync and once for async
callers; the transports (rest_client.py, grpc_client.py) only say how an operation travels."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import numpy as np

from modelmora.client import ops
from modelmora.client.ops import Op


def _embed_input(text: str | list[str], normalize: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"text": text}, ({"normalize": True} if normalize else {})


class Models:
    """`client.models`: the registry."""

    def __init__(self, api: SyncApi) -> None:
        self._api = api

    def register(self, model_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """Install a model (`source`, `name`, `version`, `task_type`, `config`, ... as in REST)."""
        return self._api._d(ops.register(model_id, **fields))

    def list(
        self, task_type: str | None = None, status: str | None = None, page: int = 1, page_size: int = 50
    ) -> dict[str, Any]:
        return self._api._d(ops.list_models(task_type, status, page, page_size))

    def get(self, name: str) -> dict[str, Any]:
        return self._api._d(ops.get_model(name))

    def update(self, name: str, **changes: Any) -> dict[str, Any]:
        """`config` (a null value removes a key), `display_name`, `description`,
        `resource_requirements`."""
        return self._api._d(ops.update_model(name, **changes))

    def delete(self, name: str, *, force: bool = False) -> dict[str, Any]:
        return self._api._d(ops.delete_model(name, force=force))

    def download(self, name: str, version: str | None = None) -> dict[str, Any]:
        return self._api._d(ops.download_model(name, version))

    def use(self, name: str, version: str) -> dict[str, Any]:
        return self._api._d(ops.use(name, version))


class AsyncModels:
    """`client.models` of the async clients."""

    def __init__(self, api: AsyncApi) -> None:
        self._api = api

    async def register(self, model_id: str | None = None, **fields: Any) -> dict[str, Any]:
        return await self._api._d(ops.register(model_id, **fields))

    async def list(
        self, task_type: str | None = None, status: str | None = None, page: int = 1, page_size: int = 50
    ) -> dict[str, Any]:
        return await self._api._d(ops.list_models(task_type, status, page, page_size))

    async def get(self, name: str) -> dict[str, Any]:
        return await self._api._d(ops.get_model(name))

    async def update(self, name: str, **changes: Any) -> dict[str, Any]:
        return await self._api._d(ops.update_model(name, **changes))

    async def delete(self, name: str, *, force: bool = False) -> dict[str, Any]:
        return await self._api._d(ops.delete_model(name, force=force))

    async def download(self, name: str, version: str | None = None) -> dict[str, Any]:
        return await self._api._d(ops.download_model(name, version))

    async def use(self, name: str, version: str) -> dict[str, Any]:
        return await self._api._d(ops.use(name, version))


class SyncApi:
    def __init__(self) -> None:
        self.models = Models(self)

    def _run(self, op: Op) -> Any:  # pragma: no cover - each transport implements it
        raise NotImplementedError

    def _d(self, op: Op) -> dict[str, Any]:
        body: dict[str, Any] = self._run(op)
        return body

    def lock(self) -> dict[str, Any]:
        return self._d(ops.lock())

    def load(self, name: str) -> dict[str, Any]:
        return self._d(ops.load(name))

    def unload(self, name: str, *, force: bool = False) -> dict[str, Any]:
        return self._d(ops.unload(name, force=force))

    def warmup(self, name: str) -> dict[str, Any]:
        return self._d(ops.warmup(name))

    def status(self) -> dict[str, Any]:
        return self._d(ops.status())

    def cluster(self) -> dict[str, Any]:
        """The replicas behind the server's address: `{"enabled", "self", "replicas": [...]}`,
        each replica with its models, queues and memory (`GET /api/v1/cluster`; the same dict
        over both transports). Needs an `admin` key, as `status()` does."""
        return self._d(ops.cluster())

    def stats(self, window: int | None = None) -> dict[str, Any]:
        """Each model's recent figures: rates, p50/p90/p99 latency, batch size, one point per
        few seconds over the last `window` seconds (default 300)."""
        return self._d(ops.stats(window))

    def infer(
        self,
        model: str,
        input_data: dict[str, Any],
        parameters: dict[str, Any] | None = None,
        *,
        priority: str | int | None = None,
        timeout_seconds: float | None = None,
        keep_alive: float | None = None,
    ) -> dict[str, Any]:
        """The common response; embeddings as a float32 numpy array."""
        op = ops.infer(
            model,
            input_data,
            parameters,
            priority=priority,
            timeout_seconds=timeout_seconds,
            keep_alive=keep_alive,
        )
        return self._d(op)

    def embed(
        self, model: str, text: str | list[str], *, normalize: bool = False, **options: Any
    ) -> np.ndarray:
        """One vector for a string, a (n, dim) matrix for a list."""
        input_data, params = _embed_input(text, normalize)
        embeddings: np.ndarray = self.infer(model, input_data, params, **options)["result"]["embeddings"]
        return embeddings

    def infer_stream(
        self, requests: Iterable[dict[str, Any]]
    ) -> Iterator[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    def generate_stream(
        self, model: str, input_data: dict[str, Any], parameters: dict[str, Any] | None = None, **options: Any
    ) -> Iterator[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    def submit(
        self,
        model: str,
        input_data: dict[str, Any],
        parameters: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Queue an async job; the same `idempotency_key` within 24 h returns the same job."""
        return self._d(ops.submit(model, input_data, parameters, idempotency_key=idempotency_key, **options))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._d(ops.job(job_id))

    def jobs(
        self, status: str | None = None, model: str | None = None, page: int = 1, page_size: int = 50
    ) -> dict[str, Any]:
        return self._d(ops.jobs(status, model, page, page_size))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._d(ops.cancel(job_id))

    def result(self, job_id: str) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def health(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def download_result(self, key: str) -> bytes:  # pragma: no cover
        raise NotImplementedError


class AsyncApi:
    def __init__(self) -> None:
        self.models = AsyncModels(self)

    async def _run(self, op: Op) -> Any:  # pragma: no cover
        raise NotImplementedError

    async def _d(self, op: Op) -> dict[str, Any]:
        body: dict[str, Any] = await self._run(op)
        return body

    async def lock(self) -> dict[str, Any]:
        return await self._d(ops.lock())

    async def load(self, name: str) -> dict[str, Any]:
        return await self._d(ops.load(name))

    async def unload(self, name: str, *, force: bool = False) -> dict[str, Any]:
        return await self._d(ops.unload(name, force=force))

    async def warmup(self, name: str) -> dict[str, Any]:
        return await self._d(ops.warmup(name))

    async def status(self) -> dict[str, Any]:
        return await self._d(ops.status())

    async def cluster(self) -> dict[str, Any]:
        return await self._d(ops.cluster())

    async def stats(self, window: int | None = None) -> dict[str, Any]:
        return await self._d(ops.stats(window))

    async def infer(
        self,
        model: str,
        input_data: dict[str, Any],
        parameters: dict[str, Any] | None = None,
        *,
        priority: str | int | None = None,
        timeout_seconds: float | None = None,
        keep_alive: float | None = None,
    ) -> dict[str, Any]:
        op = ops.infer(
            model,
            input_data,
            parameters,
            priority=priority,
            timeout_seconds=timeout_seconds,
            keep_alive=keep_alive,
        )
        return await self._d(op)

    async def embed(
        self, model: str, text: str | list[str], *, normalize: bool = False, **options: Any
    ) -> np.ndarray:
        input_data, params = _embed_input(text, normalize)
        embeddings: np.ndarray = (await self.infer(model, input_data, params, **options))["result"][
            "embeddings"
        ]
        return embeddings

    def infer_stream(
        self, requests: Iterable[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    def generate_stream(
        self, model: str, input_data: dict[str, Any], parameters: dict[str, Any] | None = None, **options: Any
    ) -> AsyncIterator[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    async def submit(
        self,
        model: str,
        input_data: dict[str, Any],
        parameters: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        return await self._d(
            ops.submit(model, input_data, parameters, idempotency_key=idempotency_key, **options)
        )

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._d(ops.job(job_id))

    async def jobs(
        self, status: str | None = None, model: str | None = None, page: int = 1, page_size: int = 50
    ) -> dict[str, Any]:
        return await self._d(ops.jobs(status, model, page, page_size))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._d(ops.cancel(job_id))

    async def result(self, job_id: str) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    async def health(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    async def download_result(self, key: str) -> bytes:  # pragma: no cover
        raise NotImplementedError
