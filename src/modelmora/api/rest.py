"""REST routers: translate HTTP to the service layer and back, nothing more."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelmora import __version__
from modelmora.api import fastpath, openai_embeddings, openai_errors, openai_schemas
from modelmora.api.console import build_console_router
from modelmora.api.console_auth import ConsoleSessions, build_session_router, build_sessions
from modelmora.api.edge import EdgeLimits, EdgeMiddleware, error_response_parts
from modelmora.api.jobs import build_jobs_router
from modelmora.api.openai_routes import build_openai_router
from modelmora.api.schemas import (
    ClusterView,
    ErrorBody,
    InferRequest,
    InferResponse,
    RegisterModelRequest,
    ShortInferRequest,
    UpdateModelRequest,
)
from modelmora.contracts.encoding import JSON_OPTIONS
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability.metrics import CONTENT_TYPE_LATEST
from modelmora.observability.tracing import current_trace_id
from modelmora.registry.installer import InstallRequest
from modelmora.services.registry import RECORD_FIELDS

if TYPE_CHECKING:
    from modelmora.app import ModelMora


class JSON(Response):
    """orjson, with numpy arrays serialised directly (embeddings are never copied to lists)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=JSON_OPTIONS)


def _error(exc: ModelMoraError, request: Request) -> Response:
    path = request.url.path
    if openai_errors.is_v1(path):  # the declared exception: OpenAI's shape on `/v1`
        status, headers, body = openai_errors.error_response_parts(exc, path)
    else:
        status, headers, body = error_response_parts(exc, current_trace_id.get())
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (404, 409, 413, 422, 429, 500, 502, 503, 504)
}


def _mm(request: Request) -> ModelMora:
    mm: ModelMora = request.app.state.mm
    return mm


