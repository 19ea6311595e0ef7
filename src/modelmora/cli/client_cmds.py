"""The commands that talk to a running server: health, status, load, unload, jobs.

They need only the base install (`pip install modelmora`): httpx, typer and rich, no server
library, so an operator's machine can watch and steer a server it does not run.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from modelmora.cli.common import app, context, fail, out, raise_for, require_server
from modelmora.errors import ModelMoraError


@app.command()
def health(ctx: typer.Context) -> None:
    """Readiness of the running server and the state of each model."""
    settings = context(ctx).settings()
    ready = require_server(ctx, settings, "GET", "/health/ready")
    models = require_server(ctx, settings, "GET", "/health/models").json().get("models", [])
    out.print(f"server: {ready.json().get('status')}")
    table = Table(title="models")
    for col in ("name", "state", "pid", "queued", "in flight", "rss", "error"):
        table.add_column(col)
    for m in models:
        table.add_row(
            m["name"],
            m["state"],
            str(m["pid"] or "-"),
            str(m["queued"]),
            str(m["in_flight"]),
            f"{m['memory']['rss_bytes'] / 1e6:.0f} MB",
            m["error"] or "",
        )
    out.print(table)
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
    table = Table(title=f"jobs ({body['meta']['total']} in all)")
    table.add_column("job id", no_wrap=True, min_width=36)  # ids are copied from here
    for col in ("model", "status", "priority", "progress", "attempts", "created", "error"):
        table.add_column(col)
    for j in body["data"]:
        progress = f"{j['progress'] * 100:.0f}%" if j["progress"] is not None else "-"
        error = (j["error"] or {}).get("error_code", "")
        table.add_row(
            j["job_id"], j["model"], j["status"], str(j["priority"]), progress, str(j["attempts"]),
            j["created_at"][:19], error,
        )  # fmt: skip
    out.print(table)


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="The raw status document, as JSON")] = False,
) -> None:
    """The running server's status: version, uptime, models, memory, queues, workers, GPUs, jobs."""
    settings = context(ctx).settings()
    try:
        body = raise_for(require_server(ctx, settings, "GET", "/api/v1/status", timeout=10))
    except ModelMoraError as exc:  # e.g. UNAUTHORIZED: a server that checks keys, no --api-key
        raise fail(exc) from None
    if as_json:
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
        return
    from modelmora.status_view import render_status

    for renderable in render_status(body):
        out.print(renderable)
