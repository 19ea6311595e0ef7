"""A small stand-in for the Hugging Face Hub HTTP API, for tests that cannot reach the Hub.

It serves fixture folders the way huggingface.co does, enough for `HfApi.model_info`,
`HfApi.list_repo_tree`, `hf_hub_download` and `snapshot_download` of huggingface_hub 2.x:

    GET  /api/models/{repo_id}[/revision/{rev}]       model info JSON (sha, siblings, pipeline_tag...)
    GET  /api/models/{repo_id}/tree/{rev}[/{path}]    tree listing (?recursive=true), LFS info for LFS files
    HEAD /{repo_id}/resolve/{rev}/{path}              file metadata headers
    GET  /{repo_id}/resolve/{rev}/{path}              file content (regular files)
    GET|HEAD {cdn}/lfs/{sha256}                       LFS content, on a second server ("the CDN")

Regular files answer `/resolve` with 200, `X-Repo-Commit`, `ETag` = the git blob sha1 and
`Content-Length`. LFS files (weights: `*.safetensors`, `*.bin`, ...) answer with a 302 whose
`Location` points at the CDN server, with `X-Linked-Etag` = the sha256 and `X-Linked-Size`, as
the Hub does; the CDN runs on another port, so the client treats it as another origin and
takes the metadata from the redirect itself. No `X-Xet-*` header and no `xetHash` are ever
sent, so huggingface_hub never switches to hf_xet. Errors carry the Hub's `X-Error-Code`
(`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), which huggingface_hub turns into
`RepositoryNotFoundError` and friends.

Revisions: "main" and the stub's commit sha name the same (only) commit.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_COMMIT = "3f1c2a9be07d4c5e8b6a71d2c94e0f58a6b3d217"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt", ".gguf")

_API_RE = re.compile(
    r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<sub>/.*)?)?$"
)
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN_RE = re.compile(r"^/lfs/(?P<sha>[0-9a-f]{64})$")


@dataclass(frozen=True)
class RepoFileEntry:
    path: str
    size: int
    sha256: str
    blob_sha1: str  # what git calls the blob id: sha1(b"blob <size>\0" + content)
    lfs: bool
    source: Path


@dataclass(frozen=True)
class SeenRequest:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # decoded path, without the query
    query: str
    authorization: str | None


def _index_repo(folder: Path) -> dict[str, RepoFileEntry]:
    entries: dict[str, RepoFileEntry] = {}
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if not file.is_file() or rel.split("/", 1)[0] == ".git":
            continue
        data = file.read_bytes()
        entries[rel] = RepoFileEntry(
            path=rel,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            blob_sha1=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            lfs=rel.lower().endswith(LFS_SUFFIXES),
            source=file,
        )
    return entries


class HubStub:
    """Serve `repos` ({repo_id: folder}) on 127.0.0.1 like the Hub. Use as a context manager;
    `.endpoint` is the base URL to give huggingface_hub, `.requests` what it asked for.

    `model_info` adds or overrides fields of a repo's model info JSON (e.g. `pipeline_tag`,
    `library_name`).
    """

    def __init__(
        self,
        repos: dict[str, Path],
        commit: str = DEFAULT_COMMIT,
        *,
        model_info: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise ValueError("commit must be 40 lowercase hex digits")
        self.commit = commit
        self.repos = {repo_id: _index_repo(Path(folder)) for repo_id, folder in repos.items()}
        self.extra_info = model_info or {}
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._blobs: dict[str, RepoFileEntry] = {
            e.sha256: e for files in self.repos.values() for e in files.values() if e.lfs
        }
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, "hub"))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, "cdn"))
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> HubStub:
        for server in (self._hub, self._cdn):
            server.daemon_threads = True
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def record(self, request: SeenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    # -- what the Hub answers ----------------------------------------------------------------

    def resolve_revision(self, revision: str) -> str | None:
        return self.commit if revision in ("main", self.commit) else None

    def model_info_body(self, repo_id: str, with_blobs: bool) -> dict[str, Any]:
        files = self.repos[repo_id]
        siblings: list[dict[str, Any]] = []
        for entry in files.values():
            sibling: dict[str, Any] = {"rfilename": entry.path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.blob_sha1)
                if entry.lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": 134}
            siblings.append(sibling)
        author = repo_id.split("/", 1)[0] if "/" in repo_id else None
        body: dict[str, Any] = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": author,
            "sha": self.commit,
            "lastModified": "2024-05-01T12:00:00.000Z",
            "createdAt": "2024-01-01T12:00:00.000Z",
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        body.update(self.extra_info.get(repo_id, {}))
        return body

    def tree_body(self, repo_id: str, sub: str, recursive: bool) -> list[dict[str, Any]] | None:
        files = self.repos[repo_id]
        prefix = sub.strip("/")
        if prefix and not any(p.startswith(prefix + "/") for p in files):
            return None
        dirs: set[str] = set()
        for path in files:
            parts = path.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        out: list[dict[str, Any]] = []

        def visible(path: str) -> bool:
            if prefix and not path.startswith(prefix + "/"):
                return False
            rest = path[len(prefix) + 1 :] if prefix else path
            return recursive or "/" not in rest

        for d in sorted(dirs):
            if visible(d):
                oid = hashlib.sha1(f"tree {repo_id} {d}".encode()).hexdigest()
                out.append({"type": "directory", "oid": oid, "size": 0, "path": d})
        for entry in files.values():
            if visible(entry.path):
                item: dict[str, Any] = {
                    "type": "file",
                    "oid": entry.blob_sha1,
                    "size": entry.size,
                    "path": entry.path,
                }
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
                out.append(item)
        return out

    def blob(self, sha256: str) -> RepoFileEntry | None:
        return self._blobs.get(sha256)


def _make_handler(stub: HubStub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
        server_version = "HubStub/1.0"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            return

        def do_GET(self) -> None:
            self._dispatch(send_body=True)

        def do_HEAD(self) -> None:
            self._dispatch(send_body=False)

        # -- plumbing ------------------------------------------------------------------------

        def _dispatch(self, *, send_body: bool) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            stub.record(SeenRequest(role, self.command, path, parts.query, self.headers.get("Authorization")))
            if role == "cdn":
                self._cdn(path, send_body)
                return
            query = parse_qs(parts.query)
            api = _API_RE.match(parts.path)
            if api:
                self._api(api, query, send_body)
                return
            resolve = _RESOLVE_RE.match(parts.path)
            if resolve:
                self._resolve(resolve, send_body)
                return
            self._error(404, None, "Not Found", send_body)

        def _send(
            self,
            status: int,
            headers: dict[str, str],
            body: bytes,
            send_body: bool,
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _json(
            self, status: int, data: Any, send_body: bool, headers: dict[str, str] | None = None
        ) -> None:
            body = json.dumps(data).encode()
            self._send(
                status,
                {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
                body,
                send_body,
            )

        def _error(
            self,
            status: int,
            code: str | None,
            message: str,
            send_body: bool,
            headers: dict[str, str] | None = None,
        ) -> None:
            extra = dict(headers or {})
            if code is not None:
                extra["X-Error-Code"] = code
            extra["X-Error-Message"] = message
            self._json(status, {"error": message}, send_body, extra)

        def _repo_or_error(self, repo_id: str, send_body: bool) -> bool:
            if repo_id in stub.repos:
                return True
            self._error(404, "RepoNotFound", "Repository not found", send_body)
            return False

        def _revision_or_error(self, revision: str, send_body: bool) -> str | None:
            sha = stub.resolve_revision(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, send_body)
            return sha

        # -- endpoints -----------------------------------------------------------------------

        def _api(self, match: re.Match[str], query: dict[str, list[str]], send_body: bool) -> None:
            repo_id = unquote(match["repo"])
            if not self._repo_or_error(repo_id, send_body):
                return
            revision = unquote(match["rev"]) if match["rev"] else "main"
            if self._revision_or_error(revision, send_body) is None:
                return
            if match["kind"] == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                tree = stub.tree_body(repo_id, unquote(match["sub"] or ""), recursive)
                if tree is None:
                    self._error(404, "EntryNotFound", "Entry not found", send_body)
                else:
                    self._json(200, tree, send_body)
                return
            if match["sub"]:
                self._error(404, None, "Not Found", send_body)
                return
            with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
            self._json(200, stub.model_info_body(repo_id, with_blobs), send_body)

        def _resolve(self, match: re.Match[str], send_body: bool) -> None:
            repo_id = unquote(match["repo"])
            if not self._repo_or_error(repo_id, send_body):
                return
            sha = self._revision_or_error(unquote(match["rev"]), send_body)
            if sha is None:
                return
            entry = stub.repos[repo_id].get(unquote(match["path"]))
            if entry is None:
                self._error(404, "EntryNotFound", "Entry not found", send_body, {"X-Repo-Commit": sha})
                return
            if entry.lfs:
                body = b"Found. Redirecting"
                self._send(
                    302,
                    {
                        "Location": f"{stub.cdn_endpoint}/lfs/{quote(entry.sha256)}",
                        "X-Repo-Commit": sha,
                        "X-Linked-Etag": f'"{entry.sha256}"',
                        "X-Linked-Size": str(entry.size),
                        "ETag": f'"{entry.sha256}"',
                        "Content-Type": "text/plain; charset=utf-8",
                    },
                    body,
                    send_body,
                )
                return
            self._file(entry, {"X-Repo-Commit": sha, "ETag": f'"{entry.blob_sha1}"'}, send_body)

        def _cdn(self, path: str, send_body: bool) -> None:
            match = _CDN_RE.match(path)
            entry = stub.blob(match["sha"]) if match else None
            if entry is None:
                self._send(404, {"Content-Type": "text/plain"}, b"NoSuchKey", send_body)
                return
            self._file(entry, {"ETag": f'"{entry.sha256}"'}, send_body)

        def _file(self, entry: RepoFileEntry, headers: dict[str, str], send_body: bool) -> None:
            data = entry.source.read_bytes()
            base = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
            wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if wanted and int(wanted[1]) < len(data):  # a resumed download
                start = int(wanted[1])
                base["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self._send(206, base, data[start:], send_body)
                return
            self._send(200, base, data, send_body)

    return Handler
