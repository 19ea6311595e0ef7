"""The `/v1` error shape, the refusal of unsupported OpenAI fields, and the binary embedding
encodings of the native API, on their own (tests/e2e/test_openai.py drives them through a
real server and the official client)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import orjson
import pytest

from modelmora.api import fastpath, openai_errors
from modelmora.api.edge import EdgeLimits, EdgeMiddleware
from modelmora.api.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ImageRequest,
    refuse_unsupported,
    request_options,
    text_list,
)
from modelmora.client.ops import with_numpy
from modelmora.errors import ErrorCode, ModelMoraError


def _invalid(field: str, message: str) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.VALIDATION_ERROR, f"{field}: {message}", {"errors": [{"field": field, "message": message}]}
    )


def test_validation_errors_are_400_with_the_field_as_the_client_named_it() -> None:
    status, _, body = openai_errors.error_response_parts(
        _invalid("input_data.text[2]", "must not be empty"), "/v1/embeddings"
    )
    assert status == 400
    assert orjson.loads(body) == {
        "error": {
            "message": "input[2]: must not be empty",
            "type": "invalid_request_error",
            "param": "input[2]",
            "code": "VALIDATION_ERROR",
        }
    }
    _, _, body = openai_errors.error_response_parts(
        _invalid("parameters.top_p", "must be > 0 and <= 1"), "/v1/chat/completions"
    )
    assert orjson.loads(body)["error"]["param"] == "top_p"
    _, _, body = openai_errors.error_response_parts(_invalid("input_data.text", "x"), "/v1/completions")
    assert orjson.loads(body)["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (ErrorCode.MODEL_NOT_FOUND, 404, "not_found_error"),
        (ErrorCode.UNAUTHORIZED, 401, "authentication_error"),
        (ErrorCode.QUEUE_FULL, 429, "rate_limit_error"),
        (ErrorCode.PAYLOAD_TOO_LARGE, 413, "invalid_request_error"),
        (ErrorCode.SHUTTING_DOWN, 503, "server_error"),
        (ErrorCode.INPUT_TOO_LONG, 400, "invalid_request_error"),
    ],
)
def test_native_codes_keep_their_status_and_become_code(code: ErrorCode, status: int, kind: str) -> None:
    error = ModelMoraError(code, "nope", retry_after=2 if code == ErrorCode.QUEUE_FULL else None)
    got_status, headers, body = openai_errors.error_response_parts(error, "/v1/models")
    assert got_status == status
    assert orjson.loads(body)["error"] == {"message": "nope", "type": kind, "param": None, "code": code.value}
    assert (b"retry-after", b"2") in headers if code == ErrorCode.QUEUE_FULL else True


class _Counter:
    inflight = 0


async def _never_called(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the edge answers this itself")


async def _edge_answer(path: str) -> tuple[int, dict[bytes, bytes], Any]:
    edge = EdgeMiddleware(
        _never_called,
        max_body=1 << 20,
        is_draining=lambda: True,
        counter=_Counter(),
        limits=EdgeLimits(1 << 20),
    )
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    await edge(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), orjson.loads(sent[1]["body"])


async def test_the_edges_own_errors_take_the_openai_shape_on_v1_paths() -> None:
    status, headers, body = await _edge_answer("/v1/chat/completions")
    assert status == 503
    assert body == {
        "error": {
            "message": "the server is shutting down",
            "type": "server_error",
            "param": None,
            "code": "SHUTTING_DOWN",
        }
    }
    assert headers[b"retry-after"] == b"5"
    assert len(headers[b"x-trace-id"]) == 32  # the trace id travels in a header
    status, _, native = await _edge_answer("/api/v1/infer/m")
    assert status == 503
    assert native["error_code"] == "SHUTTING_DOWN" and native["trace_id"]


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"logprobs": False},
        {"n": 1},
        {"tools": []},
        {"presence_penalty": 0.0},
        {"frequency_penalty": 0},
        {"response_format": {"type": "text"}},
        {"tool_choice": "none"},
        {"user": "someone"},
    ],
)
def test_neutral_values_of_unsupported_fields_pass(fields: dict[str, Any]) -> None:
    refuse_unsupported(_chat(**fields))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ],
)
def test_unsupported_fields_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ModelMoraError) as caught:
        refuse_unsupported(_chat(**fields))
    body = openai_errors.error_body(caught.value, "/v1/chat/completions")["error"]
    assert body["param"] == param
    assert body["message"].startswith(f"{param}: not supported")


def test_completion_and_image_fields() -> None:
    with pytest.raises(ModelMoraError, match="echo"):
        refuse_unsupported(CompletionRequest.model_validate({"model": "m", "prompt": "p", "echo": True}))
    refuse_unsupported(
        ImageRequest.model_validate({"model": "m", "prompt": "p", "n": 3, "quality": "standard"})
    )
    with pytest.raises(ModelMoraError, match="style"):
        refuse_unsupported(ImageRequest.model_validate({"model": "m", "prompt": "p", "style": "vivid"}))


def test_text_inputs_and_token_ids() -> None:
    assert text_list("a", "input") == (["a"], True)
    assert text_list(["a", "b"], "input") == (["a", "b"], False)
    for tokens in ([1, 2, 3], [[1, 2], [3]]):
        with pytest.raises(ModelMoraError, match="token-id"):
            text_list(tokens, "input")
    for bad in ([], 3, ["a", 2], None):
        with pytest.raises(ModelMoraError, match="must be a string"):
            text_list(bad, "input")


def test_request_headers_give_priority_and_deadline() -> None:
    headers = {"x-modelmora-priority": "critical", "x-modelmora-timeout-seconds": "2.5"}
    assert request_options(headers.get) == {"priority": "critical", "timeout_seconds": 2.5}
    assert request_options({"x-modelmora-priority": "1"}.get) == {"priority": 1}
    assert request_options({}.get) == {}
    for bad in ("0", "-3", "soon", "1e9"):
        with pytest.raises(ModelMoraError, match="x-modelmora-timeout-seconds"):
            request_options({"x-modelmora-timeout-seconds": bad}.get)


# -- binary embeddings ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(384,), (32, 1024), (3, 7), (1, 1)])
def test_npy_bytes_load_with_numpy(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).standard_normal(shape)  # float64: written as float32
    data = fastpath.npy_bytes(array)
    loaded = np.load(io.BytesIO(data))
    assert loaded.dtype == np.dtype("<f4") and loaded.shape == shape
    assert np.array_equal(loaded, array.astype(np.float32))


def _response(embeddings: Any) -> dict[str, Any]:
    return {
        "result": {"embeddings": embeddings},
        "metadata": {"model": "m", "batch_size": 2},
        "timing": {"queue_time_ms": 1.0, "inference_time_ms": 2.0, "total_time_ms": 3.0},
    }


def test_base64_and_npy_carry_the_same_floats_as_json() -> None:
    matrix = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    as_json, _ = fastpath.render(_response(matrix), "float", npy=False)
    as_b64, headers = fastpath.render(_response(matrix), "base64", npy=False)
    as_npy, npy_headers = fastpath.render(_response(matrix), "float", npy=True)

    floats = np.asarray(orjson.loads(as_json)["result"]["embeddings"], dtype=np.float32)
    b64 = orjson.loads(as_b64)["result"]
    assert b64["shape"] == [4, 16]
    decoded = np.frombuffer(base64.b64decode(b64["embeddings"]), dtype="<f4").reshape(b64["shape"])
    assert np.array_equal(decoded, floats) and np.array_equal(floats, matrix)
    assert np.array_equal(np.load(io.BytesIO(as_npy)), matrix)
    meta = orjson.loads(dict(npy_headers)[b"x-modelmora-metadata"])
    assert meta == {"metadata": _response(matrix)["metadata"], "timing": _response(matrix)["timing"]}
    assert dict(npy_headers)[b"content-type"] == b"application/x-npy"
    assert dict(headers)[b"content-type"] == b"application/json"
    # The SDK's decoding gives the same array for every encoding.
    assert np.array_equal(with_numpy(orjson.loads(as_b64))["result"]["embeddings"], matrix)
    assert "shape" not in with_numpy(orjson.loads(as_b64))["result"]


def test_a_result_without_embeddings_is_json_whatever_was_asked() -> None:
    response = {**_response(None), "result": {"text": "hi"}}
    body, headers = fastpath.render(response, "base64", npy=True)
    assert dict(headers)[b"content-type"] == b"application/json"
    assert orjson.loads(body)["result"] == {"text": "hi"}


def test_an_unknown_encoding_is_refused_naming_it() -> None:
    from modelmora.api.schemas import InferRequest

    body = InferRequest.model_validate({"input_data": {"text": "a"}, "parameters": {"encoding": "npy"}})
    with pytest.raises(ModelMoraError) as caught:
        fastpath.take_encoding(body)
    assert caught.value.details["errors"][0]["field"] == "parameters.encoding"
    ok = InferRequest.model_validate({"input_data": {"text": "a"}, "parameters": {"encoding": "base64"}})
    assert fastpath.take_encoding(ok) == "base64" and ok.parameters == {}
