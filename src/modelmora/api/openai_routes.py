"""The OpenAI-compatible REST routes under `/v1`: new doors on the same service layer.

`/v1/embeddings` is answered by the edge's fast path (api/openai_embeddings.py); its route
here documents it in `/openapi.json` and runs the same code if the fast path is off. The
others are FastAPI routes. Every error on these paths takes OpenAI's shape
(api/openai_errors.py, applied by the edge and by the app's exception handlers).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from modelmora.api import fastpath, openai_embeddings
from modelmora.api.openai_errors import invalid
from modelmora.api.openai_generation import PROTOCOL, Generation
from modelmora.api.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    ImageRequest,
    refuse_unsupported,
    request_options,
)
from modelmora.contracts.encoding import JSON_OPTIONS
from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability.metrics import current_protocol
from modelmora.observability.tracing import current_trace_id
from modelmora.registry.catalog import ModelRecord, validate_name
from modelmora.services.registry import EVERYTHING

if TYPE_CHECKING:
    from modelmora.app import ModelMora

_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=JSON_OPTIONS)


def _mm(request: Request) -> ModelMora:
    mm: ModelMora = request.app.state.mm
    return mm


def _watch(request: Request) -> asyncio.Future[Any]:
    return fastpath.disconnect_watch(request.receive)


def _options(request: Request) -> dict[str, Any]:
    return request_options(request.headers.get)


def _model_object(model: dict[str, Any]) -> dict[str, Any]:
    created = model.get("created_at")
    return {
        "id": model["name"],
        "object": "model",
        "created": int(datetime.fromisoformat(created).timestamp()) if created else 0,
        "owned_by": "modelmora",
        "task_type": model["task_type"],  # an extension: what the model does
    }


def _image_params(record: ModelRecord, body: ImageRequest) -> dict[str, Any]:
    params: dict[str, Any] = {
        "num_images": body.n,
        "response_format": body.response_format or "url",
        "steps": body.steps,
        "guidance_scale": body.guidance_scale,
        "negative_prompt": body.negative_prompt,
        "seed": body.seed,
    }
    if body.size is not None:
        # The model may list the sizes it was trained for; any other is refused.
        allowed = record.config.get("image_sizes")
        if isinstance(allowed, list) and allowed and body.size not in allowed:
            raise invalid("size", f"model {record.name} supports {', '.join(map(str, allowed))}")
        size = _SIZE.fullmatch(body.size)
        if size is None:
            raise invalid("size", "must be WIDTHxHEIGHT, e.g. 512x512")
        params["width"], params["height"] = int(size[1]), int(size[2])
    return {k: v for k, v in params.items() if v is not None}


def build_openai_router() -> APIRouter:
    r = APIRouter(tags=["openai"])

    @r.get("/v1/models", summary="Installed models, in OpenAI's list shape")
    async def list_models(request: Request) -> Response:
        page = await _mm(request).registry.list(None, None, 1, EVERYTHING)
        return _JSON({"object": "list", "data": [_model_object(m) for m in page["data"]]})

    @r.get("/v1/models/{model_id}", summary="One installed model")
    async def get_model(request: Request, model_id: str) -> Response:
        return _JSON(_model_object(await _mm(request).registry.get(validate_name(model_id))))

    @r.post("/v1/embeddings", summary="Embeddings (served by the fast path)")
    async def create_embeddings(request: Request, body: EmbeddingsRequest) -> Response:
        watch = _watch(request)
        try:
            payload = await openai_embeddings.embeddings(_mm(request), body, _options(request), watch)
        finally:
            watch.cancel()
        return Response(payload, media_type="application/json")

    async def _generate(request: Request, body: CompletionRequest | ChatCompletionRequest) -> Response:
        watch = _watch(request)
        generation = Generation(_mm(request), body, _options(request), watch)
        streaming = False
        try:
            await generation.prepare()
            if not body.stream:
                return _JSON(await generation.run())
            chunks = await generation.open_stream()
            streaming = True
        finally:
            if not streaming:  # else the stream's end cancels it
                watch.cancel()

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                watch.cancel()

        headers = {k.decode(): v.decode() for k, v in fastpath.SSE_HEADERS}
        return StreamingResponse(stream(), headers=headers)

    @r.post("/v1/completions", summary="Text completion (txt2txt models)")
    async def create_completion(request: Request, body: CompletionRequest) -> Response:
        return await _generate(request, body)

    @r.post("/v1/chat/completions", summary="Chat completion (txt2txt; img2txt with image_url)")
    async def create_chat_completion(request: Request, body: ChatCompletionRequest) -> Response:
        return await _generate(request, body)

    @r.post("/v1/images/generations", summary="Image generation (txt2img models)")
    async def create_image(request: Request, body: ImageRequest) -> Response:
        current_protocol.set(PROTOCOL)
        refuse_unsupported(body)
        mm = _mm(request)
        name = validate_name(body.model)
        record = await mm.inference.manager.record(name)
        if record.task_type != TaskType.TXT2IMG:
            raise invalid("model", f"{name} is a {record.task_type.value} model: images need txt2img")
        watch = _watch(request)
        try:
            response = await mm.inference.infer(
                name,
                {"text": body.prompt},
                _image_params(record, body),
                trace_id=current_trace_id.get(),
                disconnected=watch,
                **_options(request),
            )
        finally:
            watch.cancel()
        base = str(request.base_url).rstrip("/")
        data = [
            {"url": base + image["url"] if image["url"].startswith("/") else image["url"]}
            if "url" in image
            else {"b64_json": image["b64_json"]}
            for image in response["result"]["images"]
        ]
        if not data:
            raise ModelMoraError(ErrorCode.INFERENCE_FAILED, "the pipeline returned no image")
        return _JSON({"created": int(time.time()), "data": data})

    return r
