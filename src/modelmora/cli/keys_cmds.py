"""`modelmora keys ...`: API keys in the registry database, managed without a server.

Keys live, as digests, in the registry database (auth/store.py), so these commands work on a
stopped server and every replica sees the same keys; a running server notices a new key at
once and a revocation within `auth.cache_seconds`. Needs the server extra (SQLAlchemy).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from modelmora.cli.common import EXIT_USAGE, context, err, fail, needs_server_extra, out
from modelmora.errors import ModelMoraError

if TYPE_CHECKING:
    from modelmora.auth.keys import KeyRecord
    from modelmora.auth.store import KeyStore

keys_app = typer.Typer(
    help="API keys (stored hashed in the registry database; no server needed).",
    no_args_is_help=True,
)

_DURATION = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_expiry(value: str, now: datetime | None = None) -> datetime:
    """`30d`, `12h`, `90m`, `2w` from now, or an ISO date (midnight UTC) or date-time (UTC
    unless it names its offset)."""
    now = now or datetime.now(UTC)
    text = value.strip().lower()
    match = _DURATION.match(text)
    if match:
        amount = int(match.group(1))
        if amount <= 0:
            raise ValueError("the duration must be positive")
        return now + timedelta(**{_UNITS[match.group(2)]: amount})
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration (30d, 12h, 90m, 2w) nor an ISO date") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@contextmanager
def key_store(ctx: typer.Context) -> Iterator[KeyStore]:
    settings = context(ctx).settings()
    with needs_server_extra():
        from modelmora.auth.store import KeyStore
        from modelmora.registry.store import RegistryStore

        store = RegistryStore(settings.database_url)
        try:
            store.create_schema()  # a first command on a new data dir, or an older database
            yield KeyStore(store.engine)
        except ModelMoraError as exc:
            raise fail(exc) from None
        finally:
            store.close()


def _state(record: KeyRecord, now: datetime) -> str:
    if record.revoked_at is not None:
        return "revoked"
    return "active" if record.usable_at(now) else "expired"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else "-"


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Who or what uses the key, e.g. 'search-api'")],
    scope: Annotated[
        list[str],
        typer.Option("--scope", "-s", help="infer (inference, own jobs) or admin (everything); repeatable"),
    ],
    expires: Annotated[
        str | None, typer.Option("--expires", help="30d, 12h, 2w, or an ISO date; default: never")
    ] = None,
) -> None:
    """Create a key and print its token, once: it is not stored and cannot be shown again."""
    try:
        from modelmora.auth.keys import parse_scopes

        scopes = parse_scopes(scope)
        expires_at = parse_expiry(expires) if expires is not None else None
    except ValueError as exc:
        err.print(f"[bold red]error[/]: {exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    with key_store(ctx) as keys:
        created = keys.create(name, scopes, expires_at)
    record = created.record
    err.print(
        f"created key {record.key_id} ({record.name}; scopes: {', '.join(sorted(record.scopes))}; "
        f"expires: {_when(record.expires_at)}).\n"
        "[bold yellow]Store the token now[/]: it is shown this once and only its hash is kept.",
        highlight=False,
    )
    # The token alone on stdout, so that `TOKEN=$(modelmora keys create ...)` captures it.
    out.print(created.token, highlight=False, soft_wrap=True)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per key, for scripts")] = False,
) -> None:
    """Every key: id, name, scopes, dates, state. No secrets: the tokens are not stored."""
    with key_store(ctx) as keys:
        stored = keys.list()
    now = datetime.now(UTC)
    if as_json:
        rows = [
            {
                "key_id": item.record.key_id,
                "name": item.record.name,
                "scopes": sorted(item.record.scopes),
                "created_at": _iso(item.record.created_at),
                "expires_at": _iso(item.record.expires_at),
                "revoked_at": _iso(item.record.revoked_at),
                "last_used_at": _iso(item.last_used_at),
                "state": _state(item.record, now),
            }
            for item in stored
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title=f"API keys ({len(stored)})")
    for col in ("key id", "name", "scopes", "created", "expires", "revoked", "last used", "state"):
        table.add_column(col, no_wrap=col == "key id")
    for item in stored:
        r = item.record
        table.add_row(
            r.key_id, r.name, ",".join(sorted(r.scopes)), _when(r.created_at), _when(r.expires_at),
            _when(r.revoked_at), _when(item.last_used_at), _state(r, now),
        )  # fmt: skip
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The key id (see `modelmora keys list`)")],
) -> None:
    """Revoke a key: refused at once by new servers, by running ones within auth.cache_seconds."""
    with key_store(ctx) as keys:
        record = keys.revoke(key_id)
    out.print(f"revoked {record.key_id} ({record.name}) at {_when(record.revoked_at)}", highlight=False)
