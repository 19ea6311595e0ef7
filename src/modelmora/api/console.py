"""The web console at `/ui` (and `/` redirecting there): its page and static files.

Every byte comes from the `modelmora.console` package (no CDN, nothing fetched at run time).
The files are read once, when the router is built, and answered from memory with an ETag;
only names found in the package are served, so a path never reaches the file system.
The page holds no data: it reads the server's own API (status, models, stats, jobs) as any
client does, with the session cookie of api/console_auth.py when keys are checked.
"""

from __future__ import annotations

import hashlib
import mimetypes
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from modelmora.console import root
from modelmora.errors import ErrorCode, ModelMoraError

# The page loads only what it ships: scripts, styles and fetches from this origin, no frames.
# uPlot sizes its elements through the CSSOM (element.style), which `style-src 'self'` allows.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class _Asset:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, name: str, body: bytes) -> None:
        self.body = body
        guessed = mimetypes.guess_type(name)[0] or "application/octet-stream"
        suffix = name[name.rfind(".") :]
        self.content_type = _TYPES.get(
            suffix, guessed + ("; charset=utf-8" if guessed.startswith("text/") else "")
        )
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def _walk(folder: Traversable, prefix: str = "") -> dict[str, _Asset]:
    found: dict[str, _Asset] = {}
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            found.update(_walk(entry, name + "/"))
        elif not entry.name.startswith("."):
            found[name] = _Asset(name, entry.read_bytes())
    return found


def load_assets() -> tuple[_Asset, dict[str, _Asset]]:
    """The page and the static files by their path under `/ui/static/`."""
    package = root()
    return _Asset("index.html", package.joinpath("index.html").read_bytes()), _walk(package / "static")


def _answer(request: Request, asset: _Asset, cache: str) -> Response:
    headers = {"etag": asset.etag, "cache-control": cache, **SECURITY_HEADERS}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


def build_console_router() -> APIRouter:
    page, static = load_assets()
    r = APIRouter(include_in_schema=False)

    @r.get("/")
    async def home() -> Response:
        return RedirectResponse("/ui", status_code=307)

    @r.get("/ui")
    async def console_page(request: Request) -> Response:
        # Revalidated on every visit (an upgraded server serves its own page at once).
        return _answer(request, page, "no-cache")

    @r.get("/ui/static/{path:path}")
    async def console_static(request: Request, path: str) -> Response:
        asset = static.get(path)
        if asset is None:
            raise ModelMoraError(ErrorCode.NOT_FOUND, f"no console file {path!r}")
        return _answer(request, asset, "no-cache")

    return r
