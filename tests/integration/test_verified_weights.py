"""Verified weights (issue 14): every load checks each file's sha256 against the registry.

Damaged or deleted files fail the load with 503 CHECKSUM_MISMATCH naming the file, the model
stays failed without load retries until it is verified again or reinstalled, and a warm
reload (or a restart) reads no file thanks to the verified-files cache. A model that loads
but computes NaN fails its health check."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelmora.config import Settings
from modelmora.contracts.channel import LoadFailure
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle import verify
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import in_process_runner_factory, process_runner_factory
from modelmora.lifecycle.verify import CACHE_FILE, WeightsVerifier
from modelmora.registry.catalog import ModelState
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.store import RegistryStore
from modelmora.services.inference import InferenceService
from modelmora.services.registry import RegistryService
from tests.conftest import make_fake_model
from tests.runners import RUNNER_KINDS

WEIGHTS = bytes(range(256)) * 512  # 128 KiB standing in for model.safetensors


@pytest.fixture
def store(settings: Settings) -> RegistryStore:
    s = RegistryStore(settings.database_url)
    s.create_schema()
    return s


@pytest.fixture(autouse=True)
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files here are hashed right after they were written: cache them anyway (the racy
    window has its own test below)."""
    monkeypatch.setattr(verify, "RACY_SECONDS", 0.0)


def _source(tmp: Path, name: str, **options: object) -> Path:
    folder = make_fake_model(tmp / f"src-{name}", **options)
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": ["a", "b"]}), encoding="utf-8")
    return folder


def _install(settings: Settings, store: RegistryStore, tmp: Path, name: str, **options: object) -> Path:
    record = install(settings, store, InstallRequest(source=str(_source(tmp, name, **options)), name=name))
    return Path(record.version().path)


@pytest.fixture
async def make_manager(settings: Settings, store: RegistryStore) -> AsyncIterator[object]:
    managers: list[ModelManager] = []

    async def build(kind: str = "in-process") -> tuple[ModelManager, InferenceService]:
        factory = process_runner_factory if kind == "process" else in_process_runner_factory
        manager = ModelManager(settings, store, factory)
        await manager.start()
        managers.append(manager)
        return manager, InferenceService(settings, manager)

    yield build
    for manager in managers:
        await manager.shutdown()


def _flip_byte(path: Path, offset: int = 1000) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("kind", RUNNER_KINDS)
async def test_flipped_bytes_fail_with_503_naming_the_file_until_verified_again(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager, kind: str
) -> None:  # type: ignore[no-untyped-def]
    folder = _install(settings, store, tmp_path, "damaged")
    _flip_byte(folder / "model.safetensors")
    manager, svc = await make_manager(kind)

    with pytest.raises(ModelMoraError) as first:
        await svc.infer("damaged", {"text": "x"})
    err = first.value
    assert err.code is ErrorCode.CHECKSUM_MISMATCH
    assert (err.code.http_status, err.code.grpc_status, err.code.retryable) == (503, "DATA_LOSS", False)
    assert err.retry_after is None  # no Retry-After: waiting does not mend the files
    assert "model.safetensors" in err.message
    assert err.details["mismatched"] == ["model.safetensors"] and err.details["missing"] == []
    slot = manager.slots["damaged"]
    assert slot.state is ModelState.FAILED and slot.runner is None  # no worker was started

    # Not retried by the load backoff: the next requests get the same answer, and neither a
    # load nor a hash happens (a registry read and a stat per file only).
    hashed = manager.loader.verifier.files_hashed
    for _ in range(3):
        with pytest.raises(ModelMoraError) as again:
            await svc.infer("damaged", {"text": "x"})
        assert again.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert manager.counters["load_failures"] == 1 and manager.counters["loads"] == 0
    assert manager.loader.verifier.files_hashed == hashed

    # Mending the file is not enough: it has not been verified since.
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    with pytest.raises(ModelMoraError) as unverified:
        await svc.infer("damaged", {"text": "x"})
    assert unverified.value.code is ErrorCode.CHECKSUM_MISMATCH

    # The verify (download) operation passes and is recorded: the model is served again.
    verified = await RegistryService(settings, store, manager).verify("damaged")
    assert verified["verified"] is True
    out = await svc.infer("damaged", {"text": "x"})
    assert len(out["result"]["embeddings"]) == 8  # one vector of the fake's dim
    assert manager.slots["damaged"].state is ModelState.READY


