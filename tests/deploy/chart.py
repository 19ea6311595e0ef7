"""Rendering the Helm chart offline (helm-python-sdk: Helm's Go library, no helm binary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "modelmora"


def render(values: dict[str, Any] | None) -> dict[str, Any]:
    """{kind: object} of one release (the chart makes at most one object of each kind)."""
    chart = helm_python.Chart.load(CHART)
    try:
        manifests = chart.render(values, name="mm", namespace="ml", is_install=True)
    finally:
        chart.close()
    objects: dict[str, Any] = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                objects[doc["kind"]] = doc
    return objects
