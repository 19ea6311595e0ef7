"""The `modelmora` command line.

Registry commands (install, list, info, update, use, uninstall, lock) work on the database in
the data dir without a server; list/info add live state when a server answers. load, unload,
status and health talk to the running server.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modelmora.config import DEFAULT_CONFIG_FILE, Settings, load_settings
from modelmora.errors import ModelMoraError

app = typer.Typer(
    name="modelmora",
    help="One server for many PyTorch models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

LOCK_FILE = "modelmora.lock"


class _Ctx:
    def __init__(self, config: Path | None, data_dir: Path | None, url: str | None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.url = url
        self._settings: Settings | None = None

    def settings(self, overrides: dict[str, Any] | None = None) -> Settings:
        merged: dict[str, Any] = {}
        if self.data_dir is not None:
            merged["server"] = {"data_dir": str(self.data_dir)}
        for key, value in (overrides or {}).items():
            merged.setdefault(key, {}).update(value)
        try:
            return load_settings(self.config, merged or None)
        except Exception as exc:  # a bad file, key or value: one line, not a traceback
            message = str(exc).replace("\n", "; ")
            err.print(f"[bold red]error[/]: invalid configuration: {message}", highlight=False)
            raise typer.Exit(2) from None

    def server_url(self, settings: Settings) -> str:
        if self.url:
            return self.url.rstrip("/")
        host = settings.server.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{host}:{settings.server.port}"


def _fail(exc: ModelMoraError) -> typer.Exit:
    err.print(f"[bold red]error[/]: {exc.code.value}: {exc.message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration file")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Where the registry and models live")
    ] = None,
    url: Annotated[str | None, typer.Option("--url", help="A running server, for live state")] = None,
) -> None:
    ctx.obj = _Ctx(config, data_dir, url)


def _c(ctx: typer.Context) -> _Ctx:
    obj: _Ctx = ctx.obj
    return obj


def _store(settings: Settings) -> Any:
    from modelmora.registry.store import RegistryStore

    store = RegistryStore(settings.database_url)
    store.create_schema()
    return store


def _server(ctx: typer.Context, settings: Settings, method: str, path: str, **kwargs: Any) -> Any:
    """Call the running server; None when none answers."""
    import httpx

    try:
        response = httpx.request(
            method, _c(ctx).server_url(settings) + path, timeout=kwargs.pop("timeout", 2.0), **kwargs
        )
    except httpx.HTTPError:
        return None
    return response


def _raise_for(response: Any) -> Any:
    body = response.json()
    if response.status_code >= 400:
        from modelmora.errors import ErrorCode

        try:
            code = ErrorCode(body.get("error_code"))
        except ValueError:
            code = ErrorCode.INTERNAL_ERROR
        raise ModelMoraError(code, body.get("message", response.text), body.get("details"))
    return body


# -- init / serve -----------------------------------------------------------------------------

_INIT_TEMPLATE = """\
# ModelMora configuration. Every key can also be set as MODELMORA_<SECTION>__<KEY>
# in the environment, which wins over this file; CLI flags win over both.
server:
  host: 127.0.0.1
  port: 8000
  grpc_port: 50051
  # grpc_enabled: true            # rest_enabled: true; either can be turned off
  # data_dir: ~/.modelmora        # registry database, model copies, results
  # log_format: auto              # json | console | auto (console on a terminal)
  # drain_seconds: 30
registry:
  # database_url: postgresql+psycopg://user@host/modelmora   # default: SQLite in data_dir
  # hub_endpoint: https://huggingface.co
  # s3_endpoint_url: http://minio:9000                          # for --from s3://bucket/prefix
resources:
  default_device: auto            # auto | cpu | cuda | cuda:N
  default_dtype: auto             # auto | float32 | float16 | bfloat16
  # max_memory_mb: 8192
lifecycle:
  keep_alive_seconds: 300
  preload: []
scheduler:
  max_batch_size: 32
  max_wait_ms: 0                  # 0: dispatch as soon as the worker is idle
jobs:
  backend: sqlite                 # sqlite (data_dir/jobs.db) | redis (several replicas)
  # redis_url: redis://127.0.0.1:6379/0
  max_pending: 10000