async def test_a_deleted_tokenizer_file_fails_the_load_until_reinstalled(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager
) -> None:  # type: ignore[no-untyped-def]
    folder = _install(settings, store, tmp_path, "gutted")
    (folder / "tokenizer.json").unlink()
    manager, svc = await make_manager()
    with pytest.raises(ModelMoraError) as err:
        await svc.infer("gutted", {"text": "x"})
    assert err.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert "tokenizer.json is missing" in err.value.message
    assert err.value.details["missing"] == ["tokenizer.json"]
    assert manager.slots["gutted"].state is ModelState.FAILED

    # The verify operation fails too (the file is still gone), and changes nothing.
    with pytest.raises(ModelMoraError) as still:
        await RegistryService(settings, store, manager).verify("gutted")
    assert still.value.code is ErrorCode.CHECKSUM_MISMATCH
    with pytest.raises(ModelMoraError):
        await svc.infer("gutted", {"text": "x"})

    # A reinstall (a new version, made active) is a new set of files: loaded at once.
    install(settings, store, InstallRequest(source=str(tmp_path / "src-gutted"), name="gutted", version="v2"))
    out = await svc.infer("gutted", {"text": "x"})
    assert out["metadata"]["version"] == "v2"


async def test_a_warm_reload_and_a_restart_read_no_file(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager
) -> None:  # type: ignore[no-untyped-def]
    _install(settings, store, tmp_path, "warm")
    files = len(store.get("warm").version().files)
    manager, svc = await make_manager()
    verifier = manager.loader.verifier
    await svc.infer("warm", {"text": "x"})
    assert (verifier.files_hashed, verifier.cache_hits) == (files, 0)

    await manager.unload("warm")
    await svc.infer("warm", {"text": "x"})
    assert manager.counters["loads"] == 2
    assert (verifier.files_hashed, verifier.cache_hits) == (files, files)  # nothing re-read

    # A restarted server reads the persisted cache.
    fresh = WeightsVerifier(settings.server.data_dir / CACHE_FILE)
    report = fresh.verify("warm", store.get("warm").version())
    assert (report.hashed, report.cached) == (0, files)


def test_a_changed_stamp_is_hashed_again(settings: Settings, store: RegistryStore, tmp_path: Path) -> None:
    folder = _install(settings, store, tmp_path, "stamped")
    version = store.get("stamped").version()
    verifier = WeightsVerifier(settings.server.data_dir / CACHE_FILE)
    assert verifier.verify("stamped", version).hashed == len(version.files)
    # Same bytes, new mtime (and ctime): hashed again, still passing.
    stat = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    report = verifier.verify("stamped", version)
    assert (report.hashed, report.cached) == (1, len(version.files) - 1)
    # Bytes changed in place, size kept: the stamps moved, so the change is seen.
    _flip_byte(folder / "model.safetensors")
    with pytest.raises(ModelMoraError) as err:
        verifier.verify("stamped", version)
    assert err.value.details["mismatched"] == ["model.safetensors"]


def test_a_file_written_within_the_racy_window_is_not_cached(
    settings: Settings, store: RegistryStore, tmp_path: Path
) -> None:
    _install(settings, store, tmp_path, "fresh")
    version = store.get("fresh").version()
    verifier = WeightsVerifier(settings.server.data_dir / CACHE_FILE, racy_seconds=3600)
    verifier.verify("fresh", version)
    # Its timestamps could still be shared by a write in the same clock tick: hashed again.
    assert verifier.verify("fresh", version).hashed == len(version.files)
    assert not (settings.server.data_dir / CACHE_FILE).exists() or len(verifier.cache) == 0


def test_a_file_name_leaving_the_folder_is_refused(
    settings: Settings, store: RegistryStore, tmp_path: Path
) -> None:
    _install(settings, store, tmp_path, "escape")
    version = store.get("escape").version()
    version.files["../outside"] = "0" * 64
    with pytest.raises(ModelMoraError) as err:
        WeightsVerifier(None).verify("escape", version)
    assert err.value.details["mismatched"] == ["../outside"]


@pytest.mark.parametrize("kind", RUNNER_KINDS)
async def test_a_health_check_with_nan_output_fails_the_load(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager, kind: str
) -> None:  # type: ignore[no-untyped-def]
    settings.lifecycle.load_retries = 0
    _install(settings, store, tmp_path, "nan", nan=True)
    manager, svc = await make_manager(kind)
    with pytest.raises(ModelMoraError) as err:
        await svc.infer("nan", {"text": "x"})
    assert err.value.code is ErrorCode.MODEL_LOAD_FAILED
    assert "NaN" in err.value.message
    slot = manager.slots["nan"]
    assert slot.failure is LoadFailure.HEALTH_CHECK and slot.state is ModelState.UNHEALTHY
