"""gRPC servicers: translate `modelmora.v1` messages to the service layer and back, nothing more.

Each RPC does what the REST route of the same operation does (api/rest.py), through the same
service calls; errors take the gRPC status of the shared error table, with `error_code`,
`trace_id`, `retry-after` and the JSON `details` in trailing metadata. A call's deadline caps
the request's timeout; a cancelled call cancels its handler, which withdraws queued work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import orjson

from modelmora.contracts.encoding import JSON_OPTIONS
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability import tracing
from modelmora.observability.metrics import current_protocol
from modelmora.observability.tracing import current_trace_id, trace_id_from
from modelmora.registry.installer import InstallRequest
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import (
    cluster_to_proto,
    encode_result_chunk,
    error_body_to_proto,
    error_to_proto,
    from_dict,
    request_fields,
    response_to_proto,
    stats_to_proto,
    struct_to_dict,
)

if TYPE_CHECKING:
    from modelmora.app import ModelMora

log = logging.getLogger("modelmora.api.grpc")

Ctx = grpc.aio.ServicerContext[Any, Any]


def error_metadata(error: ModelMoraError, trace_id: str) -> tuple[tuple[str, str | bytes], ...]:
    md: list[tuple[str, str | bytes]] = [("error_code", error.code.value), ("trace_id", trace_id)]
    if error.retry_after is not None:
        md.append(("retry-after", str(max(1, round(error.retry_after)))))
    if error.details:
        md.append(("error-details-bin", orjson.dumps(error.details, option=JSON_OPTIONS)))
    return tuple(md)


async def abort(context: Ctx, error: ModelMoraError, trace_id: str) -> NoReturn:
    """End the call with the table's status for this error code."""
    await context.abort(
        grpc.StatusCode[error.code.grpc_status],
        error.message,
        trailing_metadata=error_metadata(error, trace_id),
    )
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def _unavailable(what: str) -> ModelMoraError:
    # NOT_FOUND ("no such route") maps to UNIMPLEMENTED: this server lacks the feature.
    return ModelMoraError(ErrorCode.NOT_FOUND, f"{what} is not available on this server")


def deadline_timeout(requested: float | None, context: Ctx) -> float | None:
    """The request's timeout, capped by the call's deadline (the smaller one wins)."""
    remaining = context.time_remaining()
    if remaining is None:
        return requested
    remaining = max(remaining, 0.001)
    return remaining if requested is None else min(requested, remaining)


class Door:
    """What every RPC shares with the REST edge: trace ids, drain refusal, the in-flight count
    the drain waits for, and one error mapping."""

    def __init__(self, mm: ModelMora) -> None:
        self.mm = mm

    @contextlib.asynccontextmanager
    async def call(self, context: Ctx, method: str) -> AsyncIterator[str]:
        """Wrap one RPC (`method`: its name in the proto, the metric's label)."""
        traceparent = next(
            (str(v) for k, v in context.invocation_metadata() or () if k == "traceparent"), None
        )
        trace_id = trace_id_from(traceparent)
        token = current_trace_id.set(trace_id)
        door = current_protocol.set("grpc")
        if self.mm.inference.spans is not None:
            tracing.current_parent_span.set(tracing.parent_span_from(traceparent))
        code = "OK"  # the call's gRPC status, counted when it ends
        try:
            if self.mm.draining:
                code = ErrorCode.SHUTTING_DOWN.grpc_status
                await abort(
                    context,
                    ModelMoraError(ErrorCode.SHUTTING_DOWN, "the server is shutting down", retry_after=5),
                    trace_id,
                )
            self.mm.inflight += 1
            try:
                yield trace_id
                context.set_trailing_metadata((("trace_id", trace_id),))
            except ModelMoraError as exc:
                code = exc.code.grpc_status
                await abort(context, exc, trace_id)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code = "INTERNAL"
                log.exception("unhandled error")
                await abort(
                    context,
                    ModelMoraError(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"),
                    trace_id,
                )
            finally:
                self.mm.inflight -= 1
        finally:
            self.mm.metrics.record_grpc(method, code)
            with contextlib.suppress(ValueError):  # reset from another context (a closed stream)
                current_trace_id.reset(token)
                current_protocol.reset(door)

    def check_size(self, message: pb.InferRequest) -> None:
        limit = self.mm.settings.limits.max_request_bytes
        size = message.ByteSize()
        if size > limit:
            raise ModelMoraError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"request of {size} bytes exceeds the limit of {limit} bytes",
                {"limit_bytes": limit},
            )