results:
  backend: files                  # files (data_dir/results) | s3
  inline_max_bytes: 1048576       # larger job results go to the result store
  # s3: {bucket: my-results, endpoint_url: http://minio:9000}
limits:
  max_request_bytes: 16777216
  max_items: 256
  max_text_chars: 100000
"""


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the configuration")] = Path(
        DEFAULT_CONFIG_FILE
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file")] = False,
) -> None:
    """Write a commented modelmora.yaml."""
    if path.exists() and not force:
        err.print(f"error: {path} exists (use --force to overwrite)")
        raise typer.Exit(1)
    path.write_text(_INIT_TEMPLATE, encoding="utf-8")
    out.print(f"wrote {path}")


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="REST port")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (0: any free one)")] = None,
    grpc: Annotated[bool | None, typer.Option("--grpc/--no-grpc", help="Serve gRPC (default: on)")] = None,
    rest: Annotated[bool | None, typer.Option("--rest/--no-rest", help="Serve REST (default: on)")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug|info|warning|error")] = None,
    log_format: Annotated[str | None, typer.Option(help="json|console|auto")] = None,
) -> None:
    """Start the server (REST on 127.0.0.1:8000 and gRPC on 127.0.0.1:50051 by default)."""
    flags = {
        "host": host,
        "port": port,
        "grpc_port": grpc_port,
        "grpc_enabled": grpc,
        "rest_enabled": rest,
        "log_level": log_level,
        "log_format": log_format,
    }
    settings = _c(ctx).settings({"server": {k: v for k, v in flags.items() if v is not None}})
    from modelmora.app import serve as run_server
    from modelmora.observability.logging import configure_logging

    configure_logging(settings.server.log_level, settings.server.log_format)
    run_server(settings)


# -- registry ---------------------------------------------------------------------------------


def _looks_like_source(value: str) -> bool:
    return "://" in value or value.startswith((".", "/", "~")) or Path(value).exists()


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
    from modelmora.registry.installer import InstallRequest, install_from_lock_entry
    from modelmora.registry.installer import install as do_install

    settings = _c(ctx).settings()
    store = _store(settings)
    try:
        if model is None and source is None:
            from modelmora.registry.lockfile import read_lock

            if not lock.is_file():
                err.print(f"error: no model given and no {lock} to install from")
                raise typer.Exit(1)
            for entry in read_lock(lock):
                outcome = install_from_lock_entry(settings, store, entry, progress=True)
                out.print(f"{entry.name}@{entry.version}: {outcome} (checksums verified)")
            return
        model_id: str | None = model
        if model is not None and source is None and _looks_like_source(model):
            model_id, source = None, model
        if source is not None and "://" not in source:
            source = str(Path(source).expanduser().absolute())
        record = do_install(
            settings,
            store,
            InstallRequest(
                model_id=model_id,
                source=source,
                name=name,
                version=version,
                revision=revision,
                task_type=task,
            ),
            progress=True,
        )
    except ModelMoraError as exc:
        raise _fail(exc) from None
    finally:
        store.close()
    active = record.version()
    out.print(
        f"installed [bold]{record.name}@{active.version}[/] ({record.task_type.value}, "
        f"{len(active.files)} files, {active.size_bytes / 1e6:.1f} MB)"
    )


def _live_states(ctx: typer.Context, settings: Settings) -> dict[str, str]:
    response = _server(ctx, settings, "GET", "/health/models", timeout=0.5)
    if response is None or response.status_code != 200:
        return {}
    return {m["name"]: m["state"] for m in response.json().get("models", [])}


@app.command("list")
def list_models(
    ctx: typer.Context,
    task: Annotated[str | None, typer.Option("--task", help="Only this task type")] = None,
) -> None:
    """List installed models."""
    settings = _c(ctx).settings()
    store = _store(settings)
    try:
        records, _ = store.list(task, 1, 1_000_000)
    finally:
        store.close()
    live = _live_states(ctx, settings)
    table = Table(title="models")
    for col in ("name", "task", "version", "versions", "size", "state", "model id"):
        table.add_column(col)
    for rec in records:
        v = rec.version()
        table.add_row(
            rec.name,
            rec.task_type.value,
            v.version,
            str(len(rec.versions)),
            f"{v.size_bytes / 1e6:.1f} MB",
            live.get(rec.name, "registered"),
            rec.model_id,
        )
    out.print(table)


@app.command()
def info(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Model name")]) -> None:
    """Show one model's record as JSON."""
    from modelmora.registry.catalog import parse_ref
    from modelmora.service import model_to_dict

    settings = _c(ctx).settings()
    store = _store(settings)
    try:
        model, _ = parse_ref(name)
        record = store.get(model)
    except ModelMoraError as exc:
        raise _fail(exc) from None
    finally:
        store.close()
    live = None
    response = _server(ctx, settings, "GET", "/health/models", timeout=0.5)
    if response is not None and response.status_code == 200:
        live = next((m for m in response.json().get("models", []) if m["name"] == record.name), None)
    data = model_to_dict(record, live["state"] if live else "registered", live)
    out.print_json(json.dumps(data))


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
    from modelmora.registry.catalog import validate_name
    from modelmora.registry.installer import validate_config

    changes: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            err.print(f"error: --set takes key=value, got {item!r}")
            raise typer.Exit(2)
        changes[key.strip()] = _parse_value(raw) if raw != "" else None
    settings = _c(ctx).settings()
    store = _store(settings)
    try:
        top = {
            k: changes.pop(k)
            for k in ("display_name", "description", "resource_requirements")
            if k in changes
        }
        record = store.update(validate_name(name), validate_config(changes) | top)
    except ModelMoraError as exc:
        raise _fail(exc) from None
    finally:
        store.close()
    out.print(f"updated {record.name}: {json.dumps(record.config)}")


