"""The commands that talk to a running server: health, status, ps, load, unload, jobs (and
`run`, in run_cmds.py).

They need only the base install (`pip install modelmora`): httpx, typer and rich, no server
library, so an operator's machine can watch and steer a server it does not run.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from modelmora.cli.common import app, context, fail, out, raise_for, require_server
from modelmora.errors import ModelMoraError
from modelmora.status_view import (
    Column,
    fitted_table,
    models_table,
    ps_table,
    render_cluster,
    render_status,
)


@app.command()
def health(ctx: typer.Context) -> None:
    """Readiness of the running server and the state of each model."""
    settings = context(ctx).settings()
    ready = require_server(ctx, settings, "GET", "/health/ready")
    models = require_server(ctx, settings, "GET", "/health/models").json().get("models", [])
    out.print(f"server: {ready.json().get('status')}")
    out.print(models_table(models, out.width))
    if ready.status_code != 200:
        raise typer.Exit(1)


@app.command()
def load(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Model name")]) -> None:
    """Load a model in the running server."""
    settings = context(ctx).settings()
    try:
        body = raise_for(require_server(ctx, settings, "POST", f"/api/v1/models/{name}/load", timeout=600))
    except ModelMoraError as exc:
        raise fail(exc) from None
    out.print(f"{name}: {body['state']} (pid {body['pid']}, {body['device']})")


@app.command()
def unload(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Model name")]) -> None:
    """Unload a model in the running server (ends its worker process)."""
    settings = context(ctx).settings()
    try:
        body = raise_for(require_server(ctx, settings, "POST", f"/api/v1/models/{name}/unload", timeout=60))
    except ModelMoraError as exc:
        raise fail(exc) from None
    out.print(f"{name}: {'unloaded' if body['unloaded'] else 'was not loaded'}")


@app.command()
def jobs(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option("--status", help="queued|processing|completed|failed|cancelled")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model's jobs")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="How many, newest first")] = 50,
) -> None:
    """Async jobs of the running server, newest first."""
    settings = context(ctx).settings()
    params = {k: v for k, v in (("status", status), ("model", model)) if v}
    query = "&".join(f"{k}={v}" for k, v in params.items())
    try:
        body = raise_for(
            require_server(ctx, settings, "GET", f"/api/v1/jobs?page_size={limit}&{query}".rstrip("&"))
        )
    except ModelMoraError as exc:
        raise fail(exc) from None
    columns = [
        Column("job id"),  # copied from here: never cut
        Column("model", keep=9),
        Column("status", keep=8),
        Column("priority", keep=1),
        Column("progress", keep=6),
        Column("attempts", keep=2),
        Column("created", keep=4),
        Column("error", keep=5),
    ]
    rows = []
    for j in body["data"]:
        progress = f"{j['progress'] * 100:.0f}%" if j["progress"] is not None else "-"
        error = (j["error"] or {}).get("error_code", "")
        rows.append(
            [
                j["job_id"], j["model"], j["status"], str(j["priority"]), progress, str(j["attempts"]),
                j["created_at"][:19], error,
            ]
        )  # fmt: skip
    table = fitted_table(f"jobs ({body['meta']['total']} in all)", columns, rows, out.width)
    out.print(table)


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="The raw status document, as JSON")] = False,
    cluster: Annotated[
        bool, typer.Option("--cluster", help="The replicas behind the address: models, queues, memory")
    ] = False,
) -> None:
    """The running server's status: version, uptime, models, memory, queues, workers, GPUs, jobs.
    With --cluster: every replica's models, queues and free memory (GET /api/v1/cluster)."""
    body = _status(ctx, "/api/v1/cluster" if cluster else "/api/v1/status")
    if as_json:
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
        return
    for renderable in (render_cluster if cluster else render_status)(body, out.width):
        out.print(renderable)


@app.command()
def ps(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="The loaded models' status, as JSON")] = False,
) -> None:
    """The models loaded in the running server: memory, device, requests, until when they stay."""
    loaded = [m for m in _status(ctx).get("models", []) if m.get("pid") is not None]
    if as_json:
        sys.stdout.write(json.dumps(loaded, indent=2) + "\n")
        return
    if not loaded:
        out.print("no model is loaded")
        return
    out.print(ps_table(loaded, out.width))


def _status(ctx: typer.Context, path: str = "/api/v1/status") -> dict[str, Any]:
    settings = context(ctx).settings()
    try:
        body: dict[str, Any] = raise_for(require_server(ctx, settings, "GET", path, timeout=10))
    except ModelMoraError as exc:  # e.g. UNAUTHORIZED: a server that checks keys, no --api-key
        raise fail(exc) from None
    return body
