"""The package import graph: layered, no cycle, and an SDK that imports nothing of the server.

grimp reads every import statement, function-local ones and those under TYPE_CHECKING
included; the one allowed exception is a TYPE_CHECKING-only import of the composition root
(`modelmora.app`), which the routers use to type their reference to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import grimp
import pytest

# Top to bottom: a package may import packages of its own layer's index or below, never above.
# Packages in one row never import each other.
LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"app"},
    {"api"},
    {"jobs"},
    {"services", "status_view"},
    {"cluster"},  # routing between replicas: below the services that forward, above auth
    {"auth"},
    {"lifecycle"},
    {"inference"},
    {"tasks", "registry", "results"},
    {"observability"},
    {"config"},
    {"migrations"},  # imports nothing of the project: the table definitions are passed in
    {"client"},
    {"v1"},
    {"contracts", "errors", "console", ""},  # "" is the root package (its __version__); console: files
]
# What the SDK may import: itself and the protocol, nothing that needs the server's extra.
CLIENT_ALLOWED = {"client", "v1", "errors", "contracts", ""}
# Heavy or server-only third-party modules the SDK must never pull in.
SERVER_ONLY_MODULES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "torch",
    "transformers",
    "modelmora.api",
)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(package: str) -> int:
    for index, row in enumerate(LAYERS):
        if package in row:
            return index
    raise AssertionError(f"package modelmora.{package} is in no layer of LAYERS: place it")


@pytest.fixture(scope="module")
def graphs() -> tuple[grimp.ImportGraph, grimp.ImportGraph]:
    full = grimp.build_graph("modelmora", include_external_packages=False, cache_dir=None)
    runtime = grimp.build_graph(
        "modelmora", include_external_packages=False, exclude_type_checking_imports=True, cache_dir=None
    )
    return full, runtime


def _edges(full: grimp.ImportGraph, runtime: grimp.ImportGraph) -> Iterator[tuple[str, str]]:
    for importer in full.modules:
        runtime_targets = runtime.find_modules_directly_imported_by(importer)
        for imported in full.find_modules_directly_imported_by(importer):
            typing_only = imported not in runtime_targets
            if typing_only and imported == "modelmora.app":
                continue
            yield importer, imported


def test_every_package_sits_below_what_imports_it(
    graphs: tuple[grimp.ImportGraph, grimp.ImportGraph],
) -> None:
    wrong = []
    for importer, imported in _edges(*graphs):
        a, b = _top(importer), _top(imported)
        if a != b and _layer(a) >= _layer(b):
            wrong.append(f"{importer} -> {imported}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_package_cycle(graphs: tuple[grimp.ImportGraph, grimp.ImportGraph]) -> None:
    adjacency: dict[str, set[str]] = {}
    for importer, imported in _edges(*graphs):
        a, b = _top(importer), _top(imported)
        if a != b:
            adjacency.setdefault(a, set()).add(b)
    cycles = [(a, b) for a, targets in adjacency.items() for b in targets if a in adjacency.get(b, set())]
    assert not cycles


def test_contracts_import_nothing_of_the_project(graphs: tuple[grimp.ImportGraph, grimp.ImportGraph]) -> None:
    outside = [
        f"{importer} -> {imported}"
        for importer, imported in _edges(*graphs)
        if _top(importer) == "contracts" and _top(imported) != "contracts"
    ]
    assert not outside


def test_the_sdk_imports_no_server_module(graphs: tuple[grimp.ImportGraph, grimp.ImportGraph]) -> None:
    full, _ = graphs
    bad = [
        f"{importer} -> {imported}"
        for importer in full.find_children("modelmora.client") | {"modelmora.client"}
        for imported in full.find_modules_directly_imported_by(importer)
        if _top(imported) not in CLIENT_ALLOWED
    ]
    assert not bad


def test_importing_the_sdk_loads_no_server_library_and_leaves_grpc_fork_support_alone() -> None:
    # A fresh interpreter: what `import modelmora.client` really pulls in, transitively.
    code = (
        "import os, sys; import modelmora.client; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_ONLY_MODULES!r} "
        f"or m.startswith('modelmora.api'))); print(os.environ.get('GRPC_ENABLE_FORK_SUPPORT'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded, fork_support = out.stdout.splitlines()
    assert loaded == "[]"
    assert fork_support == "None"
