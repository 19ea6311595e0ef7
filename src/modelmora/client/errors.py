"""Typed errors of the SDK: one shape whichever transport raised them.

Every error carries the server's `error_code`, message, `details` and `trace_id`, plus the HTTP
status (REST) or the gRPC status name (gRPC) and `retry_after` when the server sent one.
"""

from __future__ import annotations

from typing import Any

import orjson

from modelmora.errors import ErrorCode


class ApiError(Exception):
    """An error answered by the server (or the transport failing to reach it)."""

    def __init__(
        self,
        error_code: str | None,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        trace_id: str | None = None,
        http_status: int | None = None,
        grpc_status: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{error_code or grpc_status or http_status}: {message}")
        self.error_code = error_code
        self.message = message
        self.details = details or {}
        self.trace_id = trace_id
        self.http_status = http_status
        self.grpc_status = grpc_status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Per the contract's error table; a transport failure (no answer) is retryable too."""
        if self.error_code is None:
            return isinstance(self, TransportError)
        try:
            return ErrorCode(self.error_code).retryable
        except ValueError:
            return False


class TransportError(ApiError):
    """No answer from the server: connection refused or reset, the channel unavailable."""


class InvalidRequestError(ApiError):
    """VALIDATION_ERROR, INPUT_TOO_LONG, TOO_MANY_INPUTS, PAYLOAD_TOO_LARGE, INVALID_IMAGE."""


class NotFoundError(ApiError):
    """MODEL_NOT_FOUND, JOB_NOT_FOUND."""


class ConflictError(ApiError):
    """MODEL_EXISTS, MODEL_LOADED, JOB_NOT_READY/FAILED/CANCELLED, ..."""


class OverloadedError(ApiError):
    """QUEUE_FULL, INSUFFICIENT_MEMORY, RATE_LIMITED: retried with backoff, honouring Retry-After."""


class UnavailableError(ApiError):
    """MODEL_LOAD_FAILED, WORKER_DIED, SHUTTING_DOWN, SOURCE_UNAVAILABLE, CHECKSUM_MISMATCH."""


class DeadlineError(ApiError):
    """INFERENCE_TIMEOUT, or the call's own deadline passed."""


class InferenceError(ApiError):
    """INFERENCE_FAILED, INTERNAL_ERROR: the model or the server failed on this request."""


class AuthError(ApiError):
    """UNAUTHORIZED, FORBIDDEN."""


class CancelledError(ApiError):
    """CANCELLED."""


_CLASSES: dict[str, type[ApiError]] = {
    **dict.fromkeys(
        ("VALIDATION_ERROR", "INPUT_TOO_LONG", "TOO_MANY_INPUTS", "PAYLOAD_TOO_LARGE", "INVALID_IMAGE"),
        InvalidRequestError,
    ),
    **dict.fromkeys(("MODEL_NOT_FOUND", "JOB_NOT_FOUND", "NOT_FOUND"), NotFoundError),
    **dict.fromkeys(
        (
            "MODEL_EXISTS",
            "MODEL_LOADED",
            "JOB_NOT_READY",
            "JOB_FAILED",
            "JOB_CANCELLED",
            "JOB_FINISHED",
            "IDEMPOTENCY_CONFLICT",
        ),
        ConflictError,
    ),
    **dict.fromkeys(("QUEUE_FULL", "INSUFFICIENT_MEMORY", "RATE_LIMITED"), OverloadedError),
    **dict.fromkeys(
        ("MODEL_LOAD_FAILED", "WORKER_DIED", "SHUTTING_DOWN", "SOURCE_UNAVAILABLE", "CHECKSUM_MISMATCH"),
        UnavailableError,
    ),
    "INFERENCE_TIMEOUT": DeadlineError,
    **dict.fromkeys(("INFERENCE_FAILED", "INTERNAL_ERROR"), InferenceError),
    **dict.fromkeys(("UNAUTHORIZED", "FORBIDDEN"), AuthError),
    "CANCELLED": CancelledError,
}

_GRPC_FALLBACK: dict[str, type[ApiError]] = {
    "UNAVAILABLE": TransportError,
    "DEADLINE_EXCEEDED": DeadlineError,
    "CANCELLED": CancelledError,
    "INVALID_ARGUMENT": InvalidRequestError,
    "RESOURCE_EXHAUSTED": InvalidRequestError,  # a message over grpc's size limit
    "NOT_FOUND": NotFoundError,
}


def error_class(error_code: str | None) -> type[ApiError]:
    return _CLASSES.get(error_code or "", ApiError)


def from_body(body: dict[str, Any], http_status: int, retry_after: str | None) -> ApiError:
    code = body.get("error_code")
    return error_class(code)(
        code,
        str(body.get("message", "")),
        details=body.get("details") or {},
        trace_id=body.get("trace_id"),
        http_status=http_status,
        retry_after=_seconds(retry_after),
    )


def from_rpc_error(error: Any) -> ApiError:
    """A grpc.RpcError (sync or aio) as an ApiError, from its status and trailing metadata."""
    status = error.code()
    md = {k: v for k, v in (error.trailing_metadata() or ())}
    code = md.get("error_code")
    details_raw = md.get("error-details-bin")
    cls = error_class(code) if code else _GRPC_FALLBACK.get(status.name, ApiError)
    return cls(
        code,
        error.details() or "",
        details=orjson.loads(details_raw) if details_raw else {},
        trace_id=md.get("trace_id"),
        grpc_status=status.name,
        retry_after=_seconds(md.get("retry-after")),
    )


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
