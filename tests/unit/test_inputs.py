"""parse_input: each task's input_data and parameters checked before anything is queued."""

from __future__ import annotations

from typing import Any

import pytest

from modelmora.config import LimitsSettings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.tasks.inputs import ParsedInput
from modelmora.tasks.specs import parse_input

LIMITS = LimitsSettings(max_items=3, max_text_chars=10)


def parse(input_data: Any, params: Any = None, task: str = "txt2embed") -> ParsedInput:
    return parse_input(task, input_data, params if params is not None else {}, LIMITS)


@pytest.mark.parametrize(
    ("input_data", "params", "inputs", "single", "normalize"),
    [
        ({"text": "hello"}, {}, ["hello"], True, False),
        ({"text": ["a", "b"]}, {}, ["a", "b"], False, False),
        ({"text": ["only"]}, {}, ["only"], False, False),  # a list of one is still a list
        ({"text": "hi"}, {"normalize": True}, ["hi"], True, True),
        ({"text": ["a", "b", "c"]}, {"normalize": False}, ["a", "b", "c"], False, False),  # == max_items
        ({"text": "x" * 10}, {}, ["x" * 10], True, False),  # == max_text_chars
        ({"text": "  padded  "}, {}, ["  padded  "], True, False),  # kept as given
    ],
)
def test_txt2embed_accepts(
    input_data: dict[str, Any], params: dict[str, Any], inputs: list[str], single: bool, normalize: bool
) -> None:
    parsed = parse(input_data, params)
    assert parsed.inputs == inputs
    assert parsed.single is single
    assert parsed.params == {"normalize": normalize}


@pytest.mark.parametrize(
    ("input_data", "params", "code", "field"),
    [
        ({}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text"),
        ({"text": None}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text"),
        ({"text": ""}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text"),
        ({"text": "   \n\t"}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text"),
        ({"text": []}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text"),
        ({"text": 42}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text"),
        ({"text": {"a": 1}}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text"),
        ({"text": ("a", "b")}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text"),
        ({"text": ["ok", 3]}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text[1]"),
        ({"text": ["ok", None]}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text[1]"),
        ({"text": [["nested"]]}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text[0]"),
        ({"text": ["ok", " "]}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text[1]"),
        ({"text": ["ok", ""]}, {}, ErrorCode.VALIDATION_ERROR, "input_data.text[1]"),
        ({"text": "hi", "bogus": 1}, {}, ErrorCode.VALIDATION_ERROR, "input_data.bogus"),
        ({"text": "hi"}, {"bogus": 1}, ErrorCode.VALIDATION_ERROR, "parameters.bogus"),
        ({"text": "hi"}, {"normalize": "yes"}, ErrorCode.VALIDATION_ERROR, "parameters.normalize"),
        ({"text": "hi"}, {"normalize": 1}, ErrorCode.VALIDATION_ERROR, "parameters.normalize"),
        ({"text": "hi"}, {"normalize": None}, ErrorCode.VALIDATION_ERROR, "parameters.normalize"),
        ({"text": ["a", "b", "c", "d"]}, {}, ErrorCode.TOO_MANY_INPUTS, "input_data.text"),
        ({"text": "x" * 11}, {}, ErrorCode.INPUT_TOO_LONG, "input_data.text"),
        ({"text": ["ok", "x" * 11]}, {}, ErrorCode.INPUT_TOO_LONG, "input_data.text[1]"),
    ],
)
def test_txt2embed_rejects(
    input_data: dict[str, Any], params: dict[str, Any], code: ErrorCode, field: str
) -> None:
    with pytest.raises(ModelMoraError) as info:
        parse(input_data, params)
    exc = info.value
    assert exc.code is code
    assert field.rsplit(".", 1)[-1] in exc.message  # the message names the field too
    if code is ErrorCode.VALIDATION_ERROR:
        assert exc.details["errors"][0]["field"] == field
    else:
        assert exc.details["field"] == field


def test_limits_are_reported() -> None:
    with pytest.raises(ModelMoraError) as info:
        parse({"text": ["a"] * 5})
    assert info.value.details == {"field": "input_data.text", "count": 5, "limit": 3}
    with pytest.raises(ModelMoraError) as info:
        parse({"text": "y" * 12})
    assert info.value.details == {"field": "input_data.text", "length": 12, "limit": 10}


def test_every_unknown_parameter_is_listed() -> None:
    with pytest.raises(ModelMoraError) as info:
        parse({"text": "hi"}, {"zeta": 1, "alpha": 2, "normalize": True})
    fields = [e["field"] for e in info.value.details["errors"]]
    assert fields == ["parameters.alpha", "parameters.zeta"]


def test_default_limits_allow_ordinary_input() -> None:
    parsed = parse_input("txt2embed", {"text": ["a"] * 256}, {}, LimitsSettings())
    assert len(parsed.inputs) == 256
