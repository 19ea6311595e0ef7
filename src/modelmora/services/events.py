"""Catalog events: what `RegistryService` tells its observers after each catalog write.

Every write of the catalog (install, update, use, uninstall) goes through one method of
`RegistryService`, which fires exactly one event once the write is committed, whatever door
it came through. Replicas broadcast these to each other; nothing else in the server depends
on them yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class CatalogChange(StrEnum):
    INSTALLED = "installed"  # a version was added (an install, or a lock entry installed)
    UPDATED = "updated"  # per-model settings changed
    ACTIVATED = "activated"  # another version became the active one
    UNINSTALLED = "uninstalled"  # a version, or the whole model, was removed


@dataclass(frozen=True, slots=True)
class CatalogEvent:
    kind: CatalogChange
    model: str
    # INSTALLED / ACTIVATED: that version; UNINSTALLED: the version removed, None when the
    # whole model went; UPDATED: None (settings are per model, not per version).
    version: str | None


CatalogObserver = Callable[[CatalogEvent], None]
