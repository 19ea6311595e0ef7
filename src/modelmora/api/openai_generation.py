"""`POST /v1/completions` and `POST /v1/chat/completions`: OpenAI's text generation over the
native service calls (`InferenceService.infer` and `.stream`).

Chats go to the worker as native `messages`, where the adapter renders them with the
tokenizer's chat template (the server never imports a tokenizer); a model without one
answers 400. Token counts are the worker's. A stream is OpenAI's chunk format, one `data:`
event per chunk, closed by `data: [DONE]`; with `stream_options.include_usage` a last chunk
carries `usage` (and every other chunk `usage: null`). Chat requests to an img2txt model take
one `image_url` part and caption it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from modelmora.api.openai_errors import invalid, stream_error, unsupported
from modelmora.api.openai_schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ImagePart,
    refuse_unsupported,
    text_list,
)
from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability.metrics import current_protocol
from modelmora.observability.tracing import current_trace_id
from modelmora.registry.catalog import ModelRecord, validate_name

if TYPE_CHECKING:
    from modelmora.app import ModelMora

PROTOCOL = "openai"
DONE = b"data: [DONE]\n\n"


def sampling(request: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """The native generation parameters the request sets (unset ones keep the model's
    `config.parameters` and the task's defaults)."""
    max_tokens = request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        max_tokens = request.max_completion_tokens
    params = {
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "repetition_penalty": request.repetition_penalty,
        "stop": request.stop,
        "seed": request.seed,
    }
    return {k: v for k, v in params.items() if v is not None}


def _text_content(message: ChatMessage, i: int) -> str:
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if isinstance(part, ImagePart):
            raise invalid(f"messages[{i}].content[{j}]", "image_url parts are for img2txt models")
        texts.append(part.text)
    return "".join(texts)


def _chat_input(record: ModelRecord, messages: list[ChatMessage]) -> dict[str, Any]:
    if record.task_type == TaskType.TXT2TXT:
        return {
            "messages": [
                {"role": "system" if m.role == "developer" else m.role, "content": _text_content(m, i)}
                for i, m in enumerate(messages)
            ]
        }
    if record.task_type == TaskType.IMG2TXT:
        # A captioner takes one picture and no text: anything else would be dropped.
        images: list[str] = []
        for i, message in enumerate(messages):
            if isinstance(message.content, str):
                if message.content.strip():
                    raise invalid(f"messages[{i}].content", f"{record.name} captions images: send no text")
                continue
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    images.append(part.image_url.url)
                elif part.text.strip():
                    raise invalid(
                        f"messages[{i}].content[{j}]", f"{record.name} captions images: send no text"
                    )
        if len(images) != 1:
            raise invalid("messages", f"{record.name} captions one image: send exactly one image_url part")
        return {"image": images[0]}
    raise invalid(
        "model", f"{record.name} is a {record.task_type.value} model: chat needs txt2txt or img2txt"
    )


def _completion_input(record: ModelRecord, request: CompletionRequest) -> dict[str, Any]:
    if record.task_type != TaskType.TXT2TXT:
        raise invalid("model", f"{record.name} is a {record.task_type.value} model: completions need txt2txt")
    prompts, single = text_list(request.prompt, "prompt")
    if request.stream and not single:
        raise invalid("prompt", "a stream takes one prompt")
    return {"text": prompts[0] if single else prompts}


def _usage(result: dict[str, Any]) -> dict[str, int]:
    usage = result.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


class Generation:
    """One completions or chat request, checked and ready to run or stream."""

    def __init__(
        self,
        mm: ModelMora,
        request: CompletionRequest | ChatCompletionRequest,
        options: dict[str, Any],
        disconnected: asyncio.Future[Any],
    ) -> None:
        self.mm = mm
        self.request = request
        self.options = options
        self.disconnected = disconnected
        self.chat = isinstance(request, ChatCompletionRequest)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + (current_trace_id.get() or uuid.uuid4().hex)
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.name = ""
        self.input_data: dict[str, Any] = {}

    async def prepare(self) -> None:
        current_protocol.set(PROTOCOL)
        refuse_unsupported(self.request)
        if self.request.stream_options is not None and not self.request.stream:
            raise unsupported("stream_options", "only with stream: true")
        self.name = validate_name(self.request.model)
        record = await self.mm.inference.manager.record(self.name)
        if isinstance(self.request, ChatCompletionRequest):
            self.input_data = _chat_input(record, self.request.messages)
        else:
            self.input_data = _completion_input(record, self.request)

    def _call(self) -> dict[str, Any]:
        return {"trace_id": current_trace_id.get(), "disconnected": self.disconnected, **self.options}

    async def run(self) -> dict[str, Any]:
        response = await self.mm.inference.infer(
            self.name, self.input_data, sampling(self.request), **self._call()
        )
        result = response["result"]
        texts, reasons = _listed(result["text"]), _listed(result["finish_reason"])
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            choice: dict[str, Any] = {"index": i, "finish_reason": reason, "logprobs": None}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.name,
            "choices": choices,
            "usage": _usage(result),
            "system_fingerprint": None,
        }

    async def open_stream(self) -> AsyncIterator[bytes]:
        """The chunks as SSE bytes. The first native event is awaited here, before the caller
        sends a status line: an error before it (unknown model, queue full) is raised."""
        events = self.mm.inference.stream(self.name, self.input_data, sampling(self.request), **self._call())
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        return self._chunks(first, events)

    def _chunk(self, delta: dict[str, Any] | str | None, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
        else:
            choice["text"] = delta if isinstance(delta, str) else ""
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.name,
            "choices": [choice],
            "system_fingerprint": None,
        }
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    @property
    def _include_usage(self) -> bool:
        options = self.request.stream_options
        return options is not None and options.include_usage

    async def _chunks(
        self, first: dict[str, Any], events: AsyncGenerator[dict[str, Any], None]
    ) -> AsyncIterator[bytes]:
        try:
            if self.chat:
                yield _sse(self._chunk({"role": "assistant", "content": ""}, None))
            event: dict[str, Any] | None = first
            while event is not None:
                kind, data = event["event"], event["data"]
                if kind == "token" and data.get("text"):
                    yield _sse(self._chunk(str(data["text"]), None))
                elif kind == "done":
                    result = data["result"]
                    yield _sse(self._chunk(None, str(_listed(result["finish_reason"])[0])))
                    if self._include_usage:
                        usage = {**self._chunk(None, None), "choices": [], "usage": _usage(result)}
                        yield _sse(usage)
                elif kind == "error":
                    error = ModelMoraError(
                        _code(data.get("error_code")), str(data.get("message", "")), data.get("details")
                    )
                    yield stream_error(error, "/v1/chat/completions" if self.chat else "/v1/completions")
                event = await anext(events, None)
            yield DONE
        finally:
            await events.aclose()  # a client gone mid-stream: this cancels the work


def _code(value: Any) -> ErrorCode:
    try:
        return ErrorCode(str(value))
    except ValueError:
        return ErrorCode.INTERNAL_ERROR


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
