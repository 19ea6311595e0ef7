"""Output shapers: a worker's raw result for one request turned into the task's `result`.

Each task's spec (`tasks/specs.py`) names its shaper. They run in the server, after the
request's batch came back, so they import nothing heavy.
"""

from __future__ import annotations

import base64
from typing import Any, Protocol

from modelmora.tasks.inputs import ParsedInput


class ResultSink(Protocol):
    """Where results too large to answer inline go (the server's result store): the response
    then carries a URL."""

    @property
    def inline_max_bytes(self) -> int: ...

    async def put(self, data: bytes, suffix: str) -> str:
        """Store `data`; return the URL the client fetches it from."""
        ...


async def embeddings(value: Any, parsed: ParsedInput, sink: ResultSink) -> dict[str, Any]:
    """One vector for one string in, a list for a list (value may be a numpy array: the REST
    layer serialises it without a copy)."""
    return {"embeddings": value[0] if parsed.single else value}


async def generated_text(
    value: list[dict[str, Any]], parsed: ParsedInput, sink: ResultSink
) -> dict[str, Any]:
    return generation_result(value, parsed.single)


def generation_result(rows: list[dict[str, Any]], single: bool) -> dict[str, Any]:
    """txt2txt and img2txt: `text` and `finish_reason` (one, or a list), `usage` summed."""
    usage = {
        "prompt_tokens": sum(int(r.get("prompt_tokens", 0)) for r in rows),
        "completion_tokens": sum(int(r.get("completion_tokens", 0)) for r in rows),
    }
    texts = [r["text"] for r in rows]
    reasons = [r["finish_reason"] for r in rows]
    return {
        "text": texts[0] if single else texts,
        "finish_reason": reasons[0] if single else reasons,
        "usage": usage,
    }


async def images(value: dict[str, Any], parsed: ParsedInput, sink: ResultSink) -> dict[str, Any]:
    """PNGs inline (`b64_json`, when small enough) or in the result store (a URL)."""
    inline = parsed.params.get("response_format") == "b64_json"
    out: list[dict[str, str]] = []
    for png in value["images"]:
        if inline and len(png) * 4 // 3 <= sink.inline_max_bytes:
            out.append({"b64_json": base64.b64encode(png).decode("ascii")})
        else:
            out.append({"url": await sink.put(png, ".png")})
    return {"images": out, "seed": value["seed"]}
