"""load_settings: defaults < YAML file < MODELMORA_* environment < overrides (CLI flags)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from modelmora.config import DEFAULT_CONFIG_FILE, Settings, load_settings
from modelmora.contracts.tasks import TaskType
from modelmora.tasks.specs import default_timeout


@pytest.fixture(autouse=True)
def clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test runs in an empty folder (no stray ./modelmora.yaml) with no MODELMORA_* vars
    and a HOME of its own, so '~' expands somewhere we control."""
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("MODELMORA_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    s = load_settings()
    assert s.server.host == "127.0.0.1"
    assert s.server.port == 8000
    assert s.scheduler.max_batch_size == 32
    assert s.scheduler.max_wait_ms == 0
    assert s.limits.max_items == 256
    assert s.jobs.backend == "sqlite"
    assert s.results.backend == "files"


def test_data_dir_tilde_is_expanded(clean: Path) -> None:
    s = load_settings()
    assert s.server.data_dir == clean / "home" / ".modelmora"
    assert s.server.data_dir.is_absolute()
    s = load_settings(overrides={"server": {"data_dir": "~/elsewhere"}})
    assert s.server.data_dir == clean / "home" / "elsewhere"


def test_relative_data_dir_becomes_absolute(clean: Path) -> None:
    s = load_settings(overrides={"server": {"data_dir": "rel/data"}})
    assert s.server.data_dir == clean / "rel" / "data"


def test_derived_locations_live_under_data_dir(clean: Path) -> None:
    s = load_settings(overrides={"server": {"data_dir": str(clean / "data")}})
    assert s.database_url == f"sqlite:///{clean / 'data' / 'registry.db'}"
    assert s.cache_dir == clean / "data" / "cache"
    assert s.models_dir == clean / "data" / "models"
    s = load_settings(overrides={"registry": {"database_url": "postgresql+psycopg://u@h/db"}})
    assert s.database_url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(
    ("yaml", "env", "overrides", "expected_port", "expected_host"),
    [
        (None, {}, None, 8000, "127.0.0.1"),
        ("server:\n  port: 1111\n  host: 0.0.0.0\n", {}, None, 1111, "0.0.0.0"),
        (
            "server:\n  port: 1111\n  host: 0.0.0.0\n",
            {"MODELMORA_SERVER__PORT": "2222"},
            None,
            2222,
            "0.0.0.0",
        ),
        (None, {"MODELMORA_SERVER__PORT": "2222"}, None, 2222, "127.0.0.1"),
        (
            "server:\n  port: 1111\n  host: 0.0.0.0\n",
            {"MODELMORA_SERVER__PORT": "2222"},
            {"server": {"port": 3333}},
            3333,
            "0.0.0.0",
        ),
        ("server:\n  port: 1111\n", {}, {"server": {"host": "::"}}, 1111, "::"),
        (None, {"MODELMORA_SERVER__HOST": "10.0.0.1"}, {"server": {"port": 4444}}, 4444, "10.0.0.1"),
    ],
)
def test_precedence(
    clean: Path,
    monkeypatch: pytest.MonkeyPatch,
    yaml: str | None,
    env: dict[str, str],
    overrides: dict[str, object] | None,
    expected_port: int,
    expected_host: str,
) -> None:
    config = write_yaml(clean / "conf.yaml", yaml) if yaml is not None else None
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = load_settings(config, overrides)
    assert (s.server.port, s.server.host) == (expected_port, expected_host)


def test_dot_modelmora_yaml_is_read_when_present(clean: Path) -> None:
    write_yaml(clean / DEFAULT_CONFIG_FILE, "scheduler:\n  max_batch_size: 7\n")
    assert load_settings().scheduler.max_batch_size == 7


def test_explicit_config_wins_over_dot_modelmora_yaml(clean: Path) -> None:
    write_yaml(clean / DEFAULT_CONFIG_FILE, "scheduler:\n  max_batch_size: 7\n")
    other = write_yaml(clean / "other.yaml", "scheduler:\n  max_batch_size: 9\n")
    assert load_settings(other).scheduler.max_batch_size == 9


def test_missing_config_file(clean: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(clean / "nope.yaml")


def test_env_nested_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELMORA_SCHEDULER__MAX_WAIT_MS", "12.5")
    monkeypatch.setenv("MODELMORA_SERVER__GRPC_ENABLED", "true")
    monkeypatch.setenv("MODELMORA_LIFECYCLE__PRELOAD", '["a", "b"]')
    monkeypatch.setenv("MODELMORA_RESULTS__S3__BUCKET", "bkt")
    s = load_settings()
    assert s.scheduler.max_wait_ms == 12.5
    assert s.server.grpc_enabled is True
    assert s.lifecycle.preload == ["a", "b"]
    assert s.results.s3.bucket == "bkt"
    assert s.results.s3.prefix == "modelmora/"  # siblings keep their defaults


def test_partial_sections_keep_their_other_defaults(clean: Path) -> None:
    config = write_yaml(clean / "c.yaml", "limits:\n  max_items: 3\n")
    s = load_settings(config, {"limits": {"max_text_chars": 10}})
    assert (s.limits.max_items, s.limits.max_text_chars) == (3, 10)
    assert s.limits.max_request_bytes == 16 << 20


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("yaml", "scheduler:\n  default_timeout_seconds:\n    txt2embed: 5\n"),
        ("env", "5"),
        ("overrides", {"scheduler": {"default_timeout_seconds": {"txt2embed": 5}}}),
    ],
)
def test_one_task_timeout_keeps_the_others(
    clean: Path, monkeypatch: pytest.MonkeyPatch, source: str, value: object
) -> None:
    config = None
    overrides = None
    if source == "yaml":
        config = write_yaml(clean / "c.yaml", str(value))
    elif source == "env":
        monkeypatch.setenv("MODELMORA_SCHEDULER__DEFAULT_TIMEOUT_SECONDS__TXT2EMBED", str(value))
    else:
        overrides = value  # type: ignore[assignment]
    s = load_settings(config, overrides)  # type: ignore[arg-type]
    assert default_timeout(s.scheduler, TaskType.TXT2EMBED) == 5
    assert default_timeout(s.scheduler, TaskType.TXT2IMG) == 600  # the task's own default
    assert default_timeout(s.scheduler, TaskType.TXT2TXT) == 300