def _disconnect_watch(request: Request) -> asyncio.Future[Any]:
    """Completes when the client goes away (the body has been read by then, so the next ASGI
    message can only be the disconnect)."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return asyncio.ensure_future(wait())


def build_router() -> APIRouter:
    r = APIRouter()

    # -- inference -------------------------------------------------------------------------

    # The edge serves these two routes through api/fastpath.py; they stay here for the
    # OpenAPI document and run the same code if the fast path is ever turned off.
    async def _infer(request: Request, name: str, body: InferRequest) -> Response:
        encoding = fastpath.take_encoding(body)
        watch = _disconnect_watch(request)
        if body.stream:
            events = fastpath.open_stream(_mm(request), name, body, watch)
            try:
                first = await anext(events)  # an error before it is a plain error response
            except BaseException:
                watch.cancel()
                await events.aclose()
                raise

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    yield fastpath.sse(first)
                    async for event in events:
                        yield fastpath.sse(event)
                finally:
                    watch.cancel()
                    await events.aclose()

            return StreamingResponse(
                chunks(), headers={k.decode(): v.decode() for k, v in fastpath.SSE_HEADERS}
            )
        try:
            result = await fastpath.run_infer(_mm(request), name, body, watch)
        finally:
            watch.cancel()
        npy = fastpath.wants_npy(request.headers.get("accept", "").encode("latin-1"))
        payload, headers = fastpath.render(result, encoding, npy)
        return Response(payload, headers={k.decode(): v.decode() for k, v in headers})

    @r.post(
        "/api/v1/infer/{name:path}",
        response_model=InferResponse,
        responses=_ERRORS,
        tags=["inference"],
        summary="Run a model on one request (synchronous)",
    )
    async def infer(request: Request, name: str, body: InferRequest) -> Response:
        return await _infer(request, name, body)

    @r.post("/infer/{name:path}", response_model=InferResponse, responses=_ERRORS, tags=["inference"])
    async def infer_short(request: Request, name: str, body: ShortInferRequest) -> Response:
        """Short form: `{"text": ...}` or `{"image": ...}` at the top level."""
        return await _infer(request, name, fastpath.to_full(body))

    # -- registry --------------------------------------------------------------------------

    @r.post("/api/v1/models", status_code=201, responses=_ERRORS, tags=["registry"])
    async def register_model(request: Request, body: RegisterModelRequest) -> Response:
        req = InstallRequest(
            model_id=body.model_id,
            source=body.source,
            name=body.name,
            version=body.version,
            revision=body.revision,
            task_type=body.task_type,
            display_name=body.display_name,
            description=body.description,
            config=body.config,
            resource_requirements=body.resource_requirements,
        )
        return JSON(await _mm(request).registry.install(req), status_code=201)

    @r.get("/api/v1/models", tags=["registry"], responses=_ERRORS)
    async def list_models(
        request: Request,
        task_type: str | None = None,
        status: str | None = None,
        page: int = Query(1, ge=1, le=1_000_000),
        page_size: int = Query(50, ge=1, le=500),
    ) -> Response:
        return JSON(await _mm(request).registry.list(task_type, status, page, page_size))

    @r.get("/api/v1/models/{name:path}", tags=["registry"], responses=_ERRORS)
    async def get_model(request: Request, name: str) -> Response:
        return JSON(await _mm(request).registry.get(name))

    @r.put("/api/v1/models/{name:path}", tags=["registry"], responses=_ERRORS)
    async def update_model(request: Request, name: str, body: UpdateModelRequest) -> Response:
        fields = {k: getattr(body, k) for k in RECORD_FIELDS if k in body.model_fields_set}
        return JSON(await _mm(request).registry.update(name, body.config, fields))

    @r.delete("/api/v1/models/{name:path}", tags=["registry"], responses=_ERRORS)
    async def delete_model(request: Request, name: str, force: bool = False) -> Response:
        return JSON(await _mm(request).registry.uninstall(name, force))

    @r.post("/api/v1/models/{name}/versions/{version}", tags=["registry"], responses=_ERRORS)
    async def set_active_version(request: Request, name: str, version: str) -> Response:
        return JSON(await _mm(request).registry.use(name, version))

    @r.get("/api/v1/lock", tags=["registry"])
    async def generate_lock(request: Request) -> Response:
        return JSON(await _mm(request).registry.lock())

    @r.post("/api/v1/models/{name}/download", tags=["registry"], responses=_ERRORS)
    async def download_model(request: Request, name: str, version: str | None = None) -> Response:
        """Files are fetched at install; this verifies they are present and intact."""
        return JSON(await _mm(request).registry.verify(name, version))

    # -- management ------------------------------------------------------------------------

    @r.post("/api/v1/models/{name}/load", tags=["management"], responses=_ERRORS)
    async def load_model(request: Request, name: str) -> Response:
        return JSON(await _mm(request).management.load(name))

    @r.post("/api/v1/models/{name}/unload", tags=["management"], responses=_ERRORS)
    async def unload_model(request: Request, name: str, force: bool = False) -> Response:
        return JSON(await _mm(request).management.unload(name, force))

    @r.post("/api/v1/models/{name}/warmup", tags=["management"], responses=_ERRORS)
    async def warmup_model(request: Request, name: str) -> Response:
        return JSON(await _mm(request).management.warmup(name))

    @r.get("/api/v1/status", tags=["management"])
    async def status(request: Request) -> Response:
        return JSON(await _mm(request).management.status())

    @r.get("/api/v1/cluster", tags=["management"], response_model=ClusterView, responses=_ERRORS)
    async def cluster(request: Request) -> Response:
        """The replicas behind this address, each with its models (state, queue, requests in
        flight) and free memory, from their heartbeats in Redis. Routing off
        (`cluster.advertise_url` unset): this replica alone, `enabled` false."""
        return JSON(await _mm(request).management.cluster())

    @r.get("/api/v1/stats", tags=["management"], responses=_ERRORS)
    async def stats(request: Request, window: int = 300) -> Response:
        """Each model's recent figures over the last `window` seconds (10 up to 900): request
        and error rates, p50/p90/p99 latency, batch size; one point per 5 s, from memory."""
        return JSON(_mm(request).management.stats(window))

    async def metrics(request: Request) -> Response:
        """Prometheus text exposition of every metric (observability/metrics.py)."""
        body = await _mm(request).metrics_exposition()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    r.add_api_route("/metrics", metrics, methods=["GET"], tags=["management"], summary="Prometheus metrics")
    r.add_api_route("/api/v1/metrics", metrics, methods=["GET"], tags=["management"], include_in_schema=False)

    # -- stored results --------------------------------------------------------------------

    @r.get("/api/v1/results/{key}", tags=["jobs"], responses=_ERRORS)
    async def get_result_file(request: Request, key: str) -> Response:
        """A large result (an image, a big embedding batch) kept in the result store."""
        store = _mm(request).results
        obj = await store.stat(key)
        return StreamingResponse(
            store.chunks(key, 1 << 20),
            media_type=obj.content_type,
            headers={"content-length": str(obj.size), "cache-control": "private, max-age=3600"},
        )

    # -- health ----------------------------------------------------------------------------

    @r.get("/health/live", tags=["health"])
    async def live() -> Response:
        return JSON({"status": "ok"})

    @r.get("/health/ready", tags=["health"])
    async def ready(request: Request) -> Response:
        mm = _mm(request)
        ok = mm.ready and not mm.draining
        reason = "draining" if mm.draining else ("starting" if not mm.ready else None)
        return JSON(
            {"status": "ready" if ok else "not_ready", "reason": reason}, status_code=200 if ok else 503
        )

    @r.get("/health/models", tags=["health"])
    async def models_health(request: Request) -> Response:
        return JSON(_mm(request).management.health())

    return r


def create_rest_app(mm: ModelMora, sessions: ConsoleSessions | None = None) -> FastAPI:
    """The FastAPI application (routes, OpenAPI, handlers). Serve it wrapped by `asgi_app`.
    `sessions`: the console's sign-in when the server checks keys (api/console_auth.py)."""
    app = FastAPI(
        title="ModelMora",
        version=__version__,
        description="One server for many PyTorch models.",
        lifespan=mm.lifespan,
        docs_url=None,  # served below from assets in the package, not from a CDN
        redoc_url=None,
    )
    app.state.mm = mm
    app.include_router(build_jobs_router())  # first: `/infer/{name}/async` before `/infer/{name:path}`
    app.include_router(build_router())
    app.include_router(build_openai_router())
    app.include_router(build_docs_router())
    app.include_router(build_console_router())  # the web console at /ui (api/console.py)
    app.include_router(build_session_router(sessions))

    @app.exception_handler(ModelMoraError)
    async def _mm_error(request: Request, exc: ModelMoraError) -> Response:
        return _error(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        if openai_errors.is_v1(request.url.path):
            return _error(openai_schemas.validation_error(list(exc.errors())), request)
        return _error(fastpath.validation_error(list(exc.errors())), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(exc.status_code)
        if code is None:
            code = ErrorCode.VALIDATION_ERROR if exc.status_code < 500 else ErrorCode.INTERNAL_ERROR
        return _error(ModelMoraError(code, str(exc.detail)), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logging.getLogger("modelmora.api").exception("unhandled error")
        return _error(
            ModelMoraError(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"), request
        )

    return app


# Swagger UI and ReDoc, shipped by the `fastapi-offline` package: `/docs` works on a machine
# without internet (FastAPI's own pages load them from a CDN). Under `/docs/`, which needs no key.
DOCS_ASSETS = "/docs/assets/"
_ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


def _asset(name: str) -> bytes | None:
    static = resources.files("fastapi_offline") / "static"
    if "/" in name or name.startswith(".") or not name.endswith(tuple(_ASSET_TYPES)):
        return None
    path = static / name
    return path.read_bytes() if path.is_file() else None


def build_docs_router() -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="ModelMora - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=DOCS_ASSETS + "swagger-ui-bundle.js",
            swagger_css_url=DOCS_ASSETS + "swagger-ui.css",
            swagger_favicon_url=DOCS_ASSETS + "favicon.png",
        )

    @r.get("/docs/oauth2-redirect")
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @r.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="ModelMora - ReDoc",
            redoc_js_url=DOCS_ASSETS + "redoc.standalone.js",
            redoc_favicon_url=DOCS_ASSETS + "favicon.png",
            with_google_fonts=False,
        )

    @r.get(DOCS_ASSETS + "{name}")
    async def asset(name: str) -> Response:
        data = await asyncio.to_thread(_asset, name)
        if data is None:
            raise ModelMoraError(ErrorCode.NOT_FOUND, f"no docs asset {name!r}")
        media = _ASSET_TYPES["." + name.rsplit(".", 1)[-1]]
        return Response(data, media_type=media, headers={"cache-control": "public, max-age=86400"})

    return r


def asgi_app(mm: ModelMora) -> EdgeMiddleware:
    """What uvicorn runs: the edge first (trace ids, limits, drain, the inference fast path),
    outside FastAPI's middleware stack so that none of it is paid twice."""

    async def fast(
        name: str, schema: Any, body: bytes, receive: Any, send: Any, headers: dict[bytes, bytes]
    ) -> None:
        if schema is fastpath.OPENAI_EMBEDDINGS:
            await openai_embeddings.handle(mm, body, receive, send, headers)
        else:
            await fastpath.handle(mm, name, schema, body, receive, send, headers)

    sessions = build_sessions(mm)
    return EdgeMiddleware(
        create_rest_app(mm, sessions),
        max_body=mm.settings.limits.max_request_bytes,
        is_draining=lambda: mm.draining,
        counter=mm,
        fast=fast,
        metrics=mm.metrics,
        tracing_on=lambda: mm.inference.spans is not None,
        limits=EdgeLimits.from_settings(mm.settings),
        auth=mm.auth,
        limiter=mm.limiter,
        metrics_public=mm.settings.auth.metrics_public,
        sessions=sessions,
        cluster_secret=secret.get_secret_value() if (secret := mm.settings.cluster.secret) else None,
    )
