"""Server-side validation of each task's `input_data` and `parameters`.

Runs before a request is queued, so bad input fails alone, costs no worker round trip and can
never poison a batch. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelmora.config import LimitsSettings
from modelmora.errors import ErrorCode, ModelMoraError


@dataclass(frozen=True, slots=True)
class ParsedInput:
    inputs: list[Any]
    params: dict[str, Any]
    single: bool  # one string in -> one vector out


def _invalid(field: str, message: str) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.VALIDATION_ERROR, f"{field}: {message}", {"errors": [{"field": field, "message": message}]}
    )


def _texts(value: Any, field: str, limits: LimitsSettings) -> tuple[list[str], bool]:
    if value is None:
        raise _invalid(field, "is required")
    single = isinstance(value, str)
    texts = [value] if single else value
    if not isinstance(texts, list):
        raise _invalid(field, "must be a string or a list of strings")
    if not texts:
        raise _invalid(field, "must not be empty")
    if len(texts) > limits.max_items:
        raise ModelMoraError(
            ErrorCode.TOO_MANY_INPUTS,
            f"{field}: {len(texts)} items, at most {limits.max_items} allowed",
            {"field": field, "count": len(texts), "limit": limits.max_items},
        )
    for i, text in enumerate(texts):
        where = field if single else f"{field}[{i}]"
        if not isinstance(text, str):
            raise _invalid(where, "must be a string")
        if not text.strip():
            raise _invalid(where, "must not be empty")
        if len(text) > limits.max_text_chars:
            raise ModelMoraError(
                ErrorCode.INPUT_TOO_LONG,
                f"{where}: {len(text)} characters, at most {limits.max_text_chars} allowed",
                {"field": where, "length": len(text), "limit": limits.max_text_chars},
            )
    return texts, single


def _bool(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise _invalid(f"parameters.{key}", "must be true or false")
    return value


def _no_unknown(params: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            f"unknown parameter(s): {', '.join(unknown)}",
            {"errors": [{"field": f"parameters.{k}", "message": "unknown parameter"} for k in unknown]},
        )


def parse_txt2embed(
    input_data: dict[str, Any], params: dict[str, Any], limits: LimitsSettings
) -> ParsedInput:
    texts, single = _texts(input_data.get("text"), "input_data.text", limits)
    _no_unknown(params, {"normalize"})
    return ParsedInput(texts, {"normalize": _bool(params, "normalize", False)}, single)


_PARSERS = {"txt2embed": parse_txt2embed}
# What each task reads from `input_data`; anything else is refused, never silently dropped.
_INPUT_FIELDS = {"txt2embed": {"text"}}


def parse_input(
    task_type: str, input_data: dict[str, Any], params: dict[str, Any], limits: LimitsSettings
) -> ParsedInput:
    parser = _PARSERS.get(task_type)
    if parser is None:
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            f"task {task_type!r} is registered but not served yet",
            {"task_type": task_type},
        )
    unknown = sorted(set(input_data) - _INPUT_FIELDS[task_type])
    if unknown:
        raise _invalid(f"input_data.{unknown[0]}", f"not an input of {task_type}")
    return parser(input_data, params, limits)
