"""REST routes of async jobs: translate HTTP to `JobService` and back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response

from modelmora.api.schemas import (
    MAX_PAGE,
    MAX_PAGE_SIZE,
    ErrorBody,
    InferRequest,
    InferResponse,
    JobAccepted,
    JobList,
    JobStatusBody,
)
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability.tracing import current_trace_id

if TYPE_CHECKING:
    from modelmora.app import ModelMora

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (404, 409, 422, 429, 500)}


def _json(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code, headers, media_type="application/json")


def _mm(request: Request) -> ModelMora:
    mm: ModelMora = request.app.state.mm
    return mm


def build_jobs_router() -> APIRouter:
    r = APIRouter(tags=["jobs"])

    @r.post(
        "/api/v1/infer/{name}/async",
        status_code=202,
        response_model=JobAccepted,
        responses=_ERRORS,
        summary="Submit an async inference job",
    )
    async def submit(
        request: Request,
        name: str,
        body: InferRequest,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
    ) -> Response:
        """Stored before the 202 goes out; poll `Location`. The same `Idempotency-Key`
        within 24 h returns the same job (with a different body: 409)."""
        if body.stream:
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR,
                "an async job cannot stream; poll its status or use a synchronous request",
                {"errors": [{"field": "stream", "message": "not supported for async jobs"}]},
            )
        job, created = await _mm(request).jobs.submit(
            name,
            body.model_dump(exclude={"stream"}),
            idempotency_key=idempotency_key,
            trace_id=current_trace_id.get(),
        )
        headers = {"location": f"/api/v1/jobs/{job['job_id']}"}
        if not created:
            headers["idempotent-replayed"] = "true"
        accepted = {k: job[k] for k in ("job_id", "status", "created_at")}
        return _json(accepted, 202, headers)

    @r.get("/api/v1/jobs", response_model=JobList, responses=_ERRORS)
    async def list_jobs(
        request: Request,
        status: str | None = None,
        model: str | None = None,
        page: int = Query(1, ge=1, le=MAX_PAGE),
        page_size: int = Query(50, ge=1, le=MAX_PAGE_SIZE),
        owner: str | None = Query(None, max_length=64, description="an admin key: this key id's jobs only"),
    ) -> Response:
        """The caller's own jobs; with an admin key, every caller's (or `owner`'s)."""
        return _json(await _mm(request).jobs.list(status, model, page, page_size, owner=owner))

    @r.get("/api/v1/jobs/{job_id}", response_model=JobStatusBody, responses=_ERRORS)
    async def job_status(request: Request, job_id: str) -> Response:
        return _json(await _mm(request).jobs.status(job_id))

    @r.get("/api/v1/jobs/{job_id}/result", response_model=InferResponse, responses=_ERRORS)
    async def job_result(request: Request, job_id: str) -> Response:
        """The common response; 409 JOB_NOT_READY / JOB_FAILED / JOB_CANCELLED otherwise."""
        return _json(await _mm(request).jobs.result(job_id))

    @r.delete("/api/v1/jobs/{job_id}", response_model=JobStatusBody, responses=_ERRORS)
    async def cancel_job(request: Request, job_id: str) -> Response:
        return _json(await _mm(request).jobs.cancel(job_id))

    return r
