"""Request and response bodies of the REST API (the same fields travel over gRPC)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InferRequest(_Strict):
    input_data: dict[str, Any] = Field(description="Per task: `text` (string or list), `image`, `messages`.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Per task, e.g. `normalize`.")
    priority: str | int | None = Field(None, description="critical|high|normal|low or 1-4")
    timeout_seconds: float | None = Field(None, gt=0, le=86_400)
    keep_alive: float | None = Field(None, ge=-1, description="seconds; -1 forever, 0 unload after")
    stream: bool = False


class ShortInferRequest(_Strict):
    """`POST /infer/{name}`: the input at the top level."""

    text: str | list[Any] | None = None
    image: str | list[Any] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    priority: str | int | None = None
    timeout_seconds: float | None = Field(None, gt=0, le=86_400)
    keep_alive: float | None = Field(None, ge=-1)
    stream: bool = False


class Timing(BaseModel):
    queue_time_ms: float
    inference_time_ms: float
    total_time_ms: float


class InferMetadata(BaseModel):
    model: str
    version: str | None
    task_type: str
    device: str | None
    batch_size: int
    truncated: int = 0


class InferResponse(BaseModel):
    result: dict[str, Any] = Field(description="txt2embed: `embeddings` (a vector, or a list of vectors)")
    metadata: InferMetadata
    timing: Timing


class RegisterModelRequest(_Strict):
    model_id: str | None = Field(None, max_length=256, description="A Hub ID (org/name) or any ID")
    name: str | None = Field(None, max_length=128)
    source: str | None = Field(None, max_length=4096, description="local path, https:// or s3:// URL")
    version: str | None = Field(None, max_length=128)
    revision: str | None = Field(None, max_length=128, description="Hub branch, tag or commit")
    task_type: str | None = None
    display_name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=10_000)
    config: dict[str, Any] = Field(default_factory=dict)
    resource_requirements: dict[str, Any] = Field(default_factory=dict)


class UpdateModelRequest(_Strict):
    display_name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=10_000)
    config: dict[str, Any] = Field(default_factory=dict, description="keys to set; null removes one")
    resource_requirements: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error_code: str
    message: str
    details: dict[str, Any]
    trace_id: str | None


class JobAccepted(BaseModel):
    job_id: str
    status: str
    created_at: str


class JobStatusBody(BaseModel):
    job_id: str
    model: str
    status: str = Field(description="queued|processing|completed|failed|cancelled")
    priority: int
    progress: float | None = Field(None, description="0..1 where the task reports steps")
    created_at: str
    started_at: str | None
    completed_at: str | None
    attempts: int = Field(description="runs so far; more than 1 after a crash or restart (at-least-once)")
    error: ErrorBody | None


class ListMeta(BaseModel):
    total: int
    page: int
    page_size: int
    total_pages: int


class JobList(BaseModel):
    data: list[JobStatusBody]
    meta: ListMeta
