"""The error shape of the OpenAI-compatible routes (`/v1/...`): the one declared exception to
ModelMora's own error body.

Clients written for OpenAI (its SDKs, LangChain, ...) read `{"error": {"message", "type",
"param", "code"}}` and map the HTTP status to their exception classes, and they expect 400
for a bad request where ModelMora answers 422. So on `/v1` paths every error, the edge's own
early ones included (401, 413, 503 while draining), is rendered here: the native
`error_code` becomes `code`, the field a validation error names becomes `param` (spelled as
the OpenAI request spells it), and the trace id stays in the `x-trace-id` header that the
edge adds to every response.
"""

from __future__ import annotations

from typing import Any

import orjson

from modelmora.errors import ErrorCode, ModelMoraError

V1_PREFIX = "/v1/"

# Refusals of the request itself: OpenAI and vLLM answer them with 400.
_BAD_REQUEST = frozenset(
    {
        ErrorCode.VALIDATION_ERROR,
        ErrorCode.INPUT_TOO_LONG,
        ErrorCode.TOO_MANY_INPUTS,
        ErrorCode.INVALID_IMAGE,
        ErrorCode.BAD_REQUEST,
    }
)

# OpenAI's error `type` by HTTP status (its SDKs pick the exception class by status alone).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled_error",
    504: "timeout_error",
}

# Native field names as the OpenAI request names them, per route: the service checks
# `input_data.text` and `parameters.max_tokens`; the client sent `input` and `max_tokens`.
_INPUT_NAMES = {
    "/v1/embeddings": {"input_data.text": "input", "input_data.image": "input"},
    "/v1/completions": {"input_data.text": "prompt"},
    "/v1/chat/completions": {"input_data.messages": "messages", "input_data.image": "messages"},
    "/v1/images/generations": {
        "input_data.text": "prompt",
        "parameters.num_images": "n",
        "parameters.width": "size",
        "parameters.height": "size",
    },
}


def is_v1(path: str) -> bool:
    return path.startswith(V1_PREFIX)


def status_of(error: ModelMoraError) -> int:
    return 400 if error.code in _BAD_REQUEST else error.code.http_status


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_param(field: str | None, path: str) -> str | None:
    """`input_data.text[3]` -> `input[3]` on /v1/embeddings; `parameters.top_p` -> `top_p`."""
    if not field or field == "body":
        return None
    for native, name in _INPUT_NAMES.get(path.rstrip("/"), {}).items():
        if field == native or field.startswith((native + "[", native + ".")):
            return name + field[len(native) :]
    return field.removeprefix("parameters.")


def _field(details: dict[str, Any]) -> str | None:
    errors = details.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("field") or "") or None
    field = details.get("field")
    return str(field) if field else None


def error_body(error: ModelMoraError, path: str) -> dict[str, Any]:
    status = status_of(error)
    field = _field(error.details)
    param = openai_param(field, path)
    message = error.message
    if field and param and message.startswith(field + ":"):  # say it as the client wrote it
        message = param + message[len(field) :]
    return {
        "error": {"message": message, "type": error_type(status), "param": param, "code": error.code.value}
    }


def error_response_parts(error: ModelMoraError, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of an error on a `/v1` path; the edge adds the trace headers."""
    body = orjson.dumps(error_body(error, path))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
    if error.code is ErrorCode.UNAUTHORIZED:  # RFC 6750: how to authenticate
        headers.append((b"www-authenticate", b'Bearer realm="modelmora"'))
    return status_of(error), headers, body


def stream_error(error: ModelMoraError, path: str) -> bytes:
    """An error after a stream has started (its status is already sent): one `data:` event
    with the error body, as vLLM sends it; the stream then ends with `data: [DONE]`."""
    return b"data: " + orjson.dumps(error_body(error, path)) + b"\n\n"


def unsupported(field: str, why: str = "") -> ModelMoraError:
    """A request field this server does not implement: refused, naming it, never ignored."""
    message = f"{field}: not supported by ModelMora" + (f" ({why})" if why else "")
    return ModelMoraError(
        ErrorCode.VALIDATION_ERROR, message, {"errors": [{"field": field, "message": "not supported"}]}
    )


def invalid(field: str, message: str) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.VALIDATION_ERROR, f"{field}: {message}", {"errors": [{"field": field, "message": message}]}
    )
