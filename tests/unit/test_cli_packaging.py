"""The CLI without the server extra: `pip install modelmora` gives the SDK and the commands
that talk to a running server; the commands that write the registry (and `serve`) need
`modelmora[server]` and say so. A missing library is simulated in a fresh interpreter with
`sys.modules[name] = None`, which makes its import fail as an absent package's would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HINT = "this command needs the server extra: pip install 'modelmora[server]'"
# No server listens there (port 9, discard): a server command must not reach a real one.
NO_SERVER = "http://127.0.0.1:9"


def run_cli(tmp_path: Path, blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    code = (
        f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
        f"sys.argv = ['modelmora', '--url', {NO_SERVER!r}, *{list(args)!r}]\n"
        "from modelmora.cli import main\nmain()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env["MODELMORA_SERVER__DATA_DIR"] = str(tmp_path / "data")
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "args",
    [
        ["install", "./some/folder"],
        ["install"],
        ["list"],
        ["info", "emb"],
        ["update", "emb", "--set", "max_batch_size=4"],
        ["use", "emb@v1"],
        ["uninstall", "emb"],
        ["lock"],
        ["serve", "--port", "0", "--grpc-port", "0"],
    ],
    ids=lambda a: " ".join(a),
)
def test_a_server_command_without_the_server_extra_names_it(tmp_path: Path, args: list[str]) -> None:
    proc = run_cli(tmp_path, ("sqlalchemy",), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert HINT in proc.stderr and "missing: sqlalchemy" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.db"))


SERVER_LIBRARIES = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "torch", "huggingface_hub", "grpc")


@pytest.mark.parametrize(
    "args", [["status"], ["ps"], ["health"], ["load", "emb"], ["unload", "emb"], ["jobs"]]
)
def test_a_client_command_runs_without_any_server_library(tmp_path: Path, args: list[str]) -> None:
    proc = run_cli(tmp_path, SERVER_LIBRARIES, *args)
    # It got as far as calling the server: none answers at NO_SERVER.
    assert proc.returncode == 1, proc.stderr
    assert f"no server answers at {NO_SERVER}" in proc.stderr and HINT not in proc.stderr


def test_importing_the_cli_loads_no_server_module() -> None:
    code = (
        "import sys; import modelmora.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{SERVER_LIBRARIES!r} or m.startswith(('modelmora.api', 'modelmora.services', 'modelmora.registry', "
        "'modelmora.lifecycle', 'modelmora.app', 'modelmora.client'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_needs_the_sdk_only(tmp_path: Path) -> None:
    """`modelmora run` uses the SDK (grpc included: a base dependency), no server library."""
    blocked = tuple(m for m in SERVER_LIBRARIES if m != "grpc")
    proc = run_cli(tmp_path, blocked, "run", "emb", "hello")
    assert proc.returncode == 1, proc.stderr
    assert f"no server answers at {NO_SERVER}" in proc.stderr and "Traceback" not in proc.stderr
