"""What every command shares: the `modelmora` Typer app, its global options, output, errors,
calls to a running server, and the registry service the server-less commands run on.

Nothing here imports a server library at module level: `pip install modelmora` (the SDK and
the commands that talk to a running server) must be able to load the whole CLI. The commands
that need the server's libraries reach them through `needs_server_extra` or
`registry_service`, which turn their absence into one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from modelmora.config import Settings, load_settings
from modelmora.errors import ErrorCode, ModelMoraError

if TYPE_CHECKING:
    from modelmora.services.registry import RegistryService

T = TypeVar("T")

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
SERVER_EXTRA_HINT = "this command needs the server extra: pip install 'modelmora[server]'"
EXIT_USAGE = 2  # bad configuration or arguments, or a missing extra


class CliContext:
    """The global options (`--config`, `--data-dir`, `--url`, `--api-key`), shared by every
    command."""

    def __init__(
        self, config: Path | None, data_dir: Path | None, url: str | None, api_key: str | None = None
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.url = url
        self.api_key = api_key

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

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
            raise typer.Exit(EXIT_USAGE) from None

    def server_url(self, settings: Settings) -> str:
        if self.url:
            return self.url.rstrip("/")
        host = settings.server.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{host}:{settings.server.port}"


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration file")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Where the registry and models live")
    ] = None,
    url: Annotated[str | None, typer.Option("--url", help="A running server, for live state")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="MODELMORA_API_KEY",
            show_envvar=True,
            help="API key for a running server that checks keys",
        ),
    ] = None,
) -> None:
    ctx.obj = CliContext(config, data_dir, url, api_key)


def context(ctx: typer.Context) -> CliContext:
    obj: CliContext = ctx.obj
    return obj


def fail(exc: ModelMoraError) -> typer.Exit:
    err.print(f"[bold red]error[/]: {exc.code.value}: {exc.message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


# -- the server extra ---------------------------------------------------------------------------


@contextlib.contextmanager
def needs_server_extra() -> Iterator[None]:
    """A library of the server extra missing (sqlalchemy, fastapi, uvicorn...), at import or
    lazily inside the command: say which extra to install, exit 2. A missing module of our
    own is a bug and stays a traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "modelmora":
            raise
        err.print(f"[bold red]error[/]: {escape(SERVER_EXTRA_HINT)} (missing: {exc.name})", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a service call to completion. Not `asyncio.run`: its SIGINT handler would only
    cancel the task, while the blocking step running inline (a download) went on; here
    Ctrl-C interrupts the step itself and the installer's cleanup runs."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@contextlib.contextmanager
def registry_service(ctx: typer.Context, live: bool = False) -> Iterator[RegistryService]:
    """The catalog of the data dir, without a server: the same `RegistryService` the server's
    doors call, with blocking steps run inline. `live`: add the states a running server
    reports (one call, a short timeout; none when no server answers). ModelMoraError ends
    the command with its code; a missing server library with the extra's name."""
    settings = context(ctx).settings()
    states = live_states(ctx, settings) if live else {}
    with needs_server_extra():
        from modelmora.auth.keys import current_client
        from modelmora.registry.paths import roots_of
        from modelmora.registry.policy import InstallPolicy
        from modelmora.registry.store import RegistryStore
        from modelmora.services.registry import RegistryService, inline

        store = RegistryStore(settings.database_url, roots_of(settings))
        client = current_client.set("cli")  # where the audit log says the change came from
        try:
            store.create_schema()
            policy = InstallPolicy.for_cli(settings)  # None: the operator's CLI is trusted
            yield RegistryService(settings, store, live=states.get, offload=inline, policy=policy)
        except ModelMoraError as exc:
            raise fail(exc) from None
        finally:
            current_client.reset(client)
            store.close()


# -- a running server ---------------------------------------------------------------------------


def server_call(ctx: typer.Context, settings: Settings, method: str, path: str, **kwargs: Any) -> Any:
    """Call the running server; None when none answers."""
    import httpx

    cli = context(ctx)
    headers = {**cli.auth_headers(), **kwargs.pop("headers", {})}
    try:
        response = httpx.request(
            method,
            cli.server_url(settings) + path,
            timeout=kwargs.pop("timeout", 2.0),
            headers=headers,
            **kwargs,
        )
    except httpx.HTTPError:
        return None
    return response


def require_server(
    ctx: typer.Context, settings: Settings, method: str, path: str, timeout: float = 5.0
) -> Any:
    response = server_call(ctx, settings, method, path, timeout=timeout)
    if response is None:
        err.print(f"error: no server answers at {context(ctx).server_url(settings)}")
        raise typer.Exit(1)
    return response


def raise_for(response: Any) -> Any:
    """The body of a success; the server's error, as a ModelMoraError, otherwise."""
    body = response.json()
    if response.status_code >= 400:
        try:
            code = ErrorCode(body.get("error_code"))
        except ValueError:
            code = ErrorCode.INTERNAL_ERROR
        raise ModelMoraError(code, body.get("message", response.text), body.get("details"))
    return body


def live_states(ctx: typer.Context, settings: Settings) -> dict[str, dict[str, Any]]:
    """Each model's status in the running server, by name ({} when none answers)."""
    response = server_call(ctx, settings, "GET", "/health/models", timeout=0.5)
    if response is None or response.status_code != 200:
        return {}
    return {m["name"]: m for m in response.json().get("models", [])}
