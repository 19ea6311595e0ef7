"""The error table every interface shares, checked against the one written in API.md."""

from __future__ import annotations

import pytest

from modelmora.errors import ErrorCode, ModelMoraError

# API.md, "Errors": error_code -> (HTTP, gRPC, retryable).
# MODEL_LOAD_FAILED is "only after Retry-After": not retryable as a plain flag; the error then
# carries `retry_after` when a retry makes sense.
API_TABLE: dict[str, tuple[int, str, bool]] = {
    "VALIDATION_ERROR": (422, "INVALID_ARGUMENT", False),
    "INPUT_TOO_LONG": (422, "INVALID_ARGUMENT", False),
    "TOO_MANY_INPUTS": (422, "INVALID_ARGUMENT", False),
    "PAYLOAD_TOO_LARGE": (413, "RESOURCE_EXHAUSTED", False),
    "INVALID_IMAGE": (422, "INVALID_ARGUMENT", False),
    "UNAUTHORIZED": (401, "UNAUTHENTICATED", False),
    "FORBIDDEN": (403, "PERMISSION_DENIED", False),
    "MODEL_NOT_FOUND": (404, "NOT_FOUND", False),
    "MODEL_EXISTS": (409, "ALREADY_EXISTS", False),
    "MODEL_LOADED": (409, "FAILED_PRECONDITION", False),
    "CHECKSUM_MISMATCH": (503, "DATA_LOSS", False),
    "SOURCE_UNAVAILABLE": (502, "UNAVAILABLE", True),
    "JOB_NOT_FOUND": (404, "NOT_FOUND", False),
    "JOB_NOT_READY": (409, "FAILED_PRECONDITION", False),
    "JOB_FAILED": (409, "FAILED_PRECONDITION", False),
    "JOB_CANCELLED": (409, "FAILED_PRECONDITION", False),
    "IDEMPOTENCY_CONFLICT": (409, "ALREADY_EXISTS", False),
    "QUEUE_FULL": (429, "RESOURCE_EXHAUSTED", True),
    "INSUFFICIENT_MEMORY": (503, "RESOURCE_EXHAUSTED", True),
    "MODEL_LOAD_FAILED": (503, "UNAVAILABLE", False),
    "WORKER_DIED": (503, "UNAVAILABLE", True),
    "INFERENCE_TIMEOUT": (504, "DEADLINE_EXCEEDED", True),
    "CANCELLED": (499, "CANCELLED", False),
    "INFERENCE_FAILED": (500, "INTERNAL", False),
    "SHUTTING_DOWN": (503, "UNAVAILABLE", True),
}

# Codes the server needs beyond API.md's table (unexpected failures, unknown routes,
# cancelling a job that already finished, malformed HTTP and read timeouts at the edge).
EXTRA_CODES = {
    "RATE_LIMITED",
    "INTERNAL_ERROR",
    "NOT_FOUND",
    "METHOD_NOT_ALLOWED",
    "JOB_FINISHED",
    "BAD_REQUEST",
    "REQUEST_TIMEOUT",
}

GRPC_STATUS_NAMES = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
}  # fmt: skip


@pytest.mark.parametrize(("code", "row"), sorted(API_TABLE.items()))
def test_matches_api_table(code: str, row: tuple[int, str, bool]) -> None:
    error = ErrorCode(code)
    assert (error.http_status, error.grpc_status, error.retryable) == row


def test_every_api_code_exists_and_nothing_unexplained() -> None:
    assert {c.value for c in ErrorCode} == set(API_TABLE) | EXTRA_CODES


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_a_complete_row(code: ErrorCode) -> None:
    assert code.value == code.name  # the wire value is the name
    assert isinstance(code.http_status, int) and 400 <= code.http_status <= 599
    assert code.grpc_status in GRPC_STATUS_NAMES and code.grpc_status != "OK"
    assert isinstance(code.retryable, bool)


@pytest.mark.parametrize(
    ("code", "http"),
    [("INTERNAL_ERROR", 500), ("NOT_FOUND", 404), ("METHOD_NOT_ALLOWED", 405)],
)
def test_extra_codes(code: str, http: int) -> None:
    assert ErrorCode(code).http_status == http
    assert ErrorCode(code).retryable is False


def test_to_body_shape() -> None:
    exc = ModelMoraError(ErrorCode.MODEL_NOT_FOUND, "no model 'x'", {"model": "x"}, retry_after=None)
    assert exc.to_body("trace-123") == {
        "error_code": "MODEL_NOT_FOUND",
        "message": "no model 'x'",
        "details": {"model": "x"},
        "trace_id": "trace-123",
    }
    assert list(exc.to_body(None)) == ["error_code", "message", "details", "trace_id"]
    assert exc.to_body(None)["trace_id"] is None


def test_error_defaults_and_attributes() -> None:
    exc = ModelMoraError(ErrorCode.QUEUE_FULL, "busy", retry_after=2.5)
    assert isinstance(exc, Exception)
    assert str(exc) == "busy"
    assert exc.details == {}
    assert exc.to_body("t")["details"] == {}
    assert exc.retry_after == 2.5
    assert exc.code.http_status == 429
    assert "QUEUE_FULL" in repr(exc)
    assert ModelMoraError(ErrorCode.CANCELLED, "x").retry_after is None


def test_details_are_not_shared_between_errors() -> None:
    a = ModelMoraError(ErrorCode.INTERNAL_ERROR, "a")
    b = ModelMoraError(ErrorCode.INTERNAL_ERROR, "b")
    a.details["k"] = 1
    assert b.details == {}
