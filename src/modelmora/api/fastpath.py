"""The inference routes, served straight from ASGI.

FastAPI's routing, dependency and response machinery cost about two thirds of the server's
CPU per inference request (py-spy under `bench/throughput.py`'s null model), and on a small
machine every millisecond the server spends is taken from the model's worker. So the edge
hands `POST /infer/{name}` and `POST /api/v1/infer/{name}` to this handler; the FastAPI routes
of the same paths stay registered for the OpenAPI document. Both use the same schemas, the
same service call and the same error shape.

The binary embedding encodings live here too (`parameters.encoding: base64`, `Accept:
application/x-npy`), built once for the native routes and for `/v1/embeddings`: turning
hundreds of floats per vector into JSON text in the one server process cost more than the
model's own work on a GPU.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from modelmora.api.schemas import InferRequest, ShortInferRequest
from modelmora.contracts.encoding import JSON_OPTIONS
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability.tracing import current_trace_id

if TYPE_CHECKING:
    from modelmora.app import ModelMora

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ROUTES: tuple[tuple[str, type[BaseModel]], ...] = (
    ("/api/v1/infer/", InferRequest),
    ("/infer/", ShortInferRequest),
)
# The schema slot of `POST /v1/embeddings` (its model name is in the body): the edge hands it
# to the fast handler like the native routes, which pass it to api/openai_embeddings.py.
OPENAI_EMBEDDINGS = "openai-embeddings"
NPY_TYPE = b"application/x-npy"
ENCODINGS = ("float", "base64")


def match(method: str, path: str, content_type: bytes = b"") -> tuple[str, Any] | None:
    """(model name, body schema) when this request is a synchronous inference. A multipart
    body (image uploads) gets a `MultipartForm` in place of the JSON schema."""
    if method != "POST":
        return None
    if path == "/v1/embeddings":
        return "", OPENAI_EMBEDDINGS
    for prefix, schema in _ROUTES:
        if path.startswith(prefix):
            name = path[len(prefix) :]
            if name and not name.endswith("/async"):
                if content_type.lower().startswith(b"multipart/form-data"):
                    return name, MultipartForm(content_type)
                return name, schema
    return None


class MultipartForm:
    """`multipart/form-data` for image tasks: one or more `image` file parts, and the other
    request fields as plain parts (`parameters` as JSON text).

    Parsed as the body arrives, by python-multipart's streaming parser, each chunk in a worker
    thread: a body crafted to be slow to parse (tens of thousands of tiny parts) costs a
    thread, never the event loop that answers every other request and health probe. Parts past
    `limits.max_multipart_parts` stop the parse and the read (413)."""

    _SCALARS = ("priority", "timeout_seconds", "keep_alive", "stream")

    def __init__(self, content_type: bytes) -> None:
        self.content_type = content_type

    async def parse(self, chunks: AsyncGenerator[bytes, None], max_parts: int) -> InferRequest:
        form = _FormParts(self.content_type, max_parts)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                await asyncio.to_thread(form.write, chunk)
        form.finish()
        return form.request(self._SCALARS)


class _FormParts:
    """python-multipart's callbacks collecting the parts of one form (used by one thread at a
    time: each chunk is written after the previous one returned)."""

    def __init__(self, content_type: bytes, max_parts: int) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise _form_error("body", "multipart/form-data without a boundary")
        self.max_parts = max_parts
        self.parts: list[tuple[str | None, bytearray]] = []
        self._field = bytearray()
        self._value = bytearray()
        self._disposition: bytes | None = None
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_part_data": self._part_data,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
            },
        )
        self._ended = False

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise _form_error("body", f"malformed multipart body: {exc}") from None

    def finish(self) -> None:
        if self._parser.state != MultipartState.END:
            raise _form_error("body", "multipart body ends before its closing boundary")

    def _part_begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise ModelMoraError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"multipart body has more than {self.max_parts} parts (limits.max_multipart_parts)",
                {"limit_parts": self.max_parts, "setting": "limits.max_multipart_parts"},
            )
        self._disposition = None
        self.parts.append((None, bytearray()))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1][1].extend(data[start:end])

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field.extend(data[start:end])

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value.extend(data[start:end])

    def _header_end(self) -> None:
        if bytes(self._field).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        name = params.get(b"name")
        self.parts[-1] = (name.decode("utf-8", "replace") if name is not None else None, self.parts[-1][1])

    def request(self, scalars: tuple[str, ...]) -> InferRequest:
        images: list[bytes] = []
        fields: dict[str, Any] = {}
        for name, data in self.parts:
            if name == "image":
                images.append(bytes(data))
            elif name == "parameters":
                try:
                    fields["parameters"] = orjson.loads(data or b"{}")
                except orjson.JSONDecodeError:
                    raise _form_error("parameters", "must be a JSON object") from None
            elif name in scalars:
                fields[name] = _form_scalar(name, data.decode("utf-8", "replace").strip())
            else:
                raise _form_error(str(name), "not a field of an inference form")
        if not images:
            raise _form_error("image", "at least one image file part is required")
        input_data: dict[str, Any] = {"image": images[0] if len(images) == 1 else images}
        try:
            return InferRequest.model_validate({"input_data": input_data, **fields})
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False)) from None  # type: ignore[arg-type]


def _form_scalar(name: str, text: str) -> Any:
    """A form field is text: typed here, as strictly as the JSON body's field."""
    if name == "stream":
        if text.lower() not in ("true", "false", "1", "0"):
            raise _form_error(name, "must be true or false")
        return text.lower() in ("true", "1")
    if name == "priority":
        return text
    try:
        return float(text)  # NaN and infinities pass here and are refused by the schema
    except ValueError:
        raise _form_error(name, "must be a number") from None


