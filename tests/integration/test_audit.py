"""The audit log: every admin operation through the services leaves exactly one line with who,
from where, what, on what and how it ended; the same from the CLI; rendered as one JSON line."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from modelmora.app import ModelMora
from modelmora.auth.audit import audit
from modelmora.auth.keys import Principal, Scope, current_client, current_principal
from modelmora.cli import app as cli_app
from modelmora.config import Settings
from modelmora.errors import ModelMoraError
from modelmora.lifecycle.runners import in_process_runner_factory
from modelmora.registry.installer import InstallRequest
from tests.conftest import make_fake_model

OPS = Principal("c3c3c3c3c3c3", "ops", frozenset({Scope.ADMIN}))
CLIENT = "10.0.0.7:51234"


@pytest.fixture
async def mm(settings: Settings) -> AsyncIterator[ModelMora]:
    server = ModelMora(settings, in_process_runner_factory)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def as_ops() -> Iterator[None]:
    principal, client = current_principal.set(OPS), current_client.set(CLIENT)
    yield
    current_client.reset(client)
    current_principal.reset(principal)


class Audit:
    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    async def one(self, call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        """Run the call (errors included) and return the one audit line it wrote."""
        self.caplog.clear()
        with self.caplog.at_level(logging.INFO, "modelmora.audit"), contextlib.suppress(ModelMoraError):
            await call()
        lines = [r for r in self.caplog.records if r.name == "modelmora.audit"]
        assert len(lines) == 1, [r.__dict__.get("action") for r in lines]
        r = lines[0]
        return {
            k: r.__dict__[k]
            for k in ("action", "target", "outcome", "key_id", "key_name", "client", "details")
        }


@pytest.fixture
def audited(caplog: pytest.LogCaptureFixture) -> Audit:
    return Audit(caplog)


def who(action: str, target: str | None, outcome: str = "ok") -> dict[str, Any]:
    return {
        "action": action,
        "target": target,
        "outcome": outcome,
        "key_id": OPS.key_id,
        "key_name": "ops",
        "client": CLIENT,
    }


def without_details(line: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k != "details"}


async def test_each_admin_operation_leaves_one_line(
    mm: ModelMora, audited: Audit, as_ops: None, tmp_path: Path
) -> None:
    source = make_fake_model(tmp_path / "src" / "fake")
    registry, management = mm.registry, mm.management

    line = await audited.one(
        lambda: registry.install(InstallRequest(source=str(source), name="m", version="v1"))
    )
    assert without_details(line) == who("model.install", "m")
    assert line["details"] == {"source": str(source), "model_id": None, "name": "m", "version": "v1"}
    await audited.one(lambda: registry.install(InstallRequest(source=str(source), name="m", version="v2")))

    line = await audited.one(lambda: registry.update("m", {"adapter": "fake"}, {"description": "d"}))
    assert without_details(line) == who("model.update", "m")
    assert line["details"] == {"config": {"adapter": "fake"}, "fields": ["description"]}

    line = await audited.one(lambda: registry.use("m", "v1"))
    assert without_details(line) == who("model.use", "m@v1")

    lock = tmp_path / "modelmora.lock"
    line = await audited.one(lambda: registry.lock(lock))
    assert without_details(line) == who("catalog.lock", str(lock)) and line["details"] == {"models": 1}
    line = await audited.one(lambda: registry.apply_lock(lock))
    assert without_details(line) == who("catalog.apply_lock", str(lock))
    assert line["details"] == {"installed": []}  # present already

    line = await audited.one(lambda: management.load("m"))
    assert without_details(line) == who("model.load", "m")
    line = await audited.one(lambda: management.warmup("m"))
    assert without_details(line) == who("model.warmup", "m")
    line = await audited.one(lambda: management.unload("m"))
    assert without_details(line) == who("model.unload", "m") and line["details"] == {
        "force": False,
        "unloaded": True,
    }

    line = await audited.one(lambda: registry.uninstall("m@v2"))
    assert without_details(line) == who("model.uninstall", "m@v2") and line["details"] == {"force": False}

    # A refused operation is audited with its error code.
    assert (await audited.one(lambda: registry.uninstall("nope")))["outcome"] == "MODEL_NOT_FOUND"
    assert (await audited.one(lambda: management.load("nope")))["outcome"] == "MODEL_NOT_FOUND"
    assert (await audited.one(lambda: registry.use("m", "v9")))["outcome"] == "MODEL_NOT_FOUND"
    bad = await audited.one(lambda: registry.update("m", {"no_such_key": 1}))
    assert bad["outcome"] == "VALIDATION_ERROR"


async def test_reads_are_not_audited(mm: ModelMora, caplog: pytest.LogCaptureFixture, as_ops: None) -> None:
    with caplog.at_level(logging.INFO, "modelmora.audit"):
        await mm.registry.list()
        await mm.management.status()
        mm.management.health()
    assert [r for r in caplog.records if r.name == "modelmora.audit"] == []


def test_the_cli_is_audited_as_cli(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_fake_model(tmp_path / "src" / "fake")
    args = ["--data-dir", str(settings.server.data_dir)]
    with caplog.at_level(logging.INFO, "modelmora.audit"):
        result = CliRunner().invoke(cli_app, [*args, "install", str(source), "--name", "m"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(cli_app, [*args, "uninstall", "m"])
        assert result.exit_code == 0, result.output
    lines = [r.__dict__ for r in caplog.records if r.name == "modelmora.audit"]
    assert [(r["action"], r["target"], r["client"], r["outcome"]) for r in lines] == [
        ("model.install", "m", "cli", "ok"),
        ("model.uninstall", "m", "cli", "ok"),
    ]
    assert current_client.get() == "local"  # the command's client does not outlive it


def test_one_json_line_even_with_logging_at_warning(capsys: pytest.CaptureFixture[str]) -> None:
    from modelmora.observability.logging import configure_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("warning", "json")
    principal, client = current_principal.set(OPS), current_client.set(CLIENT)
    try:
        audit("key.revoke", "d4d4d4d4d4d4", name="old deploy key")
    finally:
        current_client.reset(client)
        current_principal.reset(principal)
        root.handlers[:] = handlers
        root.setLevel(level)
    (line,) = capsys.readouterr().err.strip().splitlines()
    record = json.loads(line)
    assert record["logger"] == "modelmora.audit" and record["level"] == "info"
    assert {
        k: record[k] for k in ("event", "action", "target", "outcome", "key_id", "key_name", "client")
    } == {
        "event": "admin action",
        "action": "key.revoke",
        "target": "d4d4d4d4d4d4",
        "outcome": "ok",
        "key_id": OPS.key_id,
        "key_name": "ops",
        "client": CLIENT,
    }
    assert record["details"] == {"name": "old deploy key"} and record["audit"] is True
