"""Request and response bodies of the REST API (the same fields travel over gRPC)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Bounds of `page` and `page_size` on every listing: the offset they make stays far inside
# SQLite's 64-bit integers and the echoed `meta` inside orjson's.
MAX_PAGE = 1_000_000
MAX_PAGE_SIZE = 1000


def _finite_tree(value: Any) -> Any:
    """Refuse NaN and infinities anywhere in free-form JSON: both JSON parsers in front of
    these models accept `NaN` and `Infinity`, and neither has a JSON spelling on the way back.
    Integers past 64 bits too: stored, they made every later read of the model a 500 (orjson
    writes none of them)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
        if isinstance(item, int) and not -(2**63) <= item < 2**63:
            raise ValueError("integers must fit in 64 bits")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


# A JSON object whose numbers, at any depth, are finite (and its integers 64-bit).
FiniteObject = Annotated[dict[str, Any], AfterValidator(_finite_tree)]
# The short form's inputs, checked alike: they become `input_data` after validation, where a
# bad number would only be found when the full request is built (a 500).
FiniteInput = Annotated[str | list[Any], AfterValidator(_finite_tree)]


class _Strict(BaseModel):
    # Strict: `"priority": true` or `"stream": "yes"` is an error, not a coercion (a bool is
    # an int to lax pydantic, so `true` ran as priority 1). Unknown keys are errors too, and
    # typed numbers are finite.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class InferRequest(_Strict):
    input_data: FiniteObject = Field(description="Per task: `text` (string or list), `image`, `messages`.")
    parameters: FiniteObject = Field(default_factory=dict, description="Per task, e.g. `normalize`.")
    priority: str | int | None = Field(None, description="critical|high|normal|low or 1-4")
    timeout_seconds: float | None = Field(None, gt=0, le=86_400)
    keep_alive: float | None = Field(None, ge=-1, description="seconds; -1 forever, 0 unload after")
    stream: bool = False


class ShortInferRequest(_Strict):
    """`POST /infer/{name}`: the input at the top level."""

    text: FiniteInput | None = None
    image: FiniteInput | None = None
    parameters: FiniteObject = Field(default_factory=dict)
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
    prompt_tokens: int | None = Field(None, description="embeddings: input tokens, by the model's tokenizer")


class InferResponse(BaseModel):
    result: dict[str, Any] = Field(
        description="txt2embed: `embeddings` (a vector, or a list of vectors; with `parameters.encoding: "
        "base64`, one base64 string of the little-endian float32 array, and `shape`)"
    )
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
    config: FiniteObject = Field(default_factory=dict)
    resource_requirements: FiniteObject = Field(default_factory=dict)


class UpdateModelRequest(_Strict):
    display_name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=10_000)
    config: FiniteObject = Field(default_factory=dict, description="keys to set; null removes one")
    resource_requirements: FiniteObject | None = None


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


# -- the cluster view (`GET /api/v1/cluster`) ---------------------------------------------------
# Documentation of the shape for OpenAPI: the route returns the service's dict as is.


class ClusterModel(BaseModel):
    name: str
    state: str = Field(description="the model status's state on that replica: ready, loading, ...")
    version: str | None
    queue_depth: int = Field(description="requests waiting for the model there")
    in_flight: int = Field(description="requests holding the model there (queued or running)")
    device: str | None


class ClusterMemory(BaseModel):
    budget_ram_bytes: int = Field(description="the workers' RAM budget; 0: none set")
    used_ram_bytes: int
    free_ram_bytes: int = Field(description="budget minus used, never below 0 (0 without a budget)")


class ClusterReplica(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    advertise_url: str | None = Field(description="its REST door for the other replicas")
    grpc_url: str | None = Field(description="its gRPC address as clients should see it")
    heartbeat_at: float = Field(description="epoch seconds of its record")
    version: str = Field(description="its ModelMora version")
    started_at: float = Field(description="epoch seconds")
    ready: bool
    draining: bool
    in_flight: int = Field(description="its requests in progress, at both doors")
    queued: int = Field(description="its requests waiting for admission")
    memory: ClusterMemory
    models: list[ClusterModel]
    age_seconds: float = Field(description="how old its record was when this view was read")
    is_self: bool = Field(alias="self", description="the replica that answered")


class ClusterView(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    enabled: bool = Field(description="routing on (cluster.advertise_url set); off: this replica alone")
    self_id: str = Field(alias="self", description="the id of the replica that answered")
    replicas: list[ClusterReplica] = Field(description="every live replica, sorted by id")
