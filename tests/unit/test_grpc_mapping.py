"""The gRPC door's pure parts: every error code's status and trailers, the committed generated
code is up to date, and conversions round-trip."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelmora.api.grpc_services import abort, deadline_timeout
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1.convert import (
    build_request,
    encode_result_chunk,
    message_to_dict,
    request_fields,
    response_to_dict,
    response_to_proto,
)


class FakeContext:
    def __init__(self, remaining: float | None = None) -> None:
        self.aborted: tuple[grpc.StatusCode, str, Any] | None = None
        self.remaining = remaining

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.aborted = (code, details, trailing_metadata)
        raise grpc.aio.AbortError()

    def time_remaining(self) -> float | None:
        return self.remaining


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_aborts_with_its_table_status(code: ErrorCode) -> None:
    ctx = FakeContext()
    error = ModelMoraError(code, "boom", {"k": "é"}, retry_after=2.4 if code.retryable else None)
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(abort(ctx, error, "t" * 32))  # type: ignore[arg-type]
    assert ctx.aborted is not None
    status, message, md = ctx.aborted
    assert status == grpc.StatusCode[code.grpc_status] and message == "boom"
    trailers = dict(md)
    assert trailers["error_code"] == code.value and trailers["trace_id"] == "t" * 32
    assert orjson.loads(trailers["error-details-bin"]) == {"k": "é"}
    assert trailers.get("retry-after") == ("2" if code.retryable else None)


def test_the_table_matches_the_contract() -> None:
    expected = {
        "VALIDATION_ERROR": "INVALID_ARGUMENT",
        "PAYLOAD_TOO_LARGE": "RESOURCE_EXHAUSTED",
        "MODEL_NOT_FOUND": "NOT_FOUND",
        "MODEL_EXISTS": "ALREADY_EXISTS",
        "MODEL_LOADED": "FAILED_PRECONDITION",
        "SOURCE_UNAVAILABLE": "UNAVAILABLE",
        "QUEUE_FULL": "RESOURCE_EXHAUSTED",
        "INSUFFICIENT_MEMORY": "RESOURCE_EXHAUSTED",
        "WORKER_DIED": "UNAVAILABLE",
        "INFERENCE_TIMEOUT": "DEADLINE_EXCEEDED",
        "CANCELLED": "CANCELLED",
        "INFERENCE_FAILED": "INTERNAL",
        "SHUTTING_DOWN": "UNAVAILABLE",
        "UNAUTHORIZED": "UNAUTHENTICATED",
        "FORBIDDEN": "PERMISSION_DENIED",
    }
    assert {k: ErrorCode(k).grpc_status for k in expected} == expected


@pytest.mark.parametrize(
    ("requested", "remaining", "expected"),
    [
        (None, None, None),
        (5.0, None, 5.0),
        (None, 2.0, 2.0),
        (5.0, 2.0, 2.0),
        (1.0, 2.0, 1.0),
        (None, -1.0, 0.001),
    ],
)
def test_the_deadline_caps_the_timeout(
    requested: float | None, remaining: float | None, expected: float | None
) -> None:
    assert deadline_timeout(requested, FakeContext(remaining)) == expected  # type: ignore[arg-type]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from modelmora.v1.generate import SRC_ROOT, generate

    for fresh in generate(tmp_path):
        committed = SRC_ROOT / "modelmora" / "v1" / fresh.name
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} is stale: run `python -m modelmora.v1.generate` and commit the result"
        )


def test_requests_and_responses_round_trip() -> None:
    req = build_request(
        "m",
        {"text": ["a", "b"]},
        {"normalize": True, "top_k": 3},
        priority="2",
        timeout_seconds=1.5,
        keep_alive=0,
    )
    assert request_fields(req) == {
        "input_data": {"text": ["a", "b"]},
        "parameters": {"normalize": True, "top_k": 3},
        "priority": 2,
        "timeout_seconds": 1.5,
        "keep_alive": 0.0,
    }
    assert request_fields(pb.InferRequest(model="m"))["timeout_seconds"] is None
    response = {
        "result": {"embeddings": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "metadata": {
            "model": "m",
            "version": None,
            "task_type": "txt2embed",
            "device": "cpu",
            "batch_size": 2,
            "truncated": 0,
        },
        "timing": {"queue_time_ms": 1.0, "inference_time_ms": 2.0, "total_time_ms": 3.5},
    }
    back = response_to_dict(response_to_proto(response))
    assert np.array_equal(back["result"]["embeddings"], response["result"]["embeddings"])
    assert back["metadata"] == response["metadata"] and back["timing"] == response["timing"]
    single = response_to_dict(response_to_proto({**response, "result": {"embeddings": [0.5, 1.5]}}))
    assert single["result"]["embeddings"].tolist() == [0.5, 1.5]
    proto = response_to_proto(response)
    assert proto.result.embeddings.data == np.arange(6, dtype="<f4").tobytes()  # float32 little-endian


def test_message_to_dict_keeps_64_bit_ints_and_nulls() -> None:
    version = pb.ModelVersion(version="v1", size_bytes=2**40, files={"a": "b"})
    assert message_to_dict(version) == {
        "version": "v1",
        "revision": None,
        "origin": "",
        "source_kind": "",
        "path": "",
        "files": {"a": "b"},
        "size_bytes": 2**40,
        "installed_at": "",
    }


@given(
    total=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=300),
    content_type=st.sampled_from(["", "application/json", "é/x"]),
)
def test_a_pre_encoded_result_chunk_is_the_message_s_own_encoding(
    total: int, offset: int, data: bytes, content_type: str
) -> None:
    encoded = encode_result_chunk(total, offset, data, content_type)
    message = pb.JobResultChunk(total_bytes=total, offset=offset, data=data, content_type=content_type)
    assert encoded == message.SerializeToString()
    assert pb.JobResultChunk.FromString(encoded) == message


def test_a_large_pre_encoded_chunk_is_the_message_s_own_encoding() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: a multi-byte length prefix
    encoded = encode_result_chunk(64 << 20, 3 << 20, data)
    assert encoded == pb.JobResultChunk(total_bytes=64 << 20, offset=3 << 20, data=data).SerializeToString()