def test_a_timeout_for_no_task_type_is_refused(clean: Path) -> None:
    with pytest.raises(ValidationError):
        load_settings(None, {"scheduler": {"default_timeout_seconds": {"txt2embd": 5}}})


@pytest.mark.parametrize(
    "yaml",
    [
        "bogus: 1\n",
        "server:\n  prot: 9000\n",  # a typo must not be silently ignored
        "results:\n  s3:\n    buckett: x\n",
        "scheduler:\n  max_batch_size: 0\n",
        "server:\n  port: 70000\n",
        "server:\n  log_format: xml\n",
        "resources:\n  default_device: tpu\n",
        "jobs:\n  backend: kafka\n",
    ],
)
def test_bad_yaml_is_rejected(clean: Path, yaml: str) -> None:
    config = write_yaml(clean / "c.yaml", yaml)
    with pytest.raises(ValidationError):
        load_settings(config)


@pytest.mark.parametrize(
    "overrides",
    [{"bogus": {"x": 1}}, {"server": {"prot": 1}}, {"limits": {"max_items": 0}}],
)
def test_bad_overrides_are_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        load_settings(overrides=overrides)


def test_unknown_nested_env_key_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELMORA_SERVER__PROT", "9000")
    with pytest.raises(ValidationError):
        load_settings()


def test_unrelated_modelmora_env_vars_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. MODELMORA_TEST_POSTGRES, read by the test suite itself
    monkeypatch.setenv("MODELMORA_TEST_POSTGRES", "postgresql://x")
    assert isinstance(load_settings(), Settings)


def test_settings_are_not_shared_between_loads(clean: Path) -> None:
    a = load_settings(write_yaml(clean / "a.yaml", "server:\n  port: 1\n"))
    b = load_settings()
    assert (a.server.port, b.server.port) == (1, 8000)


@pytest.mark.parametrize(
    "yaml",
    [
        "",  # an empty file
        "registry:\n  # database_url: x\n",  # a section with every key commented out
        "results:\n  s3:\n",
        "server:\nscheduler:\n  max_batch_size: 4\n",
    ],
)
def test_empty_sections_are_empty_not_errors(clean: Path, yaml: str) -> None:
    s = load_settings(write_yaml(clean / "c.yaml", yaml))
    assert s.registry.database_url is None
    assert s.results.s3.prefix == "modelmora/"
    assert s.server.port == 8000


def test_a_null_value_is_still_an_error(clean: Path) -> None:
    with pytest.raises(ValidationError):
        load_settings(write_yaml(clean / "c.yaml", "server:\n  port:\n"))


def test_the_file_modelmora_init_writes_loads(clean: Path) -> None:
    from typer.testing import CliRunner

    from modelmora.cli import app

    result = CliRunner().invoke(app, ["init", DEFAULT_CONFIG_FILE])
    assert result.exit_code == 0, result.output
    s = load_settings()  # ./modelmora.yaml, as `modelmora serve` reads it
    assert s.server.port == 8000
    assert s.scheduler.max_batch_size == 32
