"""The catalog commands: install, list, info, update, use, uninstall, lock.

They work on the database in the data dir without a server, each through one call of the
same `RegistryService` the server's REST and gRPC doors call (so behaviour cannot differ
between doors); `list` and `info` add live state when a server answers, and `uninstall` asks
the running server first, which refuses a loaded model unless `--force`. They need the server
extra (sqlalchemy, the sources): without it they say so and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from modelmora.cli.common import (
    EXIT_USAGE,
    LOCK_FILE,
    app,
    context,
    err,
    fail,
    needs_server_extra,
    out,
    raise_for,
    registry_service,
    run,
    server_call,
)
from modelmora.errors import ModelMoraError
from modelmora.status_view import Column, fitted_table


def _looks_like_source(value: str) -> bool:
    return "://" in value or value.startswith((".", "/", "~")) or Path(value).exists()


def _active(record: dict[str, Any]) -> dict[str, Any]:
    version: dict[str, Any] = next(v for v in record["versions"] if v["version"] == record["active_version"])
    return version


@app.command()
def install(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Argument(help="Hub ID (org/name), a folder, or a URL; none: the lock file")
    ] = None,
    source: Annotated[str | None, typer.Option("--from", help="Take the files from a folder or URL")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name to register under")] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="txt2embed|img2embed|txt2txt|txt2img|img2txt")
    ] = None,
    version: Annotated[str | None, typer.Option("--version", help="Version tag")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit")] = None,
    lock: Annotated[Path, typer.Option("--lock", help="Lock file to install from")] = Path(LOCK_FILE),
) -> None:
    """Install a model, or everything in modelmora.lock (checksums verified)."""
    with registry_service(ctx) as registry:
        if model is None and source is None:
            if not lock.is_file():
                err.print(f"error: no model given and no {lock} to install from")
                raise typer.Exit(1)
            run(
                registry.apply_lock(
                    lock,
                    progress=True,
                    on_entry=lambda entry, outcome: out.print(
                        f"{entry.name}@{entry.version}: {outcome} (checksums verified)"
                    ),
                )
            )
            return
        from modelmora.registry.installer import InstallRequest

        model_id: str | None = model
        if model is not None and source is None and _looks_like_source(model):
            model_id, source = None, model
        if source is not None and "://" not in source:
            source = str(Path(source).expanduser().absolute())
        request = InstallRequest(
            model_id=model_id, source=source, name=name, version=version, revision=revision, task_type=task
        )
        record = run(registry.install(request, progress=True))
    active = _active(record)
    out.print(
        f"installed [bold]{record['name']}@{active['version']}[/] ({record['task_type']}, "
        f"{len(active['files'])} files, {active['size_bytes'] / 1e6:.1f} MB)"
    )


@app.command("list")
def list_models(
    ctx: typer.Context,
    task: Annotated[str | None, typer.Option("--task", help="Only this task type")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The records, as JSON")] = False,
) -> None:
    """List installed models."""
    with registry_service(ctx, live=True) as registry:
        listed = run(registry.list(task, page_size=1_000_000))
    if as_json:
        sys.stdout.write(json.dumps(listed["data"], indent=2, default=str) + "\n")
        return
    columns = [
        Column("name"),
        Column("task", keep=5),
        Column("version", keep=4),
        Column("versions", keep=1, justify="right"),
        Column("size", keep=3, justify="right"),
        Column("state", keep=6),
        Column("model id", keep=2),
    ]
    rows = []
    for rec in listed["data"]:
        active = _active(rec)
        rows.append(
            [
                rec["name"], rec["task_type"], active["version"], str(len(rec["versions"])),
                f"{active['size_bytes'] / 1e6:.1f} MB", rec["state"], rec["model_id"],
            ]
        )  # fmt: skip
    out.print(fitted_table("models", columns, rows, out.width))


@app.command()
def info(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Model name")]) -> None:
    """Show one model's record as JSON."""
    with registry_service(ctx, live=True) as registry:
        record = run(registry.get(name))
    out.print_json(json.dumps(record))


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


@app.command()
def update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name")],
    sets: Annotated[list[str], typer.Option("--set", help="key=value (JSON values allowed); key= removes")],
) -> None:
    """Change per-model settings (device, dtype, max_batch_size, ...)."""
    changes: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            err.print(f"error: --set takes key=value, got {item!r}")
            raise typer.Exit(EXIT_USAGE)
        changes[key.strip()] = _parse_value(raw) if raw != "" else None
    with registry_service(ctx) as registry:
        from modelmora.services.registry import RECORD_FIELDS

        fields = {k: changes.pop(k) for k in RECORD_FIELDS if k in changes}
        record = run(registry.update(name, changes, fields))
    out.print(f"updated {record['name']}: {json.dumps(record['config'])}")


@app.command()
def use(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="NAME@VERSION")]) -> None:
    """Make a version the active one."""
    name, _, version = ref.partition("@")
    if not version:
        err.print("error: give NAME@VERSION")
        raise typer.Exit(EXIT_USAGE)
    with registry_service(ctx) as registry:
        record = run(registry.use(name, version))
    out.print(f"{record['name']} now uses {version} (a loaded model switches at its next load)")


@app.command()
def uninstall(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")],
    force: Annotated[bool, typer.Option("--force", help="Unload it first if loaded")] = False,
) -> None:
    """Remove a model (or one version) and the files ModelMora copied for it."""
    settings = context(ctx).settings()
    with needs_server_extra():
        from modelmora.registry.catalog import parse_ref

        try:
            parse_ref(ref)  # a bad name never reaches a URL
            # A running server has the model perhaps loaded: it decides (and unloads it).
            response = server_call(
                ctx, settings, "DELETE", f"/api/v1/models/{ref}", params={"force": force}, timeout=30
            )
            if response is not None:
                raise_for(response)
        except ModelMoraError as exc:
            raise fail(exc) from None
    if response is None:
        with registry_service(ctx) as registry:
            run(registry.uninstall(ref, force))
    out.print(f"uninstalled {ref}")


@app.command()
def lock(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write it")] = Path(LOCK_FILE),
) -> None:
    """Write modelmora.lock: every model's origin, revision and per-file sha256."""
    with registry_service(ctx) as registry:
        document = run(registry.lock(output))
    out.print(f"wrote {output} ({len(document['models'])} models)")
