"""Translate between protobuf messages and the service layer's dicts (REST's JSON shapes).

Both directions live here, used by the servicers and by the SDK's gRPC clients, so the two
ends of a channel cannot disagree. The hot path (Infer) is converted by hand; registry and
status records, which are rare and nested, go through protobuf's JSON mapping.
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar

import numpy as np
import orjson
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from modelmora.contracts.encoding import JSON_OPTIONS
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.v1 import modelmora_pb2 as pb

M = TypeVar("M", bound=Message)

_STRUCT = "google.protobuf.Struct"


# -- Struct <-> dict ----------------------------------------------------------------------------


def _integral(value: Any) -> Any:
    """Struct numbers are doubles; give back ints where the value is whole, as JSON would."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    out: dict[str, Any] = _integral(json_format.MessageToDict(struct))
    return out


def dict_to_struct(data: dict[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if data:
        struct.update(_jsonable(data))
    return struct


def _jsonable(data: Any) -> Any:
    """Plain JSON types only (numpy arrays and the like become lists)."""
    return orjson.loads(orjson.dumps(data, option=JSON_OPTIONS))


def from_dict(data: dict[str, Any], message: M) -> M:
    """A service-layer dict into a typed message; keys the message lacks are dropped."""
    json_format.ParseDict(_jsonable(data), message, ignore_unknown_fields=True)
    return message


def message_to_dict(message: Message) -> dict[str, Any]:
    """A typed message into REST's JSON shape: every field present, unset optionals None,
    64-bit integers as ints (protobuf's own JSON mapping turns them into strings)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: Any, value: Any) -> Any:
    if field.message_type is None:
        return value
    if field.message_type.full_name == _STRUCT:
        return struct_to_dict(value)
    return message_to_dict(value)


# -- inference requests -------------------------------------------------------------------------


def input_to_dict(value: pb.Input) -> dict[str, Any]:
    """REST's `input_data` for an Input message (images as base64, as REST carries them)."""
    kind = value.WhichOneof("value")
    if kind == "text":
        return {"text": value.text}
    if kind == "texts":
        return {"text": list(value.texts.values)}
    if kind == "image":
        return {"image": base64.b64encode(value.image).decode("ascii")}
    if kind == "images":
        return {"image": [base64.b64encode(v).decode("ascii") for v in value.images.values]}
    if kind == "messages":
        return {"messages": [{"role": m.role, "content": m.content} for m in value.messages.values]}
    return {}


def dict_to_input(input_data: dict[str, Any]) -> pb.Input:
    """The SDK's side: REST's `input_data` into an Input message."""
    unknown = set(input_data) - {"text", "image", "messages"}
    if unknown or len(input_data) != 1:
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            "input_data: give exactly one of text, image, messages",
            {"errors": [{"field": "input_data", "message": "exactly one of text, image, messages"}]},
        )
    key, value = next(iter(input_data.items()))
    if key == "text":
        if isinstance(value, str):
            return pb.Input(text=value)
        return pb.Input(texts=pb.TextList(values=list(value)))
    if key == "image":
        if isinstance(value, bytes | str):
            return pb.Input(image=_image_bytes(value))
        return pb.Input(images=pb.ImageList(values=[_image_bytes(v) for v in value]))
    return pb.Input(
        messages=pb.ChatMessages(values=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in value])
    )


def _image_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else base64.b64decode(value)


def request_fields(request: pb.InferRequest) -> dict[str, Any]:
    """The keyword arguments of InferenceService.infer (and of jobs.submit's body)."""
    priority: str | int | None = request.priority or None
    if isinstance(priority, str) and priority.isdigit():
        priority = int(priority)
    return {
        "input_data": input_to_dict(request.input),
        "parameters": struct_to_dict(request.parameters) if request.HasField("parameters") else {},
        "priority": priority,
        "timeout_seconds": request.timeout_seconds if request.HasField("timeout_seconds") else None,
        "keep_alive": request.keep_alive if request.HasField("keep_alive") else None,
    }


