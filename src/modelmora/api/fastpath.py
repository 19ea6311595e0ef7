"""The inference routes, served straight from ASGI.

FastAPI's routing, dependency and response machinery cost about two thirds of the server's
CPU per inference request (py-spy under `bench/throughput.py`'s null model), and on a small
machine every millisecond the server spends is taken from the model's worker. So the edge
hands `POST /infer/{name}` and `POST /api/v1/infer/{name}` to this handler; the FastAPI routes
of the same paths stay registered for the OpenAPI document. Both use the same schemas, the
same service call and the same error shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ValidationError

from modelmora.api.schemas import InferRequest, ShortInferRequest
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability.tracing import current_trace_id

if TYPE_CHECKING:
    from modelmora.app import ModelMora

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS  # numpy arrays without a copy
_ROUTES: tuple[tuple[str, type[BaseModel]], ...] = (
    ("/api/v1/infer/", InferRequest),
    ("/infer/", ShortInferRequest),
)


def match(method: str, path: str) -> tuple[str, type[BaseModel]] | None:
    """(model name, body schema) when this request is a synchronous inference."""
    if method != "POST":
        return None
    for prefix, schema in _ROUTES:
        if path.startswith(prefix):
            name = path[len(prefix) :]
            if name and not name.endswith("/async"):
                return name, schema
    return None


def validation_error(errors: list[dict[str, Any]]) -> ModelMoraError:
    """Pydantic's errors as our VALIDATION_ERROR (shared with the FastAPI handler)."""
    fields = [
        {
            "field": "body"
            if e.get("type") == "json_invalid"
            else ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
            "message": e.get("msg", ""),
        }
        for e in errors
    ]
    if any(e.get("type") == "json_invalid" for e in errors):
        message = "malformed JSON body"
    else:
        message = "invalid request: " + "; ".join(f"{e['field']}: {e['message']}" for e in fields[:5])
    return ModelMoraError(ErrorCode.VALIDATION_ERROR, message, {"errors": fields})


def to_full(body: BaseModel) -> InferRequest:
    if isinstance(body, InferRequest):
        return body
    assert isinstance(body, ShortInferRequest)
    input_data = {k: v for k, v in (("text", body.text), ("image", body.image)) if v is not None}
    return InferRequest(
        input_data=input_data,
        parameters=body.parameters,
        priority=body.priority,
        timeout_seconds=body.timeout_seconds,
        keep_alive=body.keep_alive,
        stream=body.stream,
    )


async def run_infer(
    mm: ModelMora, name: str, body: InferRequest, disconnected: asyncio.Future[Any]
) -> dict[str, Any]:
    if body.stream:
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            "streaming is for generation tasks",
            {"errors": [{"field": "stream", "message": "not supported for this task"}]},
        )
    return await mm.inference.infer(
        name,
        body.input_data,
        body.parameters,
        priority=body.priority,
        timeout_seconds=body.timeout_seconds,
        keep_alive=body.keep_alive,
        trace_id=current_trace_id.get(),
        disconnected=disconnected,
    )


def _disconnect(receive: Receive) -> asyncio.Future[None]:
    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(wait())


async def handle(
    mm: ModelMora, name: str, schema: type[BaseModel], body: bytes, receive: Receive, send: Send
) -> None:
    """Answer one inference request; errors are raised as ModelMoraError for the edge."""
    try:
        parsed = schema.model_validate_json(body or b"null")
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None  # type: ignore[arg-type]
    watch = _disconnect(receive)
    try:
        result = await run_infer(mm, name, to_full(parsed), watch)
    finally:
        watch.cancel()
    payload = orjson.dumps(result, option=JSON_OPTIONS)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
