"""The `modelmora` command line.

One module per kind of command, each adding its commands to the one Typer `app`
(cli/common.py):

- server_cmds: `init`, `serve` (serve needs the server extra);
- registry_cmds: `install`, `list`, `info`, `update`, `use`, `uninstall`, `lock`: the catalog in
  the data dir, without a server, through the service layer (need the server extra);
- db_cmds: `db upgrade`, `db current` (and the hidden developer command `db revision`);
- keys_cmds: `keys create`, `keys list`, `keys revoke`: API keys in the registry database,
  without a server (need the server extra);
- client_cmds: `health`, `status`, `ps`, `load`, `unload`, `jobs`: a running server, over
  HTTP (the base install suffices), with `--api-key` / MODELMORA_API_KEY when it checks keys;
- run_cmds: `run MODEL [INPUT...]`: one inference through the SDK, shaped by the model's task
  (the base install suffices).

A group of subcommands (`modelmora db ...`) is a Typer app of its own module, added here with
`app.add_typer(...)`. No module of this package imports a server library at module level.
"""

from __future__ import annotations

import sys

from modelmora.cli.common import app, err
from modelmora.errors import ModelMoraError

# The order of these imports is the order of `modelmora --help`.
# isort: off
from modelmora.cli import server_cmds, registry_cmds, client_cmds, run_cmds

# isort: on
from modelmora.cli.db_cmds import db_app
from modelmora.cli.keys_cmds import keys_app

app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")

__all__ = ["app", "client_cmds", "db_app", "keys_app", "main", "registry_cmds", "run_cmds", "server_cmds"]


def main() -> None:
    try:
        app()
    except ModelMoraError as exc:  # anything a command did not catch itself
        err.print(f"error: {exc.code.value}: {exc.message}")
        sys.exit(1)