@app.command()
def use(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="NAME@VERSION")]) -> None:
    """Make a version the active one."""
    from modelmora.registry.catalog import parse_ref

    settings = _c(ctx).settings()
    store = _store(settings)
    try:
        name, version = parse_ref(ref)
        if version is None:
            err.print("error: give NAME@VERSION")
            raise typer.Exit(2)
        store.set_active(name, version)
    except ModelMoraError as exc:
        raise _fail(exc) from None
    finally:
        store.close()
    out.print(f"{name} now uses {version} (a loaded model switches at its next load)")


@app.command()
def uninstall(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION")],
    force: Annotated[bool, typer.Option("--force", help="Unload it first if loaded")] = False,
) -> None:
    """Remove a model (or one version) and the files ModelMora copied for it."""
    from modelmora.registry.catalog import parse_ref
    from modelmora.service import remove_files

    settings = _c(ctx).settings()
    try:
        name, version = parse_ref(ref)
        response = _server(
            ctx, settings, "DELETE", f"/api/v1/models/{ref}", params={"force": force}, timeout=30
        )
        if response is not None:
            _raise_for(response)
        else:
            store = _store(settings)
            try:
                remove_files(settings, store.delete(name, version))
            finally:
                store.close()
    except ModelMoraError as exc:
        raise _fail(exc) from None
    out.print(f"uninstalled {ref}")


@app.command()
def lock(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write it")] = Path(LOCK_FILE),
) -> None:
    """Write modelmora.lock: every model's origin, revision and per-file sha256."""
    from modelmora.registry.installer import lock_entries
    from modelmora.registry.lockfile import write_lock

    settings = _c(ctx).settings()
    store = _store(settings)
    try:
        records, _ = store.list(None, 1, 1_000_000)
    finally:
        store.close()
    write_lock(output, lock_entries(records), datetime.now(UTC))
    out.print(f"wrote {output} ({len(records)} models)")


# -- server control ---------------------------------------------------------------------------


def _require_server(
    ctx: typer.Context, settings: Settings, method: str, path: str, timeout: float = 5.0
) -> Any:
    response = _server(ctx, settings, method, path, timeout=timeout)
    if response is None:
        err.print(f"error: no server answers at {_c(ctx).server_url(settings)}")
        raise typer.Exit(1)
    return response


@app.command()
def health(ctx: typer.Context) -> None:
    """Readiness of the running server and the state of each model."""
    settings = _c(ctx).settings()
    ready = _require_server(ctx, settings, "GET", "/health/ready")
    models = _require_server(ctx, settings, "GET", "/health/models").json().get("models", [])
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
    settings = _c(ctx).settings()
    try:
        body = _raise_for(_require_server(ctx, settings, "POST", f"/api/v1/models/{name}/load", timeout=600))
    except ModelMoraError as exc:
        raise _fail(exc) from None
    out.print(f"{name}: {body['state']} (pid {body['pid']}, {body['device']})")