def build_request(
    model: str,
    input_data: dict[str, Any],
    parameters: dict[str, Any] | None = None,
    *,
    priority: str | int | None = None,
    timeout_seconds: float | None = None,
    keep_alive: float | None = None,
    request_id: str = "",
) -> pb.InferRequest:
    request = pb.InferRequest(
        model=model,
        input=dict_to_input(input_data),
        priority="" if priority is None else str(priority),
        request_id=request_id,
    )
    if parameters:
        request.parameters.CopyFrom(dict_to_struct(parameters))
    if timeout_seconds is not None:
        request.timeout_seconds = timeout_seconds
    if keep_alive is not None:
        request.keep_alive = keep_alive
    return request


# -- inference responses ------------------------------------------------------------------------


def response_to_proto(response: dict[str, Any]) -> pb.InferResponse:
    """The common response as a message; embeddings as float32 little-endian bytes + dim."""
    out = pb.InferResponse()
    result = response["result"]
    if "embeddings" in result:
        arr = np.asarray(result["embeddings"], dtype="<f4")
        single = arr.ndim == 1
        rows = arr.reshape(1, -1) if single else arr.reshape(arr.shape[0], -1)
        out.result.embeddings.data = rows.tobytes()
        out.result.embeddings.dim = rows.shape[1] if rows.shape[0] else 0
        out.result.embeddings.count = rows.shape[0]
        out.result.embeddings.single = single
    elif "text" in result:
        text = result["text"]
        gen = out.result.generation
        gen.single = isinstance(text, str)
        gen.text.extend([text] if isinstance(text, str) else text)
        gen.finish_reason = str(result.get("finish_reason") or "")
        usage = result.get("usage") or {}
        gen.usage.prompt_tokens = int(usage.get("prompt_tokens", 0))
        gen.usage.completion_tokens = int(usage.get("completion_tokens", 0))
    elif "images" in result:
        imgs = out.result.images
        for image in result["images"]:
            if "url" in image:
                imgs.images.add(url=image["url"])
            else:
                imgs.images.add(data=base64.b64decode(image.get("b64_json", "")))
        imgs.seed = int(result.get("seed") or 0)
    else:
        out.result.other.CopyFrom(dict_to_struct(result))
    meta = response["metadata"]
    m = out.metadata
    m.model = meta["model"]
    if meta.get("version") is not None:
        m.version = meta["version"]
    m.task_type = meta["task_type"]
    if meta.get("device") is not None:
        m.device = meta["device"]
    m.batch_size = int(meta.get("batch_size") or 0)
    m.truncated = int(meta.get("truncated") or 0)
    timing = response["timing"]
    out.timing.queue_time_ms = timing["queue_time_ms"]
    out.timing.inference_time_ms = timing["inference_time_ms"]
    out.timing.total_time_ms = timing["total_time_ms"]
    return out


def response_to_dict(response: pb.InferResponse) -> dict[str, Any]:
    """The SDK's side: the common response, embeddings as a float32 numpy array (a vector for
    one input, a matrix for a list)."""
    kind = response.result.WhichOneof("value")
    result: dict[str, Any]
    if kind == "embeddings":
        e = response.result.embeddings
        arr = np.frombuffer(e.data, dtype="<f4").reshape(e.count, e.dim)
        result = {"embeddings": arr[0] if e.single else arr}
    elif kind == "generation":
        g = response.result.generation
        result = {
            "text": g.text[0] if g.single and g.text else list(g.text),
            "finish_reason": g.finish_reason or None,
            "usage": {"prompt_tokens": g.usage.prompt_tokens, "completion_tokens": g.usage.completion_tokens},
        }
    elif kind == "images":
        images = [
            {"url": i.url}
            if i.WhichOneof("value") == "url"
            else {"b64_json": base64.b64encode(i.data).decode()}
            for i in response.result.images.images
        ]
        result = {"images": images, "seed": response.result.images.seed}
    elif kind == "other":
        result = struct_to_dict(response.result.other)
    else:
        result = {}
    return {
        "result": result,
        "metadata": message_to_dict(response.metadata),
        "timing": message_to_dict(response.timing),
    }


