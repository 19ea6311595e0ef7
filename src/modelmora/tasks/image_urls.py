"""Image URLs in `input_data.image` (of the tasks whose spec has `image_inputs`): fetched by
the server only from allowed hosts.

A server that fetches any URL a client names can be pointed at its own network (server-side
request forgery), so URLs are refused unless their host is listed in
`limits.allowed_image_url_hosts` (exact host names, empty by default). Redirects are not
followed (a redirect could leave the allowed host), and the body is read within
`limits.max_image_bytes`. What is fetched becomes bytes, checked like an upload.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from modelmora.config import LimitsSettings
from modelmora.errors import ErrorCode, ModelMoraError

FETCH_TIMEOUT_SECONDS = 10.0


def allowed_url(value: object, limits: LimitsSettings) -> bool:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return False
    host = (urlsplit(value).hostname or "").lower()
    return host in {h.lower() for h in limits.allowed_image_url_hosts}


async def fetch_image_urls(input_data: dict[str, Any], limits: LimitsSettings) -> dict[str, Any]:
    """`input_data` with every allowed image URL replaced by its bytes; other URLs are left
    for the parser, which refuses them naming the field."""
    image = input_data.get("image")
    if not limits.allowed_image_url_hosts or image is None:
        return input_data
    single = not isinstance(image, list)
    images = [image] if single else list(image)
    if not any(allowed_url(v, limits) for v in images):
        return input_data
    async with httpx.AsyncClient(follow_redirects=False, timeout=FETCH_TIMEOUT_SECONDS) as client:
        for i, value in enumerate(images):
            if allowed_url(value, limits):
                field = "input_data.image" if single else f"input_data.image[{i}]"
                images[i] = await _fetch(client, str(value), field, limits.max_image_bytes)
    return {**input_data, "image": images[0] if single else images}


async def _fetch(client: httpx.AsyncClient, url: str, field: str, max_bytes: int) -> bytes:
    try:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ModelMoraError(
                    ErrorCode.INVALID_IMAGE,
                    f"{field}: fetching the image gave HTTP {response.status_code}",
                    {"field": field, "status": response.status_code},
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ModelMoraError(
                        ErrorCode.INVALID_IMAGE,
                        f"{field}: more than {max_bytes} bytes",
                        {"field": field, "limit_bytes": max_bytes},
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise ModelMoraError(
            ErrorCode.INVALID_IMAGE, f"{field}: the image could not be fetched: {exc}", {"field": field}
        ) from None
