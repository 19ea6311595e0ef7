"""`POST /v1/embeddings`: OpenAI's embeddings route over the same service call as the native
one, served from the edge's fast path (api/fastpath.py) like native inference.

The vectors are the native API's, bit for bit: `encoding_format: base64` is the little-endian
float32 bytes of each row (fastpath's encoder, shared with `parameters.encoding`), `float`
their JSON numbers. `dimensions` cuts Matryoshka vectors to a size the model's config lists
(`matryoshka_dimensions`) and scales them back to unit length, as OpenAI's shortened
embeddings are. `usage.prompt_tokens` is what the worker's tokenizer counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from pydantic import ValidationError

from modelmora.api import fastpath
from modelmora.api.openai_errors import invalid
from modelmora.api.openai_schemas import EmbeddingsRequest, request_options, text_list, validation_error
from modelmora.contracts.encoding import JSON_OPTIONS
from modelmora.contracts.tasks import TaskType
from modelmora.observability.metrics import current_protocol
from modelmora.observability.tracing import current_trace_id
from modelmora.registry.catalog import ModelRecord, validate_name

if TYPE_CHECKING:
    from modelmora.app import ModelMora

PROTOCOL = "openai"  # the `protocol` label of the inference metrics for `/v1` requests
JSON_HEADERS = (b"content-type", b"application/json")


def header_reader(headers: dict[bytes, bytes]) -> Callable[[str], str | None]:
    def read(name: str) -> str | None:
        value = headers.get(name.encode())
        return value.decode("latin-1") if value is not None else None

    return read


async def handle(
    mm: ModelMora,
    body: bytes,
    receive: fastpath.Receive,
    send: fastpath.Send,
    headers: dict[bytes, bytes],
) -> None:
    """The fast path's answer to `POST /v1/embeddings`; errors are raised for the edge, which
    renders them in OpenAI's shape."""
    try:
        request = EmbeddingsRequest.model_validate_json(body or b"null")
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None  # type: ignore[arg-type]
    options = request_options(header_reader(headers))
    watch = fastpath.disconnect_watch(receive)
    try:
        payload = await embeddings(mm, request, options, watch)
    finally:
        watch.cancel()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [JSON_HEADERS, (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _input_data(record: ModelRecord, value: Any) -> dict[str, Any]:
    """Always a list, so the result is always a matrix (OpenAI answers a list either way)."""
    if record.task_type == TaskType.TXT2EMBED:
        return {"text": text_list(value, "input")[0]}
    if record.task_type == TaskType.IMG2EMBED:
        # An extension: image data URLs (or URLs of allowed hosts), checked as native images.
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            raise invalid("input", "must be an image data URL or a non-empty list of them")
        return {"image": list(items)}
    raise invalid(
        "model", f"{record.name} is a {record.task_type.value} model: embeddings need txt2embed or img2embed"
    )


def _dimensions(record: ModelRecord, dimensions: int | None) -> int | None:
    if dimensions is None:
        return None
    sizes = record.config.get("matryoshka_dimensions")
    if not isinstance(sizes, list) or not sizes:
        raise invalid(
            "dimensions",
            f"model {record.name} declares no Matryoshka sizes (config.matryoshka_dimensions)",
        )
    if dimensions not in sizes:
        listed = ", ".join(str(s) for s in sizes)
        raise invalid("dimensions", f"model {record.name} supports {listed}")
    return dimensions


def shorten(matrix: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` of each row, scaled to unit length."""
    head = matrix[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return fastpath.float32_le(head / np.maximum(norms, 1e-12))


async def embeddings(
    mm: ModelMora, request: EmbeddingsRequest, options: dict[str, Any], disconnected: asyncio.Future[Any]
) -> bytes:
    """The response body: OpenAI's `list` of `embedding` objects, `model` and `usage`."""
    current_protocol.set(PROTOCOL)
    name = validate_name(request.model)
    record = await mm.inference.manager.record(name)
    input_data = _input_data(record, request.input)
    dimensions = _dimensions(record, request.dimensions)
    response = await mm.inference.infer(
        name, input_data, {}, trace_id=current_trace_id.get(), disconnected=disconnected, **options
    )
    matrix = fastpath.float32_le(response["result"]["embeddings"])
    if dimensions is not None:
        matrix = shorten(matrix, dimensions)
    rows: list[Any] = (
        [fastpath.b64_float32(row) for row in matrix] if request.encoding_format == "base64" else list(matrix)
    )
    tokens = int(response["metadata"].get("prompt_tokens") or 0)
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return orjson.dumps(body, option=JSON_OPTIONS)
