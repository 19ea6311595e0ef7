"""The web console's files (package data): `index.html` and `static/` (its script, its style
sheet and the vendored chart library, uPlot, with its license). Served by api/console.py at
`/ui`; nothing here is built or fetched at run time (docs/console.md says why this shape)."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def root() -> Traversable:
    return files(__name__)
