"""Request bodies of the OpenAI-compatible routes, and what they share: the request headers
(`x-modelmora-priority`, `x-modelmora-timeout-seconds`), the refusal of fields this server
does not implement, and pydantic's errors in OpenAI's terms.

A field OpenAI defines but ModelMora does not implement is accepted only at its neutral value
(`logprobs: false`, `n: 1`, `tools: []`, ...), which is what clients send when they fill every
field; any other value is a 400 naming the field. A field OpenAI does not define is refused
as well (pydantic's `extra="forbid"`): nothing a client asks for is silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelmora.api.openai_errors import invalid, unsupported
from modelmora.errors import ModelMoraError


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class EmbeddingsRequest(_OpenAIBody):
    model: str
    input: Any = Field(
        description="A string or a list of strings; for img2embed models, image data URLs "
        "(an extension). Token-id arrays are refused."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None, description="Matryoshka size, for models whose config lists `matryoshka_dimensions`"
    )
    user: str | None = None


class StreamOptions(_OpenAIBody):
    include_usage: bool = False


class _Sampling(_OpenAIBody):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: Any = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM has them too; the openai client sends them through `extra_body`).
    top_k: int | None = None
    repetition_penalty: float | None = None
    # Defined by OpenAI, not implemented here: accepted only at their neutral values.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: Any = Field(description="A string or a list of strings (token ids are refused)")
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_OpenAIBody):
    type: Literal["text"]
    text: str


class ImageURL(_OpenAIBody):
    url: str = Field(description="A data URL (data:image/png;base64,...) or an allowed image URL")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_OpenAIBody):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None


class ImageRequest(_OpenAIBody):
    model: str
    prompt: str
    n: int | None = None
    size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 8")
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    quality: str | None = None
    style: str | None = None
    # Extensions: the diffusion pipeline's own controls.
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None


# field -> the values that ask for nothing (what a client filling every field sends), per body.
_SAMPLING_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
}
_NEUTRAL: dict[type[BaseModel], dict[str, tuple[Any, ...]]] = {
    CompletionRequest: {**_SAMPLING_NEUTRAL, "echo": (False,), "best_of": (1,), "suffix": ("",)},
    ChatCompletionRequest: {
        **_SAMPLING_NEUTRAL,
        "tools": ([],),
        "tool_choice": ("none", "auto"),
        "parallel_tool_calls": (True, False),
        "response_format": ({"type": "text"},),
        "functions": ([],),
        "function_call": ("none", "auto"),
    },
    ImageRequest: {"quality": ("standard", "auto"), "style": ()},
}


def refuse_unsupported(body: BaseModel) -> None:
    """400 naming the first field set to something this server does not do."""
    for name, neutral in _NEUTRAL.get(type(body), {}).items():
        value = getattr(body, name)
        if value is not None and not any(_same(value, v) for v in neutral):
            raise unsupported(name)
    n = getattr(body, "n", None)
    if n is not None and n != 1 and not isinstance(body, ImageRequest):
        raise unsupported("n", "only n = 1")


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):  # `true` is not `1` here
        return type(value) is type(neutral) and value == neutral
    return bool(value == neutral)


def text_list(value: Any, field: str) -> tuple[list[str], bool]:
    """A string or a list of strings, as OpenAI's `input` and `prompt` allow; token-id arrays
    (which OpenAI also allows) need the model's tokenizer on the client's side: refused."""
    if isinstance(value, str):
        return [value], True
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value), False
    if isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
        raise unsupported(field, "token-id input: send text")
    raise invalid(field, "must be a string or a non-empty list of strings")


def request_options(header: Callable[[str], str | None]) -> dict[str, Any]:
    """`priority` and `timeout_seconds` from the request's headers (OpenAI's body has no
    place for them); `header(name)` reads one, by its lower-case name."""
    options: dict[str, Any] = {}
    priority = (header("x-modelmora-priority") or "").strip()
    if priority:
        options["priority"] = int(priority) if priority.isdigit() else priority
    timeout = (header("x-modelmora-timeout-seconds") or "").strip()
    if timeout:
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 86_400:
            raise invalid("x-modelmora-timeout-seconds", "must be a number of seconds, 0 < t <= 86400")
        options["timeout_seconds"] = seconds
    return options


def validation_error(errors: list[dict[str, Any]]) -> ModelMoraError:
    """pydantic's errors on an OpenAI body: the first one, its field as `param`."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return invalid("body", "malformed JSON body")
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    if first.get("type") == "extra_forbidden":
        return unsupported(field)
    error = invalid(field, str(first.get("msg", "invalid")))
    error.details["errors"] = [
        {
            "field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
            "message": e.get("msg", ""),
        }
        for e in errors
    ]
    return error
