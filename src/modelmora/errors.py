"""Error codes shared by every interface (REST, gRPC, CLI, SDK, worker channel).

One table decides the HTTP status, the gRPC status name and whether a client may retry, so
the doors cannot drift apart.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple


class _Meta(NamedTuple):
    http_status: int
    grpc_status: str
    retryable: bool


class ErrorCode(StrEnum):
    VALIDATION_ERROR = "VALIDATION_ERROR"
    INPUT_TOO_LONG = "INPUT_TOO_LONG"
    TOO_MANY_INPUTS = "TOO_MANY_INPUTS"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    INVALID_IMAGE = "INVALID_IMAGE"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_EXISTS = "MODEL_EXISTS"
    MODEL_LOADED = "MODEL_LOADED"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    SOURCE_UNAVAILABLE = "SOURCE_UNAVAILABLE"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    JOB_NOT_READY = "JOB_NOT_READY"
    JOB_FAILED = "JOB_FAILED"
    JOB_CANCELLED = "JOB_CANCELLED"
    JOB_FINISHED = "JOB_FINISHED"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    QUEUE_FULL = "QUEUE_FULL"
    RATE_LIMITED = "RATE_LIMITED"
    INSUFFICIENT_MEMORY = "INSUFFICIENT_MEMORY"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    WORKER_DIED = "WORKER_DIED"
    INFERENCE_TIMEOUT = "INFERENCE_TIMEOUT"
    CANCELLED = "CANCELLED"
    INFERENCE_FAILED = "INFERENCE_FAILED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    NOT_FOUND = "NOT_FOUND"  # no such route
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    BAD_REQUEST = "BAD_REQUEST"  # malformed HTTP, answered before any route
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"  # headers or body not received in time

    @property
    def http_status(self) -> int:
        return _TABLE[self].http_status

    @property
    def grpc_status(self) -> str:
        return _TABLE[self].grpc_status

    @property
    def retryable(self) -> bool:
        return _TABLE[self].retryable


_TABLE: dict[ErrorCode, _Meta] = {
    ErrorCode.VALIDATION_ERROR: _Meta(422, "INVALID_ARGUMENT", False),
    ErrorCode.INPUT_TOO_LONG: _Meta(422, "INVALID_ARGUMENT", False),
    ErrorCode.TOO_MANY_INPUTS: _Meta(422, "INVALID_ARGUMENT", False),
    ErrorCode.PAYLOAD_TOO_LARGE: _Meta(413, "RESOURCE_EXHAUSTED", False),
    ErrorCode.INVALID_IMAGE: _Meta(422, "INVALID_ARGUMENT", False),
    ErrorCode.UNAUTHORIZED: _Meta(401, "UNAUTHENTICATED", False),
    ErrorCode.FORBIDDEN: _Meta(403, "PERMISSION_DENIED", False),
    ErrorCode.MODEL_NOT_FOUND: _Meta(404, "NOT_FOUND", False),
    ErrorCode.MODEL_EXISTS: _Meta(409, "ALREADY_EXISTS", False),
    ErrorCode.MODEL_LOADED: _Meta(409, "FAILED_PRECONDITION", False),
    # The bytes differ from the recorded sha256s: the version cannot be served (a load, and
    # verify/install/lock alike) until it is verified again or reinstalled; not retryable.
    ErrorCode.CHECKSUM_MISMATCH: _Meta(503, "DATA_LOSS", False),
    ErrorCode.SOURCE_UNAVAILABLE: _Meta(502, "UNAVAILABLE", True),
    ErrorCode.JOB_NOT_FOUND: _Meta(404, "NOT_FOUND", False),
    ErrorCode.JOB_NOT_READY: _Meta(409, "FAILED_PRECONDITION", False),
    ErrorCode.JOB_FAILED: _Meta(409, "FAILED_PRECONDITION", False),
    ErrorCode.JOB_CANCELLED: _Meta(409, "FAILED_PRECONDITION", False),
    ErrorCode.JOB_FINISHED: _Meta(409, "FAILED_PRECONDITION", False),
    ErrorCode.IDEMPOTENCY_CONFLICT: _Meta(409, "ALREADY_EXISTS", False),
    ErrorCode.QUEUE_FULL: _Meta(429, "RESOURCE_EXHAUSTED", True),
    ErrorCode.RATE_LIMITED: _Meta(429, "RESOURCE_EXHAUSTED", True),
    ErrorCode.INSUFFICIENT_MEMORY: _Meta(503, "RESOURCE_EXHAUSTED", True),
    ErrorCode.MODEL_LOAD_FAILED: _Meta(503, "UNAVAILABLE", False),
    ErrorCode.WORKER_DIED: _Meta(503, "UNAVAILABLE", True),
    ErrorCode.INFERENCE_TIMEOUT: _Meta(504, "DEADLINE_EXCEEDED", True),
    ErrorCode.CANCELLED: _Meta(499, "CANCELLED", False),
    ErrorCode.INFERENCE_FAILED: _Meta(500, "INTERNAL", False),
    ErrorCode.SHUTTING_DOWN: _Meta(503, "UNAVAILABLE", True),
    ErrorCode.INTERNAL_ERROR: _Meta(500, "INTERNAL", False),
    ErrorCode.NOT_FOUND: _Meta(404, "UNIMPLEMENTED", False),
    ErrorCode.METHOD_NOT_ALLOWED: _Meta(405, "UNIMPLEMENTED", False),
    ErrorCode.BAD_REQUEST: _Meta(400, "INVALID_ARGUMENT", False),
    ErrorCode.REQUEST_TIMEOUT: _Meta(408, "DEADLINE_EXCEEDED", False),
}


class ModelMoraError(Exception):
    """An error a client is meant to see: a code from the table, a message and details."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after

    def to_body(self, trace_id: str | None) -> dict[str, Any]:
        return {
            "error_code": self.code.value,
            "message": self.message,
            "details": self.details,
            "trace_id": trace_id,
        }

    def __repr__(self) -> str:
        return f"ModelMoraError({self.code.value}, {self.message!r})"
