"""The SDK over gRPC: `GrpcClient` (blocking channel) and `AsyncGrpcClient` (grpc.aio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelmora.client import ops
from modelmora.client.api import AsyncApi, SyncApi
from modelmora.client.credentials import PathLike, grpc_credentials, grpc_target, resolve_api_key
from modelmora.client.errors import ApiError, error_class, from_rpc_error
from modelmora.client.ops import GrpcCall, Op
from modelmora.client.retry import RetryPolicy
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import build_request, response_to_dict, struct_to_dict

T = TypeVar("T")

DEFAULT_TARGET = "127.0.0.1:50051"
Metadata = tuple[tuple[str, str], ...]


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _with_key(metadata: Metadata, api_key: str | None) -> Metadata:
    key = resolve_api_key(api_key)
    if not key or any(k == "authorization" for k, _ in metadata):
        return metadata
    return (*metadata, ("authorization", f"Bearer {key}"))


def _stream_request(item: dict[str, Any]) -> pb.InferRequest:
    fields = {k: v for k, v in item.items() if k not in ("request_id", "model", "input_data", "parameters")}
    return build_request(
        item["model"],
        item["input_data"],
        item.get("parameters"),
        request_id=str(item.get("request_id", "")),
        **fields,
    )


def _error(error: pb.Error) -> ApiError:
    code = error.error_code or None
    return error_class(code)(
        code, error.message, details=struct_to_dict(error.details), trace_id=error.trace_id or None
    )


def _stream_answer(answer: pb.InferStreamResponse) -> dict[str, Any]:
    if answer.WhichOneof("outcome") == "response":
        return {"request_id": answer.request_id, "response": response_to_dict(answer.response)}
    return {"request_id": answer.request_id, "error": _error(answer.error)}


def _generate_event(event: pb.GenerateEvent) -> dict[str, Any]:
    kind = event.WhichOneof("event")
    if kind == "token":
        return {"event": "token", "data": {"text": event.token.text, "index": event.token.index}}
    if kind == "progress":
        return {"event": "progress", "data": {"step": event.progress.step, "total": event.progress.total}}
    if kind == "done":
        return {"event": "done", "data": response_to_dict(event.done)}
    if kind == "error":
        raise _error(event.error)
    return {"event": event.chunk.name, "data": orjson.loads(event.chunk.data or b"null")}


def _result(chunks: list[bytes]) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(b"".join(chunks))
    return ops.with_numpy(body)


def _stubs(channel: Any) -> dict[str, Any]:
    return {
        "inference": pb_grpc.InferenceServiceStub(channel),
        "registry": pb_grpc.RegistryServiceStub(channel),
        "management": pb_grpc.ManagementServiceStub(channel),
        "health": health_pb2_grpc.HealthStub(channel),
    }


class GrpcClient(SyncApi):
    """ModelMora over gRPC, blocking. `GrpcClient("host:50051")`; `timeout` is each call's
    deadline (the server caps the request's `timeout_seconds` by it). `api_key` (default:
    MODELMORA_API_KEY) goes as `authorization` metadata. TLS: `tls=True`, an `https://` (or
    `grpcs://`) target, or `ca_certs` / `client_cert` given; the server is verified against the
    system's roots or `ca_certs`; `client_cert` and `client_key` for mTLS."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        metadata: Metadata = (),
        max_message_bytes: int = 64 << 20,
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
        tls: bool | None = None,
        ca_certs: PathLike | None = None,
        client_cert: PathLike | None = None,
        client_key: PathLike | None = None,
    ) -> None:
        super().__init__()
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.metadata = _with_key(metadata, api_key)
        if channel is None:
            address, secure = grpc_target(target, tls, ca_certs, client_cert)
            options = _options(max_message_bytes)
            channel = (
                grpc.secure_channel(address, grpc_credentials(ca_certs, client_cert, client_key), options)
                if secure
                else grpc.insecure_channel(address, options=options)
            )
        self._channel = channel
        self._stub = _stubs(self._channel)

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _send(self, call: GrpcCall) -> Any:
        method = getattr(self._stub[call.service], call.rpc)
        try:
            response = method(call.request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return call.convert(response)

    def _retrying(self, fn: Callable[[], T], idempotent: bool) -> T:
        return self.retry.call(fn, idempotent)

    def _run(self, op: Op) -> Any:
        return self._retrying(lambda: self._send(op.grpc), op.idempotent)

    def infer_stream(self, requests: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Many requests on one InferStream; answers in completion order, each with its
        `request_id` and either `response` or `error` (an ApiError)."""
        call = self._stub["inference"].InferStream(
            (_stream_request(item) for item in requests), timeout=self.timeout, metadata=self.metadata
        )
        try:
            for answer in call:
                yield _stream_answer(answer)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def generate_stream(
        self, model: str, input_data: dict[str, Any], parameters: dict[str, Any] | None = None, **options: Any
    ) -> Iterator[dict[str, Any]]:
        call = self._stub["inference"].Generate(
            build_request(model, input_data, parameters, **options),
            timeout=self.timeout,
            metadata=self.metadata,
        )
        try:
            for event in call:
                yield _generate_event(event)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def result(self, job_id: str, *, chunk_size: int = 0) -> dict[str, Any]:
        """The job's common response, streamed in chunks (`chunk_size` 0: the server's)."""

        def fetch() -> dict[str, Any]:
            request = pb.GetJobResultRequest(job_id=job_id, chunk_size=chunk_size)
            try:
                call = self._stub["inference"].GetJobResult(
                    request, timeout=self.timeout, metadata=self.metadata
                )
                chunks = [c.data for c in call]
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            return _result(chunks)

        return self._retrying(fetch, True)

    def download_result(self, key: str) -> bytes:
        raise NotImplementedError("over gRPC a stored result comes inside result(); use Client for files")

    def health(self) -> dict[str, Any]:
        try:
            check = self._stub["health"].Check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        models = self._run(ops.model_health())
        return {"ready": check.status == health_pb2.HealthCheckResponse.SERVING, "models": models}


class AsyncGrpcClient(AsyncApi):
    """ModelMora over gRPC for asyncio (grpc.aio). Create it inside the running loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        metadata: Metadata = (),
        max_message_bytes: int = 64 << 20,
        channel: grpc.aio.Channel | None = None,
        api_key: str | None = None,
        tls: bool | None = None,
        ca_certs: PathLike | None = None,
        client_cert: PathLike | None = None,
        client_key: PathLike | None = None,
    ) -> None:
        super().__init__()
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.metadata = _with_key(metadata, api_key)
        if channel is None:
            address, secure = grpc_target(target, tls, ca_certs, client_cert)
            options = _options(max_message_bytes)
            channel = (
                grpc.aio.secure_channel(address, grpc_credentials(ca_certs, client_cert, client_key), options)
                if secure
                else grpc.aio.insecure_channel(address, options=options)
            )
        self._channel = channel
        self._stub = _stubs(self._channel)

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _send(self, call: GrpcCall) -> Any:
        method = getattr(self._stub[call.service], call.rpc)
        try:
            response = await method(call.request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return call.convert(response)

    async def _retrying(self, fn: Callable[[], Awaitable[T]], idempotent: bool) -> T:
        return await self.retry.acall(fn, idempotent)

    async def _run(self, op: Op) -> Any:
        return await self._retrying(lambda: self._send(op.grpc), op.idempotent)

    async def infer_stream(self, requests: Iterable[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        call = self._stub["inference"].InferStream(
            iter([_stream_request(item) for item in requests]), timeout=self.timeout, metadata=self.metadata
        )
        try:
            async for answer in call:
                yield _stream_answer(answer)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def generate_stream(
        self, model: str, input_data: dict[str, Any], parameters: dict[str, Any] | None = None, **options: Any
    ) -> AsyncIterator[dict[str, Any]]:
        call = self._stub["inference"].Generate(
            build_request(model, input_data, parameters, **options),
            timeout=self.timeout,
            metadata=self.metadata,
        )
        try:
            async for event in call:
                yield _generate_event(event)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def result(self, job_id: str, *, chunk_size: int = 0) -> dict[str, Any]:
        async def fetch() -> dict[str, Any]:
            request = pb.GetJobResultRequest(job_id=job_id, chunk_size=chunk_size)
            try:
                call = self._stub["inference"].GetJobResult(
                    request, timeout=self.timeout, metadata=self.metadata
                )
                chunks = [c.data async for c in call]
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            return _result(chunks)

        return await self._retrying(fetch, True)

    async def download_result(self, key: str) -> bytes:
        raise NotImplementedError(
            "over gRPC a stored result comes inside result(); use AsyncClient for files"
        )

    async def health(self) -> dict[str, Any]:
        try:
            check = await self._stub["health"].Check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        models = await self._run(ops.model_health())
        return {"ready": check.status == health_pb2.HealthCheckResponse.SERVING, "models": models}
