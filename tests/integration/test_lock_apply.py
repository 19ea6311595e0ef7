"""Re-applying a lock to a registry that already has its models: the files in the cache are
hashed again, so a file damaged or lost since the install is caught here, not only by the
CLI workflow's end-to-end test."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.installer import InstallRequest, install, install_from_lock_entry, lock_entries
from modelmora.registry.lockfile import LockEntry
from modelmora.registry.store import RegistryStore
from tests.conftest import make_fake_model


@pytest.fixture
def store(settings: Settings) -> Iterator[RegistryStore]:
    s = RegistryStore(settings.database_url)
    s.create_schema()
    yield s
    s.close()


@pytest.fixture
def installed(settings: Settings, store: RegistryStore, tmp_path: Path) -> tuple[LockEntry, Path]:
    """A model with two files, installed from a folder: its lock entry and its cached copy."""
    folder = make_fake_model(tmp_path / "src" / "locked")
    (folder / "weights.bin").write_bytes(b"\x01\x02" * 4096)
    record = install(settings, store, InstallRequest(source=str(folder), name="locked"))
    (entry,) = lock_entries([store.get("locked")])
    assert set(entry.files) == {"modelmora.json", "weights.bin"}
    return entry, Path(record.version().path)


def _reapply(settings: Settings, store: RegistryStore, entry: LockEntry) -> str:
    return install_from_lock_entry(settings, store, entry, progress=False)


def test_an_intact_cache_is_present(
    settings: Settings, store: RegistryStore, installed: tuple[LockEntry, Path]
) -> None:
    entry, _ = installed
    assert _reapply(settings, store, entry) == "present"


def test_a_file_changed_in_the_cache_is_caught(
    settings: Settings, store: RegistryStore, installed: tuple[LockEntry, Path]
) -> None:
    entry, cached = installed
    data = bytearray((cached / "weights.bin").read_bytes())
    data[100] ^= 0xFF  # one flipped byte, same size: only hashing the content sees it
    (cached / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ModelMoraError) as err:
        _reapply(settings, store, entry)
    assert err.value.code is ErrorCode.CHECKSUM_MISMATCH and "on disk" in err.value.message
    assert err.value.details["mismatched"] == ["weights.bin"]


def test_a_file_lost_or_added_in_the_cache_is_caught(
    settings: Settings, store: RegistryStore, installed: tuple[LockEntry, Path]
) -> None:
    entry, cached = installed
    (cached / "weights.bin").unlink()
    (cached / "stray.txt").write_text("not from the lock")
    with pytest.raises(ModelMoraError) as err:
        _reapply(settings, store, entry)
    assert err.value.code is ErrorCode.CHECKSUM_MISMATCH and "on disk" in err.value.message
    assert err.value.details["missing"] == ["weights.bin"]
    assert err.value.details["unexpected"] == ["stray.txt"]


def test_a_lock_that_differs_from_the_registry_is_refused(
    settings: Settings, store: RegistryStore, installed: tuple[LockEntry, Path]
) -> None:
    entry, _ = installed
    tampered = dataclasses.replace(entry, files={**entry.files, "weights.bin": "0" * 64})
    with pytest.raises(ModelMoraError) as err:
        _reapply(settings, store, tampered)
    assert err.value.code is ErrorCode.CHECKSUM_MISMATCH and "on registry" in err.value.message
    assert err.value.details["mismatched"] == ["weights.bin"]
