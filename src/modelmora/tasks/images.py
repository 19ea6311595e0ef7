"""Image bytes in and out: base64 and data URLs, format and size checks, decoding, PNG.

The server process runs `check_image` (base64 decode plus Pillow's header read: cheap, no
pixel is decoded) so that a wrong format, an oversized file or a decompression bomb is refused
before it is queued. A picture's decoded size is known from its header (width x height x
bytes per pixel of its mode, at least 3 since every picture is converted to RGB): a few KB of
PNG can declare hundreds of MB of pixels, so a request's images are capped by that figure
(`limits.max_decoded_image_bytes_per_request`), not by their file size. The worker decodes for
real (`decode_image`) in its preprocess step, after the same header check against the cap the
request carries; an image that passes the header check but is corrupt further in fails there,
for its request alone. Pillow only, no torch.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Any

from modelmora.errors import ErrorCode, ModelMoraError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


@dataclass(frozen=True, slots=True)
class ImageInfo:
    data: bytes
    format: str
    width: int
    height: int
    decoded_bytes: int  # what decoding (and the RGB conversion) holds, from the header


def invalid_image(field: str, message: str, **details: Any) -> ModelMoraError:
    return ModelMoraError(ErrorCode.INVALID_IMAGE, f"{field}: {message}", {"field": field, **details})


def b64_bytes(value: str, field: str, max_bytes: int) -> bytes:
    """Plain base64 or a `data:image/...;base64,` URL, within `max_bytes` once decoded."""
    text = value.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise invalid_image(field, "a data URL must be base64 (data:image/png;base64,...)")
    # A cheap bound before decoding: base64 grows 4/3.
    if len(text) > (max_bytes * 4) // 3 + 8:
        raise invalid_image(field, f"more than {max_bytes} bytes", limit_bytes=max_bytes)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_image(field, "not valid base64") from None
    if len(data) > max_bytes:
        raise invalid_image(field, f"{len(data)} bytes, at most {max_bytes} allowed", limit_bytes=max_bytes)
    if not data:
        raise invalid_image(field, "empty")
    return data


def bytes_per_pixel(mode: str) -> int:
    """Decoded bytes per pixel of a Pillow mode, at least 3: every picture becomes RGB."""
    from PIL import ImageMode

    try:
        info = ImageMode.getmode(mode)
        size = len(info.bands) * int(info.typestr[-1])
    except (KeyError, ValueError):
        size = 4  # a mode Pillow cannot describe: count it as the widest common one
    return max(size, 3)


def check_image(data: bytes, field: str, max_pixels: int, max_decoded_bytes: int | None = None) -> ImageInfo:
    """Format and dimensions from the header only; refuses anything but PNG, JPEG and WebP,
    more pixels than `max_pixels`, and a decoded size over `max_decoded_bytes` (a
    decompression bomb is refused before decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we check below
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height), mode = str(img.format), img.size, str(img.mode)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise invalid_image(field, "not a decodable PNG, JPEG or WebP image") from None
    if fmt not in ALLOWED_FORMATS:
        raise invalid_image(field, f"format {fmt} not accepted: use PNG, JPEG or WebP", format=fmt)
    if width * height > max_pixels or width <= 0 or height <= 0:
        raise invalid_image(
            field, f"{width}x{height} pixels, at most {max_pixels} allowed", limit_pixels=max_pixels
        )
    decoded = width * height * bytes_per_pixel(mode)
    if max_decoded_bytes is not None and decoded > max_decoded_bytes:
        raise invalid_image(
            field,
            f"{width}x{height} {mode} pixels decode to {decoded} bytes, at most "
            f"{max_decoded_bytes} allowed per request",
            decoded_bytes=decoded,
            limit_bytes=max_decoded_bytes,
        )
    return ImageInfo(data, fmt, width, height, decoded)


def check_decoded_total(infos: list[ImageInfo], field: str, max_decoded_bytes: int) -> None:
    """One request's images together: PAYLOAD_TOO_LARGE past the decoded-bytes cap (each
    may fit alone; ten small-file bombs must not)."""
    total = sum(i.decoded_bytes for i in infos)
    if total > max_decoded_bytes:
        raise ModelMoraError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"{field}: the {len(infos)} images decode to {total} bytes together, at most "
            f"{max_decoded_bytes} allowed per request (limits.max_decoded_image_bytes_per_request)",
            {"field": field, "decoded_bytes": total, "limit_bytes": max_decoded_bytes},
        )


def header_decoded_bytes(data: bytes) -> int:
    """The decoded size an image declares in its header (the worker's check before it
    decodes); ValueError when there is no readable header."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                return width * height * bytes_per_pixel(str(img.mode))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"corrupt image: {exc}") from exc


def decode_image(data: bytes) -> Any:
    """The RGB picture (a PIL image), fully decoded; raises ValueError when the bytes are
    corrupt past the header (the worker turns that into INVALID_IMAGE for this input)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"corrupt image: {exc}") from exc


def png_bytes(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
