"""Strict request schemas: no bool-as-int, no string-as-bool, finite numbers only, at any depth."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from modelmora.api.fastpath import validation_error
from modelmora.api.schemas import (
    InferRequest,
    RegisterModelRequest,
    ShortInferRequest,
    UpdateModelRequest,
)
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.queue import Priority, parse_priority


def _refused(schema: type[BaseModel], body: bytes) -> list[str]:
    """The fields named by the VALIDATION_ERROR the body earns (as both doors build it)."""
    with pytest.raises(ValidationError) as info:
        schema.model_validate_json(body)
    error = validation_error(info.value.errors(include_url=False))  # type: ignore[arg-type]
    assert error.code is ErrorCode.VALIDATION_ERROR
    # A union field is named once per member (`priority.str`, `priority.int`): keep the field.
    return [e["field"].split(".")[0] for e in error.details["errors"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"input_data": {"text": "a"}, "priority": true}', "priority"),
        (b'{"input_data": {"text": "a"}, "priority": 1.0}', "priority"),
        (b'{"input_data": {"text": "a"}, "stream": "true"}', "stream"),
        (b'{"input_data": {"text": "a"}, "stream": 1}', "stream"),
        (b'{"input_data": {"text": "a"}, "keep_alive": Infinity}', "keep_alive"),
        (b'{"input_data": {"text": "a"}, "keep_alive": NaN}', "keep_alive"),
        (b'{"input_data": {"text": "a"}, "keep_alive": 1e999}', "keep_alive"),
        (b'{"input_data": {"text": "a"}, "timeout_seconds": -Infinity}', "timeout_seconds"),
        (b'{"input_data": {"text": "a"}, "timeout_seconds": "5"}', "timeout_seconds"),
        (b'{"input_data": {"text": "a"}, "parameters": {"t": {"x": [1, NaN]}}}', "parameters"),
        (b'{"input_data": {"text": "a", "w": Infinity}}', "input_data"),
    ],
)
def test_infer_request_is_strict(body: bytes, field: str) -> None:
    assert field in _refused(InferRequest, body)


def test_short_form_and_registry_bodies_are_strict() -> None:
    assert "priority" in _refused(ShortInferRequest, b'{"text": "a", "priority": false}')
    assert "parameters" in _refused(ShortInferRequest, b'{"text": "a", "parameters": {"t": NaN}}')
    assert "config" in _refused(RegisterModelRequest, b'{"source": "/x", "config": {"keep_alive": Infinity}}')
    assert "name" in _refused(RegisterModelRequest, b'{"source": "/x", "name": 5}')
    assert "resource_requirements" in _refused(
        UpdateModelRequest, b'{"resource_requirements": {"ram_mb": NaN}}'
    )


def test_valid_bodies_still_pass() -> None:
    body = InferRequest.model_validate_json(
        b'{"input_data": {"text": ["a"]}, "parameters": {"normalize": true, "t": 0.5},'
        b' "priority": "high", "timeout_seconds": 5, "keep_alive": -1, "stream": false}'
    )
    assert body.timeout_seconds == 5.0 and body.keep_alive == -1.0 and body.priority == "high"
    assert InferRequest.model_validate_json(b'{"input_data": {"text": "a"}, "priority": 2}').priority == 2


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, b"1", ["1"], "9" * 5000, "1" + "0" * 20])
def test_parse_priority_refuses_what_is_not_a_priority(value: object) -> None:
    with pytest.raises(ModelMoraError) as info:
        parse_priority(value)
    assert info.value.code is ErrorCode.VALIDATION_ERROR


def test_parse_priority_accepts_names_and_levels() -> None:
    assert parse_priority(" High ") is Priority.HIGH
    assert parse_priority("4") is Priority.LOW
    assert parse_priority(1) is Priority.CRITICAL
    assert parse_priority(None) is Priority.NORMAL
