"""`modelmora` with a spy on the service layer, run as a script in place of `python -m modelmora`.

Every call of `RegistryService.install` (the request it got, the record it returned) and
every catalog event its instances fire go as one JSON line to the file named by
$DOOR_SPY_FILE, from whichever process runs them: the server (REST and gRPC) or the CLI.
Nothing else changes: the real method runs, the real command line is parsed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from modelmora.registry.installer import InstallRequest
from modelmora.services.events import CatalogEvent
from modelmora.services.registry import RegistryService

SPY_FILE = os.environ["DOOR_SPY_FILE"]


def _write(line: dict[str, Any]) -> None:
    with open(SPY_FILE, "a", encoding="utf-8") as spy:
        spy.write(json.dumps(line) + "\n")


_install = RegistryService.install
_init = RegistryService.__init__


async def _spied_install(
    self: RegistryService, req: InstallRequest, progress: bool = False
) -> dict[str, Any]:
    record = await _install(self, req, progress)
    _write({"call": "install", "request": dataclasses.asdict(req), "record": record})
    return record


def _spied_init(self: RegistryService, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)

    def heard(event: CatalogEvent) -> None:
        _write({"call": "event", "kind": event.kind.value, "model": event.model, "version": event.version})

    self.subscribe(heard)


RegistryService.install = _spied_install  # type: ignore[method-assign]
RegistryService.__init__ = _spied_init  # type: ignore[method-assign]

if __name__ == "__main__":
    from modelmora.cli import main

    main()
