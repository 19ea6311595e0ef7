"""Archive sources are capped in bytes and files: a zip bomb is refused and leaves nothing behind."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from modelmora.config import load_settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.sources import ArchiveLimits, fetch
from modelmora.registry.store import RegistryStore

MANIFEST = json.dumps({"task_type": "txt2embed", "adapter": "fake", "options": {"dim": 8}})


def zip_bomb(path: Path, zeros: int) -> Path:
    """A model folder whose weights are `zeros` zero bytes: megabytes that deflate to kilobytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("model/modelmora.json", MANIFEST)
        with zf.open("model/weights.bin", "w") as out:
            chunk = bytes(1 << 20)
            for _ in range(zeros >> 20):
                out.write(chunk)
    return path


def assert_nothing_left(staging: Path) -> None:
    assert not staging.exists() or [p.name for p in staging.iterdir()] == []


def refused(staging: Path, source: Path, limits: ArchiveLimits) -> ModelMoraError:
    with pytest.raises(ModelMoraError) as info:
        fetch(None, str(source), staging_dir=staging, cache_dir=staging / "cache", archive_limits=limits,
              progress=False)  # fmt: skip
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert_nothing_left(staging)
    return info.value


def test_zip_bomb_is_refused_before_a_byte_is_written(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "bomb.zip", 8 << 20)
    assert bomb.stat().st_size < 64 << 10  # 8 MiB of zeros in a few KiB
    error = refused(tmp_path / "staging", bomb, ArchiveLimits(max_bytes=1 << 20, max_files=100))
    assert error.details["setting"] == "registry.max_archive_bytes"
    assert error.details["limit_bytes"] == 1 << 20
    assert "registry.max_archive_bytes" in error.message


def test_links_count_as_the_copies_they_become(tmp_path: Path) -> None:
    """The declared sizes fit; the copies that the links turn into do not."""
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = bytes(600 << 10)
        info = tarfile.TarInfo("model/weights.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for n in range(5):
            link = tarfile.TarInfo(f"model/copy{n}.bin")
            link.type = tarfile.SYMTYPE
            link.linkname = "weights.bin"
            tf.addfile(link)
    error = refused(tmp_path / "staging", archive, ArchiveLimits(max_bytes=2 << 20, max_files=100))
    assert error.details["setting"] == "registry.max_archive_bytes"


def test_file_count_is_capped(tmp_path: Path) -> None:
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("modelmora.json", MANIFEST)
        for n in range(50):
            zf.writestr(f"f/{n}.txt", b"x")
    error = refused(tmp_path / "staging", archive, ArchiveLimits(max_bytes=1 << 30, max_files=10))
    assert error.details == {
        "source": str(archive),
        "archive": "many.zip",
        "limit_files": 10,
        "setting": "registry.max_archive_files",
    }


def test_install_reads_the_caps_from_settings(tmp_path: Path) -> None:
    settings = load_settings(
        overrides={
            "server": {"data_dir": str(tmp_path / "data")},
            "registry": {"max_archive_bytes": 1 << 20, "max_archive_files": 100},
        }
    )
    store = RegistryStore(settings.database_url)
    store.create_schema()
    try:
        bomb = zip_bomb(tmp_path / "bomb.zip", 4 << 20)
        with pytest.raises(ModelMoraError) as info:
            install(settings, store, InstallRequest(source=str(bomb), name="bomb"), False)
        assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
        assert_nothing_left(settings.models_dir / ".staging")
        assert [p.name for p in settings.models_dir.iterdir()] == [".staging"]

        # Within the caps the same kind of archive installs.
        small = zip_bomb(tmp_path / "small.zip", 0)
        record = install(settings, store, InstallRequest(source=str(small), name="small"), False)
        assert record.name == "small"
    finally:
        store.close()