@app.command()
def unload(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Model name")]) -> None:
    """Unload a model in the running server (ends its worker process)."""
    settings = _c(ctx).settings()
    try:
        body = _raise_for(_require_server(ctx, settings, "POST", f"/api/v1/models/{name}/unload", timeout=60))
    except ModelMoraError as exc:
        raise _fail(exc) from None
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
    settings = _c(ctx).settings()
    params = {k: v for k, v in (("status", status), ("model", model)) if v}
    query = "&".join(f"{k}={v}" for k, v in params.items())
    try:
        body = _raise_for(
            _require_server(ctx, settings, "GET", f"/api/v1/jobs?page_size={limit}&{query}".rstrip("&"))
        )
    except ModelMoraError as exc:
        raise _fail(exc) from None
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
    settings = _c(ctx).settings()
    body = _require_server(ctx, settings, "GET", "/api/v1/status", timeout=10).json()
    if as_json:
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
        return
    from modelmora.status_view import render_status

    for renderable in render_status(body):
        out.print(renderable)


# -- db: schema migrations (no server needed) -------------------------------------------------

db_app = typer.Typer(
    help="Schema of the registry database and the SQLite job store (Alembic migrations).",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")


def _databases(settings: Settings) -> list[tuple[str, str, Any]]:
    """(label, URL, migrations.Database) of each database this configuration uses."""
    from modelmora import migrations

    found: list[tuple[str, str, Any]] = [("registry", settings.database_url, migrations.REGISTRY)]
    if settings.jobs.backend == "sqlite":  # the file jobs/service.py's build_job_store opens
        found.append(("jobs", f"sqlite:///{settings.server.data_dir / 'jobs.db'}", migrations.JOBS))
    return found


def _shown(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create the databases or upgrade them to the latest schema (a server does this at start)."""
    from sqlalchemy.exc import SQLAlchemyError

    from modelmora import migrations

    for label, url, db in _databases(_c(ctx).settings()):
        try:
            before = migrations.current(url, db)
            after = migrations.upgrade(url, db)
        except (SQLAlchemyError, RuntimeError) as exc:
            err.print(f"[bold red]error[/]: {label} ({_shown(url)}): {exc}", highlight=False)
            raise typer.Exit(1) from None
        change = f"upgraded {before or 'no history'} -> {after}" if before != after else f"at {after} (head)"
        out.print(f"{label}: {change}  {_shown(url)}", highlight=False)


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """The schema revision of each database, and the latest this version of modelmora has."""
    from sqlalchemy.exc import SQLAlchemyError

    from modelmora import migrations

    for label, url, db in _databases(_c(ctx).settings()):
        head = migrations.head(db)
        try:
            rev = migrations.current(url, db)
        except SQLAlchemyError as exc:
            err.print(f"[bold red]error[/]: {label} ({_shown(url)}): {exc}", highlight=False)
            raise typer.Exit(1) from None
        state = "head" if rev == head else f"head is {head}: run `modelmora db upgrade`"
        out.print(f"{label}: {rev or 'none'} ({state})  {_shown(url)}", highlight=False)


@db_app.command("revision", hidden=True)
def db_revision(
    message: Annotated[str, typer.Argument(help="What the revision changes, e.g. 'add api keys'")],
    jobs: Annotated[bool, typer.Option("--jobs", help="The job store, not the registry")] = False,
    empty: Annotated[bool, typer.Option("--empty", help="No autogenerated operations")] = False,
) -> None:
    """For developers: write the next revision file into the source tree, its operations
    generated from the difference between the table definitions and the current head."""
    from modelmora import migrations

    if jobs:
        from modelmora.jobs.sqlite_store import METADATA as metadata
    else:
        from modelmora.registry.store import METADATA as metadata
    db = migrations.JOBS if jobs else migrations.REGISTRY
    path = migrations.new_revision(db, message, metadata, autogenerate=not empty)
    out.print(f"wrote {path}: review it before committing", highlight=False)


def main() -> None:
    try:
        app()
    except ModelMoraError as exc:  # anything a command did not catch itself
        err.print(f"error: {exc.code.value}: {exc.message}")
        sys.exit(1)
