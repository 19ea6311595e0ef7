"""Where a version's files live on a node: a path relative to one of two roots.

The registry database may be shared by several replicas, each with its own disks, so a
version's path is stored relative to the root its files belong under, never as one node's
absolute path:

- copies ModelMora made (local, URL and S3 sources) under `models_dir`: `<name>/<version>`;
- Hub snapshots in the Hugging Face cache (`cache_dir`): `models--org--name/snapshots/<sha>`.

Each node joins the relative path to its own roots. A path that fits neither root (written
by hand, or by a version of ModelMora that stored absolute paths and could not be migrated)
stays absolute and is used as it is. Absolute paths written before this rule are made
relative by the registry migration 0003 (by their layout: it knows no settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelmora.config import Settings


@dataclass(frozen=True)
class PathRoots:
    """This node's roots: `models` for ModelMora's copies, `hub` for the Hugging Face cache."""

    models: Path
    hub: Path

    def root_for(self, source_kind: str) -> Path:
        return self.hub if source_kind == "hub" else self.models


def roots_of(settings: Settings) -> PathRoots:
    return PathRoots(models=settings.models_dir, hub=settings.cache_dir)


def to_stored(roots: PathRoots | None, source_kind: str, path: str) -> str:
    """The path as the registry keeps it: relative to its root when under it."""
    if roots is None:
        return path
    absolute = Path(path)
    if not absolute.is_absolute():
        return path
    root = roots.root_for(source_kind)
    try:
        return absolute.relative_to(root).as_posix()
    except ValueError:
        return path  # outside the root: kept as it is (and used as it is)


def to_local(roots: PathRoots | None, source_kind: str, stored: str) -> str:
    """The path on this node: a relative one joined to this node's root."""
    if roots is None or Path(stored).is_absolute():
        return stored
    return str(roots.root_for(source_kind) / stored)
