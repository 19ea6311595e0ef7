"""`modelmora init` and `modelmora serve`: write a configuration, run the server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from modelmora.cli.common import app, context, err, needs_server_extra, out
from modelmora.config import DEFAULT_CONFIG_FILE

INIT_TEMPLATE = """\
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
  # allowed_sources: {local_roots: [/srv/models]}   # what installs through the API may fetch
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
    path.write_text(INIT_TEMPLATE, encoding="utf-8")
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
    # Before anything imports grpc: the server forks model workers while grpc's threads run,
    # and grpc's fork handlers crash those children (see modelmora/api/__init__.py, which
    # sets the same default for servers started another way). The environment still wins.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    flags = {
        "host": host,
        "port": port,
        "grpc_port": grpc_port,
        "grpc_enabled": grpc,
        "rest_enabled": rest,
        "log_level": log_level,
        "log_format": log_format,
    }
    settings = context(ctx).settings({"server": {k: v for k, v in flags.items() if v is not None}})
    with needs_server_extra():
        from modelmora.app import serve as run_server
        from modelmora.config import ConfigurationError
        from modelmora.observability.logging import configure_logging

        configure_logging(settings.server.log_level, settings.server.log_format)
        try:
            run_server(settings)
        except ConfigurationError as exc:
            err.print(f"configuration error: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