# -- job result chunks -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_result_chunk(total_bytes: int, offset: int, data: bytes, content_type: str = "") -> bytes:
    """A `JobResultChunk` already serialised: exactly the bytes `JobResultChunk(...)
    .SerializeToString()` gives (fields in number order, proto3 defaults left out), so any
    client parses it as the message. Building and serialising the message costs ~1.5 ms per
    MiB chunk (protobuf copies `data` into the message, then into a fresh, page-faulting
    output buffer: ~640 MB/s), which capped GetJobResult at half a plain grpcio stream; one
    join is the only copy here."""
    parts: list[bytes] = []
    if total_bytes:
        parts += (b"\x08", _varint(total_bytes))  # field 1, varint
    if offset:
        parts += (b"\x10", _varint(offset))  # field 2, varint
    if data:
        parts += (b"\x1a", _varint(len(data)), data)  # field 3, length-delimited
    if content_type:
        encoded = content_type.encode()
        parts += (b"\x22", _varint(len(encoded)), encoded)  # field 4, length-delimited
    return b"".join(parts)


# -- errors -------------------------------------------------------------------------------------


def error_to_proto(error: ModelMoraError, trace_id: str | None) -> pb.Error:
    return pb.Error(
        error_code=error.code.value,
        message=error.message,
        details=dict_to_struct(error.details),
        trace_id=trace_id or "",
    )


def error_body_to_proto(body: dict[str, Any]) -> pb.Error:
    return pb.Error(
        error_code=str(body.get("error_code", "")),
        message=str(body.get("message", "")),
        details=dict_to_struct(body.get("details") or {}),
        trace_id=str(body.get("trace_id") or ""),
    )


# -- recent figures (GetStats) ------------------------------------------------------------------

# Series whose points may be absent (no successful request in that slot): None in the dict,
# NaN in the message, since a repeated double has no null.
_GAPPED = ("p50_ms", "p90_ms", "p99_ms", "batch_size")
_SERIES = ("requests_per_second", "errors_per_second", *_GAPPED)


def stats_to_proto(body: dict[str, Any]) -> pb.Stats:
    nan = float("nan")
    models = []
    for m in body["models"]:
        series = {k: [nan if v is None else v for v in m[k]] for k in _SERIES}
        totals = pb.StatsTotals(**{k: v for k, v in m["totals"].items() if v is not None})
        models.append(pb.ModelStats(name=m["name"], totals=totals, **series))
    return pb.Stats(
        window_seconds=body["window_seconds"],
        step_seconds=body["step_seconds"],
        now=body["now"],
        timestamps=body["timestamps"],
        models=models,
    )


def stats_to_dict(message: pb.Stats) -> dict[str, Any]:
    """REST's JSON shape of `GET /api/v1/stats`."""
    models = []
    for m in message.models:
        entry: dict[str, Any] = {"name": m.name}
        for key in _SERIES:
            values = getattr(m, key)
            entry[key] = [None if v != v else v for v in values] if key in _GAPPED else list(values)
        entry["totals"] = message_to_dict(m.totals)
        models.append(entry)
    return {
        "window_seconds": message.window_seconds,
        "step_seconds": message.step_seconds,
        "now": message.now,
        "timestamps": list(message.timestamps),
        "models": models,
    }


# -- the cluster view ---------------------------------------------------------------------------

# REST's `self` (the answering replica's id, and the flag on its row) is `self_id` and
# `is_self` in the message: `self` would clash with the generated classes' own `self`.


def cluster_to_proto(body: dict[str, Any]) -> pb.ClusterView:
    replicas = []
    for row in body["replicas"]:
        fields = {k: v for k, v in row.items() if k != "self"}
        replica = from_dict(fields, pb.ClusterReplica())
        replica.is_self = bool(row.get("self"))
        replicas.append(replica)
    return pb.ClusterView(enabled=body["enabled"], self_id=body["self"], replicas=replicas)


def cluster_to_dict(message: pb.ClusterView) -> dict[str, Any]:
    """REST's JSON shape of `GET /api/v1/cluster`."""
    replicas = []
    for replica in message.replicas:
        row = message_to_dict(replica)
        row["self"] = row.pop("is_self")
        replicas.append(row)
    return {"enabled": message.enabled, "self": message.self_id, "replicas": replicas}