# -- inference ----------------------------------------------------------------------------------


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, door: Door) -> None:
        self.door = door
        self.mm = door.mm

    async def _infer(self, request: pb.InferRequest, context: Ctx, trace_id: str) -> pb.InferResponse:
        self.door.check_size(request)
        f = request_fields(request)
        response = await self.mm.inference.infer(
            request.model,
            f["input_data"],
            f["parameters"],
            priority=f["priority"],
            timeout_seconds=deadline_timeout(f["timeout_seconds"], context),
            keep_alive=f["keep_alive"],
            trace_id=trace_id,
        )
        return response_to_proto(response)

    async def Infer(self, request: pb.InferRequest, context: Ctx) -> pb.InferResponse:
        async with self.door.call(context, "Infer") as trace_id:
            return await self._infer(request, context, trace_id)
        raise AssertionError("unreachable")  # pragma: no cover - the guard re-raises as abort

    async def InferStream(
        self, request_iterator: AsyncIterator[pb.InferRequest], context: Ctx
    ) -> AsyncIterator[pb.InferStreamResponse]:
        """Every request runs as soon as it arrives; answers go out as they complete."""
        async with self.door.call(context, "InferStream") as trace_id:
            answers: asyncio.Queue[pb.InferStreamResponse | None] = asyncio.Queue()
            tasks: set[asyncio.Task[None]] = set()
            pending = 0

            async def one(request: pb.InferRequest) -> None:
                nonlocal pending
                try:
                    response = await self._infer(request, context, trace_id)
                    answer = pb.InferStreamResponse(request_id=request.request_id, response=response)
                except ModelMoraError as exc:
                    answer = pb.InferStreamResponse(
                        request_id=request.request_id, error=error_to_proto(exc, trace_id)
                    )
                except Exception as exc:  # a bug: this request fails, the stream goes on
                    log.exception("unhandled error in InferStream")
                    error = ModelMoraError(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
                    answer = pb.InferStreamResponse(
                        request_id=request.request_id, error=error_to_proto(error, trace_id)
                    )
                pending -= 1
                answers.put_nowait(answer)

            async def read() -> None:
                nonlocal pending
                try:
                    async for request in request_iterator:
                        if not request.request_id:
                            error = ModelMoraError(
                                ErrorCode.VALIDATION_ERROR,
                                "request_id: every InferStream message needs one",
                                {"errors": [{"field": "request_id", "message": "is required"}]},
                            )
                            answers.put_nowait(pb.InferStreamResponse(error=error_to_proto(error, trace_id)))
                            continue
                        pending += 1
                        task = asyncio.create_task(one(request))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                finally:
                    answers.put_nowait(None)  # no more requests

            reader = asyncio.create_task(read())
            try:
                reading = True
                while reading or pending or not answers.empty():
                    answer = await answers.get()
                    if answer is None:
                        reading = False
                        continue
                    yield answer
                await reader  # surfaces a broken request stream
            finally:
                reader.cancel()
                for task in list(tasks):
                    task.cancel()  # a cancelled call drops its queued work

    async def Generate(self, request: pb.InferRequest, context: Ctx) -> AsyncIterator[pb.GenerateEvent]:
        async with self.door.call(context, "Generate") as trace_id:
            stream_fn = getattr(self.mm.inference, "stream", None)
            if stream_fn is None:
                raise _unavailable("Generate (streaming inference)")
            self.door.check_size(request)
            f = request_fields(request)
            events: AsyncIterator[dict[str, Any]] = stream_fn(
                request.model,
                f["input_data"],
                f["parameters"],
                priority=f["priority"],
                timeout_seconds=deadline_timeout(f["timeout_seconds"], context),
                keep_alive=f["keep_alive"],
                trace_id=trace_id,
            )
            try:
                async for event in events:
                    yield generate_event(event)
            finally:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()  # a cancelled call stops the generation

    # -- async jobs -------------------------------------------------------------------------

    def _jobs(self) -> Any:
        jobs = getattr(self.mm, "jobs", None)
        if jobs is None:
            raise _unavailable("async jobs")
        return jobs

    async def InferAsync(self, request: pb.InferAsyncRequest, context: Ctx) -> pb.Job:
        async with self.door.call(context, "InferAsync") as trace_id:
            self.door.check_size(request.request)
            body = request_fields(request.request)
            status, created = await self._jobs().submit(
                request.request.model,
                body,
                idempotency_key=request.idempotency_key or None,
                trace_id=trace_id,
            )
            job = job_to_proto(status)
            job.created = created
            return job
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetJobStatus(self, request: pb.JobRef, context: Ctx) -> pb.Job:
        async with self.door.call(context, "GetJobStatus"):
            return job_to_proto(await self._jobs().status(request.job_id))
        raise AssertionError("unreachable")  # pragma: no cover

    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        async with self.door.call(context, "ListJobs"):
            page = await self._jobs().list(
                request.status or None, request.model or None, request.page or 1, request.page_size or 50
            )
            return pb.ListJobsResponse(
                data=[job_to_proto(j) for j in page["data"]], meta=from_dict(page["meta"], pb.PageMeta())
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetJobResult(  # type: ignore[override]  # yields the messages pre-encoded
        self, request: pb.GetJobResultRequest, context: Ctx
    ) -> AsyncIterator[bytes]:
        """The common response as JSON bytes in chunks: results far over one message's limit
        (a big embedding batch, images) stream without being held whole in a message. Each
        chunk goes out as `JobResultChunk` bytes encoded here (v1/convert.py, encode_result_chunk);
        the server registers this method without a response serializer (grpc_server.py)."""
        async with self.door.call(context, "GetJobResult"):
            server = self.mm.settings.server
            size = request.chunk_size or server.grpc_result_chunk_bytes
            size = max(1024, min(size, server.grpc_max_send_message_bytes - 1024))
            total, chunks = await self._jobs().result_chunks(request.job_id, size)
            offset = 0
            async for data in chunks:
                encoded = encode_result_chunk(total, offset, data, "application/json" if offset == 0 else "")
                offset += len(data)
                # Let go of the chunk before suspending: with it alive, two MiB-sized buffers
                # per chunk make glibc trim and regrow its heap every message (16k minor page
                # faults per 64 MB, measured), which cost more than the copies themselves.
                del data
                yield encoded
            if offset == 0:  # an empty result still answers once
                yield encode_result_chunk(total, 0, b"", "application/json")

    async def CancelJob(self, request: pb.JobRef, context: Ctx) -> pb.Job:
        async with self.door.call(context, "CancelJob"):
            return job_to_proto(await self._jobs().cancel(request.job_id))
        raise AssertionError("unreachable")  # pragma: no cover


def generate_event(event: dict[str, Any]) -> pb.GenerateEvent:
    name = event.get("event")
    data = event.get("data") or {}
    if name == "token":
        return pb.GenerateEvent(
            token=pb.TokenEvent(text=str(data.get("text", "")), index=int(data.get("index", 0)))
        )
    if name == "progress":
        return pb.GenerateEvent(
            progress=pb.ProgressEvent(step=int(data.get("step", 0)), total=int(data.get("total", 0)))
        )
    if name == "done":
        return pb.GenerateEvent(done=response_to_proto(data))
    if name == "error":
        return pb.GenerateEvent(error=error_body_to_proto(data))
    return pb.GenerateEvent(chunk=pb.ChunkEvent(name=str(name), data=orjson.dumps(data, option=JSON_OPTIONS)))


def job_to_proto(status: dict[str, Any]) -> pb.Job:
    error = status.get("error")
    job = from_dict({k: v for k, v in status.items() if k != "error"}, pb.Job())
    if error:
        job.error.CopyFrom(error_body_to_proto(error))
    return job


# -- registry -----------------------------------------------------------------------------------


def _page(page: int, page_size: int, limit: int = 500) -> tuple[int, int]:
    page, page_size = page or 1, page_size or 50
    if page_size > limit:
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            f"page_size: at most {limit}",
            {"errors": [{"field": "page_size", "message": f"at most {limit}"}]},
        )
    return page, page_size


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(self, door: Door) -> None:
        self.door = door
        self.registry = door.mm.registry

    async def RegisterModel(self, request: pb.RegisterModelRequest, context: Ctx) -> pb.Model:
        async with self.door.call(context, "RegisterModel"):
            req = InstallRequest(
                model_id=request.model_id or None,
                source=request.source or None,
                name=request.name or None,
                version=request.version or None,
                revision=request.revision or None,
                task_type=request.task_type or None,
                display_name=request.display_name or None,
                description=request.description or None,
                config=struct_to_dict(request.config),
                resource_requirements=struct_to_dict(request.resource_requirements),
            )
            return from_dict(await self.registry.install(req), pb.Model())
        raise AssertionError("unreachable")  # pragma: no cover

    async def ListModels(self, request: pb.ListModelsRequest, context: Ctx) -> pb.ListModelsResponse:
        async with self.door.call(context, "ListModels"):
            page, page_size = _page(request.page, request.page_size)
            listed = await self.registry.list(
                request.task_type or None, request.status or None, page, page_size
            )
            return pb.ListModelsResponse(
                data=[from_dict(d, pb.Model()) for d in listed["data"]],
                meta=from_dict(listed["meta"], pb.PageMeta()),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetModel(self, request: pb.ModelRef, context: Ctx) -> pb.Model:
        async with self.door.call(context, "GetModel"):
            return from_dict(await self.registry.get(request.name), pb.Model())
        raise AssertionError("unreachable")  # pragma: no cover

    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Ctx) -> pb.Model:
        async with self.door.call(context, "UpdateModel"):
            fields: dict[str, Any] = {}
            if request.HasField("display_name"):
                fields["display_name"] = request.display_name
            if request.HasField("description"):
                fields["description"] = request.description
            if request.HasField("resource_requirements"):
                fields["resource_requirements"] = struct_to_dict(request.resource_requirements)
            updated = await self.registry.update(request.name, struct_to_dict(request.config), fields)
            return from_dict(updated, pb.Model())
        raise AssertionError("unreachable")  # pragma: no cover

    async def DeleteModel(self, request: pb.DeleteModelRequest, context: Ctx) -> pb.DeleteModelResponse:
        async with self.door.call(context, "DeleteModel"):
            return from_dict(
                await self.registry.uninstall(request.name, request.force), pb.DeleteModelResponse()
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def DownloadModel(self, request: pb.DownloadModelRequest, context: Ctx) -> pb.DownloadModelResponse:
        async with self.door.call(context, "DownloadModel"):
            verified = await self.registry.verify(request.name, request.version or None)
            return from_dict(verified, pb.DownloadModelResponse())
        raise AssertionError("unreachable")  # pragma: no cover

    async def SetActiveVersion(self, request: pb.SetActiveVersionRequest, context: Ctx) -> pb.Model:
        async with self.door.call(context, "SetActiveVersion"):
            return from_dict(await self.registry.use(request.name, request.version), pb.Model())
        raise AssertionError("unreachable")  # pragma: no cover

    async def GenerateLock(self, request: pb.GenerateLockRequest, context: Ctx) -> pb.Lock:
        async with self.door.call(context, "GenerateLock"):
            return from_dict({"lock": await self.registry.lock()}, pb.Lock())
        raise AssertionError("unreachable")  # pragma: no cover


# -- management ---------------------------------------------------------------------------------


class ManagementServicer(pb_grpc.ManagementServiceServicer):
    def __init__(self, door: Door) -> None:
        self.door = door
        self.management = door.mm.management

    async def LoadModel(self, request: pb.ModelRef, context: Ctx) -> pb.ModelStatus:
        async with self.door.call(context, "LoadModel"):
            return from_dict(await self.management.load(request.name), pb.ModelStatus())
        raise AssertionError("unreachable")  # pragma: no cover

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Ctx) -> pb.UnloadModelResponse:
        async with self.door.call(context, "UnloadModel"):
            unloaded = await self.management.unload(request.name, request.force)
            return from_dict(unloaded, pb.UnloadModelResponse())
        raise AssertionError("unreachable")  # pragma: no cover

    async def WarmupModel(self, request: pb.ModelRef, context: Ctx) -> pb.WarmupResponse:
        async with self.door.call(context, "WarmupModel"):
            return from_dict(await self.management.warmup(request.name), pb.WarmupResponse())
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetSystemStatus(self, request: pb.GetSystemStatusRequest, context: Ctx) -> pb.SystemStatus:
        async with self.door.call(context, "GetSystemStatus"):
            return from_dict(await self.management.status(), pb.SystemStatus())
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetModelHealth(self, request: pb.GetModelHealthRequest, context: Ctx) -> pb.ModelHealth:
        async with self.door.call(context, "GetModelHealth"):
            return from_dict(self.management.health(), pb.ModelHealth())
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.Stats:
        async with self.door.call(context, "GetStats"):
            return stats_to_proto(self.management.stats(request.window_seconds or None))
        raise AssertionError("unreachable")  # pragma: no cover

    async def GetCluster(self, request: pb.GetClusterRequest, context: Ctx) -> pb.ClusterView:
        async with self.door.call(context, "GetCluster"):
            return cluster_to_proto(await self.management.cluster())
        raise AssertionError("unreachable")  # pragma: no cover
