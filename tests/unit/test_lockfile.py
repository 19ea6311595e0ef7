"""modelmora.lock: stable text, round trips, validation of what is read back."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.lockfile import (
    LOCK_VERSION,
    LockEntry,
    build_lock,
    diff_files,
    parse_lock,
    read_lock,
    write_lock,
)

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


def entry(name: str = "all-MiniLM-L6-v2", version: str = "main", **overrides: Any) -> LockEntry:
    values: dict[str, Any] = {
        "name": name,
        "model_id": f"sentence-transformers/{name}",
        "origin": f"hf://sentence-transformers/{name}",
        "source_kind": "hub",
        "version": version,
        "revision": "c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
        "task_type": "txt2embed",
        "files": {"config.json": SHA_A, "model.safetensors": SHA_B, "1_Pooling/config.json": SHA_C},
    }
    values.update(overrides)
    return LockEntry(**values)


ENTRIES = [
    entry("zeta", files={"w.bin": SHA_A}),
    entry(
        "local-model",
        model_id="local-model",
        origin="file:///srv/models/local-model",
        source_kind="local",
        revision=None,
        task_type="txt2txt",
        files={"b.txt": SHA_B, "a.txt": SHA_A},
    ),
    entry("alpha", version="v2"),
    entry("alpha", version="v1"),
]


def valid_document() -> dict[str, Any]:
    return json.loads(json.dumps(build_lock([entry()], NOW)))


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "modelmora.lock"
    write_lock(path, ENTRIES, NOW)
    read = read_lock(path)
    assert sorted(read, key=lambda e: (e.name, e.version)) == sorted(
        ENTRIES, key=lambda e: (e.name, e.version)
    )
    local = next(e for e in read if e.name == "local-model")
    assert local.revision is None
    assert local.origin == "file:///srv/models/local-model"


def test_output_is_deterministic_and_sorted(tmp_path: Path) -> None:
    first, second = tmp_path / "one.lock", tmp_path / "two.lock"
    write_lock(first, ENTRIES, NOW)
    write_lock(second, list(reversed(ENTRIES)), NOW)
    text = first.read_bytes()
    assert text == second.read_bytes()
    assert text.endswith(b"}\n") and not text.endswith(b"\n\n")
    document = json.loads(text)
    # Exactly json.dumps(indent=2, sort_keys=True) plus a newline: diffs stay line-stable.
    assert text.decode() == json.dumps(document, indent=2, sort_keys=True) + "\n"
    assert [(m["name"], m["version"]) for m in document["models"]] == [
        ("alpha", "v1"),
        ("alpha", "v2"),
        ("local-model", "main"),
        ("zeta", "main"),
    ]
    assert document["lock_version"] == LOCK_VERSION
    assert list(document["models"][2]["files"]) == ["a.txt", "b.txt"]
    assert set(document["models"][0]) == {
        "name",
        "model_id",
        "origin",
        "source_kind",
        "version",
        "revision",
        "task_type",
        "files",
    }


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (NOW, "2025-03-04T05:06:07Z"),
        (datetime(2025, 3, 4, 7, 6, 7, tzinfo=timezone(timedelta(hours=2))), "2025-03-04T05:06:07Z"),
        (datetime(2025, 3, 4, 5, 6, 7, 999999), "2025-03-04T05:06:07Z"),  # naive: taken as UTC
    ],
)
def test_generated_at_is_utc_iso8601(moment: datetime, expected: str) -> None:
    document = build_lock([], moment)
    assert document["generated_at"] == expected
    assert datetime.fromisoformat(expected).tzinfo == UTC
    assert document["models"] == []


def test_build_lock_refuses_the_same_version_twice() -> None:
    with pytest.raises(ModelMoraError) as info:
        build_lock([entry("alpha"), entry("alpha")], NOW)
    assert info.value.code is ErrorCode.VALIDATION_ERROR
    assert "alpha@main" in info.value.message


def test_write_is_atomic_and_keeps_permissions(tmp_path: Path) -> None:
    path = tmp_path / "modelmora.lock"
    write_lock(path, [entry()], NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    os.chmod(path, 0o640)
    write_lock(path, ENTRIES, NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["modelmora.lock"]  # no temporary left


def test_write_into_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "modelmora.lock"
    with pytest.raises(ModelMoraError) as info:
        write_lock(path, [entry()], NOW)
    assert info.value.code is ErrorCode.INTERNAL_ERROR
    assert str(path) in info.value.message


@pytest.mark.parametrize(
    ("expected", "actual", "diff"),
    [
        ({}, {}, {"mismatched": [], "missing": [], "unexpected": []}),
        ({"a": SHA_A}, {"a": SHA_A}, {"mismatched": [], "missing": [], "unexpected": []}),
        ({"a": SHA_A}, {"a": SHA_B}, {"mismatched": ["a"], "missing": [], "unexpected": []}),
        ({"a": SHA_A, "b": SHA_B}, {"a": SHA_A}, {"mismatched": [], "missing": ["b"], "unexpected": []}),
        ({"a": SHA_A}, {"a": SHA_A, "z/c": SHA_C}, {"mismatched": [], "missing": [], "unexpected": ["z/c"]}),
        (
            {"c": SHA_A, "b": SHA_A, "a": SHA_A, "m": SHA_A},
            {"c": SHA_B, "a": SHA_B, "y": SHA_A, "x": SHA_A, "m": SHA_A},
            {"mismatched": ["a", "c"], "missing": ["b"], "unexpected": ["x", "y"]},
        ),
        ({}, {"a": SHA_A}, {"mismatched": [], "missing": [], "unexpected": ["a"]}),
    ],
)
def test_diff_files(expected: dict[str, str], actual: dict[str, str], diff: dict[str, list[str]]) -> None:
    assert diff_files(expected, actual) == diff


def _mutate(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    target: Any = document
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("lock_version",), 2, "lock_version"),
        (("lock_version",), "1", "lock_version"),
        (("lock_version",), True, "lock_version"),
        (("lock_version",), _DELETE, "lock_version"),
        (("models",), {"name": "x"}, "models"),
        (("models", 0), "alpha", "models[0]"),
        (("models", 0, "files"), _DELETE, "models[0]"),
        (("models", 0, "name"), "../escape", "models[0].name"),
        (("models", 0, "name"), "", "models[0].name"),
        (("models", 0, "name"), 7, "models[0].name"),
        (("models", 0, "version"), "a b", "models[0].version"),
        (("models", 0, "source_kind"), "ftp", "models[0].source_kind"),
        (("models", 0, "task_type"), "txt2video", "models[0].task_type"),
        (("models", 0, "revision"), 12, "models[0].revision"),
        (("models", 0, "files"), ["config.json"], "models[0].files"),
        (("models", 0, "files", "config.json"), "not-a-sha", "models[0].files"),
        (("models", 0, "files", "config.json"), SHA_A.upper(), "models[0].files"),
        (("models", 0, "files", "../../etc/passwd"), SHA_A, "models[0].files"),
        (("models", 0, "files", "/etc/passwd"), SHA_A, "models[0].files"),
        (("models", 0, "files", "a//b"), SHA_A, "models[0].files"),
    ],
)
def test_read_lock_rejects_malformed_entries(
    tmp_path: Path, path: tuple[Any, ...], value: Any, field: str
) -> None:
    lock = tmp_path / "modelmora.lock"
    lock.write_text(json.dumps(_mutate(valid_document(), path, value)))
    with pytest.raises(ModelMoraError) as info:
        read_lock(lock)
    error = info.value
    assert error.code is ErrorCode.VALIDATION_ERROR
    assert str(lock) in error.message
    assert error.details["path"] == str(lock)
    assert error.details["errors"][0]["field"] == field


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "not valid JSON"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ("null", "not a JSON object"),
    ],
)
def test_read_lock_rejects_files_that_are_not_locks(tmp_path: Path, text: str, words: str) -> None:
    lock = tmp_path / "modelmora.lock"
    lock.write_text(text)
    with pytest.raises(ModelMoraError) as info:
        read_lock(lock)
    assert info.value.code is ErrorCode.VALIDATION_ERROR
    assert words in info.value.message
    assert str(lock) in info.value.message


def test_read_lock_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelMoraError) as info:
        read_lock(tmp_path / "modelmora.lock")
    assert info.value.code is ErrorCode.VALIDATION_ERROR
    assert "not found" in info.value.message


def test_read_lock_rejects_duplicates(tmp_path: Path) -> None:
    document = valid_document()
    document["models"].append(dict(document["models"][0]))
    with pytest.raises(ModelMoraError) as info:
        parse_lock(document, tmp_path / "x.lock")
    assert info.value.details["errors"][0]["field"] == "models[1]"


def test_read_lock_tolerates_unknown_keys(tmp_path: Path) -> None:
    """A newer writer may add fields; the ones this version needs are still read."""
    document = valid_document()
    document["comment"] = "hand-written"
    document["models"][0]["size_bytes"] = 123
    lock = tmp_path / "modelmora.lock"
    lock.write_text(json.dumps(document))
    assert read_lock(lock) == [entry()]
