"""Each SDK operation once, as what it is over REST and over gRPC, with the conversion that
gives both transports' callers the same dict (REST's JSON shape; embeddings as numpy)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
from google.protobuf.message import Message

from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1.convert import (
    build_request,
    cluster_to_dict,
    dict_to_struct,
    message_to_dict,
    response_to_dict,
    stats_to_dict,
    struct_to_dict,
)


def _same(body: Any) -> Any:
    return body


@dataclass(frozen=True)
class RestCall:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] | None = None
    convert: Callable[[Any], Any] = _same


@dataclass(frozen=True)
class GrpcCall:
    service: str  # inference | registry | management
    rpc: str
    request: Message
    convert: Callable[[Any], Any] = message_to_dict


@dataclass(frozen=True)
class Op:
    rest: RestCall
    grpc: GrpcCall
    idempotent: bool = field(default=True)


def _q(name: str) -> str:
    return quote(name, safe="@")


def with_numpy(response: dict[str, Any]) -> dict[str, Any]:
    """REST's embeddings (JSON lists, or base64 of little-endian float32 with `shape`) as
    float32 arrays, as the gRPC client gives them."""
    result = response.get("result")
    if isinstance(result, dict) and "embeddings" in result:
        embeddings = result["embeddings"]
        if isinstance(embeddings, str):
            shape = tuple(result["shape"])
            array = np.frombuffer(base64.b64decode(embeddings), dtype="<f4").reshape(shape)
            result = {k: v for k, v in result.items() if k != "shape"}
            response["result"] = {**result, "embeddings": array.astype(np.float32, copy=False)}
        else:
            response["result"] = {**result, "embeddings": np.asarray(embeddings, dtype=np.float32)}
    return response


# Embeddings travel over REST as base64 unless the caller asks otherwise: a quarter of the
# bytes of JSON floats, and no float formatting in the server (gRPC sends bytes anyway).
# The server reads `encoding` at its REST door for every task; results without embeddings
# are unaffected.
REST_ENCODING = "base64"


def _page(body: Any) -> dict[str, Any]:
    return {"data": [message_to_dict(m) for m in body.data], "meta": message_to_dict(body.meta)}


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


# -- registry -------------------------------------------------------------------------------------


def register(
    model_id: str | None = None,
    *,
    source: str | None = None,
    name: str | None = None,
    version: str | None = None,
    revision: str | None = None,
    task_type: str | None = None,
    display_name: str | None = None,
    description: str | None = None,
    config: dict[str, Any] | None = None,
    resource_requirements: dict[str, Any] | None = None,
) -> Op:
    fields = {
        "model_id": model_id,
        "source": source,
        "name": name,
        "version": version,
        "revision": revision,
        "task_type": task_type,
        "display_name": display_name,
        "description": description,
    }
    body = _drop_none({**fields, "config": config, "resource_requirements": resource_requirements})
    request = pb.RegisterModelRequest(
        **{k: v for k, v in fields.items() if v is not None},
        config=dict_to_struct(config),
        resource_requirements=dict_to_struct(resource_requirements),
    )
    return Op(
        RestCall("POST", "/api/v1/models", json=body), GrpcCall("registry", "RegisterModel", request), False
    )


def list_models(
    task_type: str | None = None, status: str | None = None, page: int = 1, page_size: int = 50
) -> Op:
    params = _drop_none({"task_type": task_type, "status": status, "page": page, "page_size": page_size})
    request = pb.ListModelsRequest(
        task_type=task_type or "", status=status or "", page=page, page_size=page_size
    )
    return Op(
        RestCall("GET", "/api/v1/models", params=params), GrpcCall("registry", "ListModels", request, _page)
    )


def get_model(name: str) -> Op:
    return Op(
        RestCall("GET", f"/api/v1/models/{_q(name)}"),
        GrpcCall("registry", "GetModel", pb.ModelRef(name=name)),
    )


def update_model(
    name: str,
    *,
    config: dict[str, Any] | None = None,
    display_name: str | None = None,
    description: str | None = None,
    resource_requirements: dict[str, Any] | None = None,
) -> Op:
    body: dict[str, Any] = _drop_none(
        {
            "display_name": display_name,
            "description": description,
            "resource_requirements": resource_requirements,
        }
    )
    body["config"] = config or {}
    request = pb.UpdateModelRequest(name=name, config=dict_to_struct(config))
    if display_name is not None:
        request.display_name = display_name
    if description is not None:
        request.description = description
    if resource_requirements is not None:
        request.resource_requirements.CopyFrom(dict_to_struct(resource_requirements))
    return Op(
        RestCall("PUT", f"/api/v1/models/{_q(name)}", json=body), GrpcCall("registry", "UpdateModel", request)
    )


def delete_model(name: str, *, force: bool = False) -> Op:
    return Op(
        RestCall("DELETE", f"/api/v1/models/{_q(name)}", params={"force": str(force).lower()}),
        GrpcCall("registry", "DeleteModel", pb.DeleteModelRequest(name=name, force=force)),
        False,
    )


def download_model(name: str, version: str | None = None) -> Op:
    return Op(
        RestCall("POST", f"/api/v1/models/{_q(name)}/download", params=_drop_none({"version": version})),
        GrpcCall("registry", "DownloadModel", pb.DownloadModelRequest(name=name, version=version or "")),
    )


def use(name: str, version: str) -> Op:
    return Op(
        RestCall("POST", f"/api/v1/models/{_q(name)}/versions/{_q(version)}"),
        GrpcCall("registry", "SetActiveVersion", pb.SetActiveVersionRequest(name=name, version=version)),
    )


def lock() -> Op:
    return Op(
        RestCall("GET", "/api/v1/lock"),
        GrpcCall("registry", "GenerateLock", pb.GenerateLockRequest(), lambda r: struct_to_dict(r.lock)),
    )


# -- management -----------------------------------------------------------------------------------


def load(name: str) -> Op:
    return Op(
        RestCall("POST", f"/api/v1/models/{_q(name)}/load"),
        GrpcCall("management", "LoadModel", pb.ModelRef(name=name)),
    )


def unload(name: str, *, force: bool = False) -> Op:
    return Op(
        RestCall("POST", f"/api/v1/models/{_q(name)}/unload", params={"force": str(force).lower()}),
        GrpcCall("management", "UnloadModel", pb.UnloadModelRequest(name=name, force=force)),
    )


def warmup(name: str) -> Op:
    return Op(
        RestCall("POST", f"/api/v1/models/{_q(name)}/warmup"),
        GrpcCall("management", "WarmupModel", pb.ModelRef(name=name)),
    )


def status() -> Op:
    return Op(
        RestCall("GET", "/api/v1/status"),
        GrpcCall("management", "GetSystemStatus", pb.GetSystemStatusRequest()),
    )


def cluster() -> Op:
    return Op(
        RestCall("GET", "/api/v1/cluster"),
        GrpcCall("management", "GetCluster", pb.GetClusterRequest(), cluster_to_dict),
    )


def stats(window: int | None = None) -> Op:
    return Op(
        RestCall("GET", "/api/v1/stats", params=_drop_none({"window": window})),
        GrpcCall("management", "GetStats", pb.GetStatsRequest(window_seconds=window or 0), stats_to_dict),
    )


def model_health() -> Op:
    return Op(
        RestCall("GET", "/health/models", convert=lambda b: b["models"]),
        GrpcCall(
            "management",
            "GetModelHealth",
            pb.GetModelHealthRequest(),
            lambda r: [message_to_dict(m) for m in r.models],
        ),
    )


# -- inference and jobs ---------------------------------------------------------------------------


def infer_body(
    input_data: dict[str, Any],
    parameters: dict[str, Any] | None,
    priority: str | int | None,
    timeout_seconds: float | None,
    keep_alive: float | None,
) -> dict[str, Any]:
    return _drop_none(
        {
            "input_data": input_data,
            "parameters": parameters,
            "priority": priority,
            "timeout_seconds": timeout_seconds,
            "keep_alive": keep_alive,
        }
    )


def infer(
    model: str,
    input_data: dict[str, Any],
    parameters: dict[str, Any] | None = None,
    *,
    priority: str | int | None = None,
    timeout_seconds: float | None = None,
    keep_alive: float | None = None,
) -> Op:
    rest_parameters = {"encoding": REST_ENCODING, **(parameters or {})}
    body = infer_body(input_data, rest_parameters, priority, timeout_seconds, keep_alive)
    request = build_request(
        model,
        input_data,
        {k: v for k, v in (parameters or {}).items() if k != "encoding"},  # a REST option
        priority=priority,
        timeout_seconds=timeout_seconds,
        keep_alive=keep_alive,
    )
    return Op(
        RestCall("POST", f"/api/v1/infer/{_q(model)}", json=body, convert=with_numpy),
        GrpcCall("inference", "Infer", request, response_to_dict),
    )


def submit(
    model: str,
    input_data: dict[str, Any],
    parameters: dict[str, Any] | None = None,
    *,
    priority: str | int | None = None,
    timeout_seconds: float | None = None,
    keep_alive: float | None = None,
    idempotency_key: str | None = None,
) -> Op:
    body = infer_body(input_data, parameters, priority, timeout_seconds, keep_alive)
    request = pb.InferAsyncRequest(
        request=build_request(
            model,
            input_data,
            parameters,
            priority=priority,
            timeout_seconds=timeout_seconds,
            keep_alive=keep_alive,
        ),
        idempotency_key=idempotency_key or "",
    )
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    # Retried only with an idempotency key: without one a retry could create a second job.
    return Op(
        RestCall("POST", f"/api/v1/infer/{_q(model)}/async", json=body, headers=headers),
        GrpcCall("inference", "InferAsync", request),
        idempotency_key is not None,
    )


def job(job_id: str) -> Op:
    return Op(
        RestCall("GET", f"/api/v1/jobs/{_q(job_id)}"),
        GrpcCall("inference", "GetJobStatus", pb.JobRef(job_id=job_id)),
    )


def jobs(status: str | None = None, model: str | None = None, page: int = 1, page_size: int = 50) -> Op:
    params = _drop_none({"status": status, "model": model, "page": page, "page_size": page_size})
    request = pb.ListJobsRequest(status=status or "", model=model or "", page=page, page_size=page_size)
    return Op(
        RestCall("GET", "/api/v1/jobs", params=params), GrpcCall("inference", "ListJobs", request, _page)
    )


def cancel(job_id: str) -> Op:
    return Op(
        RestCall("DELETE", f"/api/v1/jobs/{_q(job_id)}"),
        GrpcCall("inference", "CancelJob", pb.JobRef(job_id=job_id)),
    )


def rest_result(job_id: str) -> RestCall:
    return RestCall("GET", f"/api/v1/jobs/{_q(job_id)}/result", convert=with_numpy)
