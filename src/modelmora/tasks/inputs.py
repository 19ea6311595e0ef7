"""Server-side validation of each task's `input_data` and `parameters`: the parsers that the
task specs (`tasks/specs.py`) name.

Runs before a request is queued, so bad input fails alone, costs no worker round trip and can
never poison a batch. Pure: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.tasks.images import b64_bytes, check_decoded_total, check_image

if TYPE_CHECKING:  # the worker imports the task specs, and with them this module: no pydantic there
    from modelmora.config import LimitsSettings


@dataclass(frozen=True, slots=True)
class ParsedInput:
    inputs: list[Any]
    params: dict[str, Any]
    single: bool  # one string in -> one vector out
    # Requests batch together only when their groups are equal (see inference/batcher.py):
    # None for "anything of this task", a key when the parameters must match.
    group: Hashable | None = None


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
    _check_count(field, len(texts), limits)
    for i, text in enumerate(texts):
        where = field if single else f"{field}[{i}]"
        if not isinstance(text, str):
            raise _invalid(where, "must be a string")
        if not text.strip():
            raise _invalid(where, "must not be empty")
        _check_length(where, text, limits)
    return texts, single


def _check_count(field: str, count: int, limits: LimitsSettings, what: str = "items") -> None:
    if count > limits.max_items:
        raise ModelMoraError(
            ErrorCode.TOO_MANY_INPUTS,
            f"{field}: {count} {what}, at most {limits.max_items} allowed",
            {"field": field, "count": count, "limit": limits.max_items},
        )


def _check_length(field: str, text: str, limits: LimitsSettings) -> None:
    if len(text) > limits.max_text_chars:
        raise ModelMoraError(
            ErrorCode.INPUT_TOO_LONG,
            f"{field}: {len(text)} characters, at most {limits.max_text_chars} allowed",
            {"field": field, "length": len(text), "limit": limits.max_text_chars},
        )


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


def _number(
    params: dict[str, Any],
    key: str,
    default: float | None,
    low: float,
    high: float,
    *,
    integer: bool = False,
    low_open: bool = False,
) -> Any:
    """A numeric parameter within [low, high] ((low, high] when `low_open`), or its default."""
    value = params.get(key, default)
    if value is None:
        return None
    field = f"parameters.{key}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(field, "must be an integer" if integer else "must be a number")
    if integer and not float(value).is_integer():
        raise _invalid(field, "must be an integer")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise _invalid(field, f"must be {bound} and <= {high:g}")
    return int(value) if integer else float(value)


MAX_NEW_TOKENS = 4096
MAX_STOPS = 4
MAX_SEED = 2**63 - 1


def generation_params(params: dict[str, Any], extra: set[str] | None = None) -> dict[str, Any]:
    """The sampling parameters of txt2txt and img2txt, each range-checked. temperature 0 is
    greedy decoding; top_k 0 and top_p 1 switch those filters off."""
    _no_unknown(
        params,
        {"max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "repetition_penalty"}
        | (extra or set()),
    )
    stop = params.get("stop")
    stops: list[str] = []
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOPS:
            raise _invalid("parameters.stop", f"must be a string or a list of at most {MAX_STOPS} strings")
        for i, text in enumerate(stops):
            if not isinstance(text, str) or not text or len(text) > 256:
                raise _invalid(
                    f"parameters.stop[{i}]", "must be a non-empty string of at most 256 characters"
                )
    return {
        "max_tokens": _number(params, "max_tokens", 64, 1, MAX_NEW_TOKENS, integer=True),
        "temperature": _number(params, "temperature", 1.0, 0, 2),
        "top_p": _number(params, "top_p", 1.0, 0, 1, low_open=True),
        "top_k": _number(params, "top_k", 0, 0, 1000, integer=True),
        "repetition_penalty": _number(params, "repetition_penalty", 1.0, 0, 10, low_open=True),
        "seed": _number(params, "seed", None, 0, MAX_SEED, integer=True),
        "stop": stops,
    }


def generation_group(gen: dict[str, Any]) -> Hashable | None:
    """Seeded sampling is batched only with identical sampling parameters and seed (API.md);
    everything else batches freely (each row samples with its own generator anyway)."""
    if gen["seed"] is None or gen["temperature"] == 0:
        return None
    return ("seeded", gen["temperature"], gen["top_p"], gen["top_k"], gen["repetition_penalty"], gen["seed"])


ROLES = frozenset({"system", "user", "assistant", "tool"})


def _messages(value: Any, limits: LimitsSettings) -> list[dict[str, str]]:
    field = "input_data.messages"
    if not isinstance(value, list) or not value:
        raise _invalid(field, "must be a non-empty list of {role, content}")
    _check_count(field, len(value), limits, "messages")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise _invalid(where, "must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _invalid(f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}")
        if not isinstance(content, str):
            raise _invalid(f"{where}.content", "must be a string")
        _check_length(f"{where}.content", content, limits)
        out.append({"role": role, "content": content})
    return out


def parse_txt2txt(input_data: dict[str, Any], params: dict[str, Any], limits: LimitsSettings) -> ParsedInput:
    gen = generation_params(params)
    if "messages" in input_data:
        if "text" in input_data:
            raise _invalid("input_data", "give either text or messages, not both")
        chat = {"messages": _messages(input_data["messages"], limits)}
        return ParsedInput([chat], gen, True, generation_group(gen))
    texts, single = _texts(input_data.get("text"), "input_data.text", limits)
    return ParsedInput(list(texts), gen, single, generation_group(gen))


def _images(value: Any, limits: LimitsSettings) -> tuple[list[bytes], bool]:
    """Base64 strings (or bytes, from a multipart upload or an allowed URL), checked."""
    field = "input_data.image"
    if value is None:
        raise _invalid(field, "is required")
    single = isinstance(value, str | bytes)
    images = [value] if single else value
    if not isinstance(images, list) or not images:
        raise _invalid(field, "must be a base64 string or a non-empty list of them")
    _check_count(field, len(images), limits)
    infos = []
    for i, image in enumerate(images):
        where = field if single else f"{field}[{i}]"
        if isinstance(image, str):
            if image.startswith(("http://", "https://")):
                raise _invalid(where, "image URLs from this host are not allowed")
            data = b64_bytes(image, where, limits.max_image_bytes)
        elif isinstance(image, bytes):
            if len(image) > limits.max_image_bytes:
                raise ModelMoraError(
                    ErrorCode.INVALID_IMAGE,
                    f"{where}: {len(image)} bytes, at most {limits.max_image_bytes} allowed",
                    {"field": where, "limit_bytes": limits.max_image_bytes},
                )
            data = image
        else:
            raise _invalid(where, "must be a base64 string")
        cap = limits.max_decoded_image_bytes_per_request
        infos.append(check_image(data, where, limits.max_image_pixels, cap))
    check_decoded_total(infos, field, limits.max_decoded_image_bytes_per_request)
    return [i.data for i in infos], single


def parse_img2embed(
    input_data: dict[str, Any], params: dict[str, Any], limits: LimitsSettings
) -> ParsedInput:
    images, single = _images(input_data.get("image"), limits)
    _no_unknown(params, {"normalize"})
    return ParsedInput(images, {"normalize": _bool(params, "normalize", False)}, single)


def parse_img2txt(input_data: dict[str, Any], params: dict[str, Any], limits: LimitsSettings) -> ParsedInput:
    images, single = _images(input_data.get("image"), limits)
    gen = generation_params(params)
    return ParsedInput(images, gen, single, generation_group(gen))


MAX_SIDE = 4096
MAX_STEPS = 500
MAX_IMAGES = 8


def parse_txt2img(input_data: dict[str, Any], params: dict[str, Any], limits: LimitsSettings) -> ParsedInput:
    prompt = input_data.get("text")
    if not isinstance(prompt, str):
        raise _invalid("input_data.text", "must be a prompt string")
    texts, _ = _texts(prompt, "input_data.text", limits)
    _no_unknown(
        params,
        {
            "width",
            "height",
            "steps",
            "guidance_scale",
            "negative_prompt",
            "seed",
            "num_images",
            "response_format",
        },
    )
    out: dict[str, Any] = {
        "width": _number(params, "width", None, 8, MAX_SIDE, integer=True),
        "height": _number(params, "height", None, 8, MAX_SIDE, integer=True),
        "steps": _number(params, "steps", 25, 1, MAX_STEPS, integer=True),
        "guidance_scale": _number(params, "guidance_scale", 7.5, 0, 50),
        "seed": _number(params, "seed", None, 0, MAX_SEED, integer=True),
        "num_images": _number(params, "num_images", 1, 1, min(MAX_IMAGES, limits.max_items), integer=True),
    }
    for side in ("width", "height"):
        if out[side] is not None and out[side] % 8:
            raise _invalid(f"parameters.{side}", "must be a multiple of 8")
    if out["width"] and out["height"] and out["width"] * out["height"] > limits.max_image_pixels:
        raise _invalid("parameters.width", f"width x height must be at most {limits.max_image_pixels} pixels")
    negative = params.get("negative_prompt")
    if negative is not None and (not isinstance(negative, str) or len(negative) > limits.max_text_chars):
        raise _invalid(
            "parameters.negative_prompt", f"must be a string of at most {limits.max_text_chars} characters"
        )
    out["negative_prompt"] = negative
    fmt = params.get("response_format", "url")
    if fmt not in ("url", "b64_json"):
        raise _invalid("parameters.response_format", "must be url or b64_json")
    out["response_format"] = fmt
    # One pipeline call shares its size, steps and guidance: only those must match.
    group = ("txt2img", out["width"], out["height"], out["steps"], out["guidance_scale"])
    return ParsedInput(texts, out, True, group)


def refuse_unknown_fields(task: str, input_data: dict[str, Any], fields: frozenset[str]) -> None:
    """What a task does not read from `input_data` is refused, never silently dropped."""
    unknown = sorted(set(input_data) - fields)
    if unknown:
        raise _invalid(f"input_data.{unknown[0]}", f"not an input of {task}")