def _form_error(field: str, message: str) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.VALIDATION_ERROR, f"{field}: {message}", {"errors": [{"field": field, "message": message}]}
    )


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


def open_stream(
    mm: ModelMora, name: str, body: InferRequest, disconnected: asyncio.Future[Any]
) -> AsyncGenerator[dict[str, Any], None]:
    return mm.inference.stream(
        name,
        body.input_data,
        body.parameters,
        priority=body.priority,
        timeout_seconds=body.timeout_seconds,
        keep_alive=body.keep_alive,
        trace_id=current_trace_id.get(),
        disconnected=disconnected,
    )


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event: `event: <kind>` and `data: <json>`, then a blank line."""
    data = orjson.dumps(event["data"], option=JSON_OPTIONS)
    kind: str = event["event"]
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must not hold tokens back
]


async def send_stream(events: AsyncGenerator[dict[str, Any], None], send: Send) -> None:
    """The first event is awaited before the status line: an error before it (bad input,
    queue full, load failure) still gets its own status and JSON body."""
    try:
        first = await anext(events)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": sse(first), "more_body": True})
        async for event in events:
            await send({"type": "http.response.body", "body": sse(event), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await events.aclose()  # a client gone mid-stream: this cancels the work


async def run_infer(
    mm: ModelMora, name: str, body: InferRequest, disconnected: asyncio.Future[Any]
) -> dict[str, Any]:
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


def disconnect_watch(receive: Callable[[], Awaitable[Any]]) -> asyncio.Future[None]:
    """Completes when the client goes away (the body has been read by then, so the next ASGI
    message can only be the disconnect)."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(wait())


# -- binary embeddings ----------------------------------------------------------------------


def float32_le(value: Any) -> np.ndarray:
    """The embeddings as one C-ordered little-endian float32 array (no copy when they are one
    already, as the worker sends them)."""
    return np.ascontiguousarray(value, dtype="<f4")


def b64_float32(array: np.ndarray) -> str:
    """Base64 of the array's row-major little-endian float32 bytes."""
    return binascii.b2a_base64(float32_le(array).data, newline=False).decode("ascii")


def npy_bytes(array: np.ndarray) -> bytes:
    """The array as an `.npy` file (format 1.0), header written by hand: numpy's writer goes
    through a file object and costs more than the header itself."""
    arr = float32_le(array)
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple(arr.shape)!r}, }}"
    # magic (6) + version (2) + length (2) + header + newline, padded to a multiple of 64
    pad = 64 - (10 + len(header) + 1) % 64
    text = (header + " " * (pad % 64) + "\n").encode("latin-1")
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + arr.tobytes()


def take_encoding(body: InferRequest) -> str:
    """`parameters.encoding` (float|base64), removed from the parameters the task sees: it
    says how the response carries embeddings, nothing the model does."""
    encoding = body.parameters.pop("encoding", "float")
    if encoding not in ENCODINGS:
        message = "must be float or base64"
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            f"parameters.encoding: {message}",
            {"errors": [{"field": "parameters.encoding", "message": message}]},
        )
    return str(encoding)


def wants_npy(accept: bytes) -> bool:
    return NPY_TYPE in accept.lower()


def render(response: dict[str, Any], encoding: str, npy: bool) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The response body and its headers: JSON (embeddings as float lists, or one base64
    string plus `result.shape`), or, when asked by `Accept` and the result is embeddings,
    the `.npy` array with metadata and timing in `x-modelmora-metadata`. A result without
    embeddings is JSON whatever was asked (`Accept` is a preference)."""
    result = response["result"]
    embeddings = result.get("embeddings") if isinstance(result, dict) else None
    if embeddings is not None and npy:
        payload = npy_bytes(embeddings)
        meta = orjson.dumps({"metadata": response["metadata"], "timing": response["timing"]})
        return payload, [
            (b"content-type", NPY_TYPE),
            (b"content-length", str(len(payload)).encode()),
            (b"x-modelmora-metadata", meta),
        ]
    if embeddings is not None and encoding == "base64":
        arr = float32_le(embeddings)
        response = {
            **response,
            "result": {**result, "embeddings": b64_float32(arr), "shape": list(arr.shape)},
        }
    payload = orjson.dumps(response, option=JSON_OPTIONS)
    return payload, [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]


async def handle(
    mm: ModelMora,
    name: str,
    schema: Any,
    body: bytes,
    receive: Receive,
    send: Send,
    headers: dict[bytes, bytes],
) -> None:
    """Answer one inference request; errors are raised as ModelMoraError for the edge.
    `schema` is the body's schema, or the request already parsed (a multipart form)."""
    if isinstance(schema, InferRequest):
        parsed: BaseModel = schema
    else:
        try:
            parsed = schema.model_validate_json(body or b"null")
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False)) from None  # type: ignore[arg-type]
    full = to_full(parsed)
    encoding = take_encoding(full)
    watch = disconnect_watch(receive)
    try:
        if full.stream:
            await send_stream(open_stream(mm, name, full, watch), send)
            return
        result = await run_infer(mm, name, full, watch)
    finally:
        watch.cancel()
    payload, response_headers = render(result, encoding, wants_npy(headers.get(b"accept", b"")))
    await send({"type": "http.response.start", "status": 200, "headers": response_headers})
    await send({"type": "http.response.body", "body": payload})
