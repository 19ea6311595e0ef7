"""Catalog rules: model names, versions, states, and task detection from metadata.

Pure functions over plain data: no database, no network, no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError


class ModelState(StrEnum):
    REGISTERED = "registered"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"
    UNHEALTHY = "unhealthy"


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A version is a Hub revision (commit sha, branch, tag) or a tag given with --version.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Hub repository IDs: "org/name" or a bare "name".
MODEL_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

# The file a model folder may carry to describe itself to ModelMora (used by the fake adapter
# and by anyone who wants to pin the task without the CLI flag).
MANIFEST_FILE = "modelmora.json"


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name in {".", ".."} or ".." in name:
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (at most 128), "
            "starting with a letter or digit",
            {"errors": [{"field": "name", "message": "invalid model name"}]},
        )
    return name


def validate_version(version: str) -> str:
    if not VERSION_RE.fullmatch(version) or ".." in version:
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            f"invalid version {version!r}",
            {"errors": [{"field": "version", "message": "invalid version"}]},
        )
    return version


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'name' or 'name@version' -> (name, version or None), both validated."""
    name, sep, version = ref.partition("@")
    validate_name(name)
    if sep:
        return name, validate_version(version)
    return name, None


def is_hub_id(model_id: str) -> bool:
    return bool(MODEL_ID_RE.fullmatch(model_id)) and ".." not in model_id


def derive_name(model_id: str | None, source: str | None = None) -> str:
    """The default name: last segment of the ID, else of the folder or URL it comes from."""
    base = model_id or source or ""
    base = base.rstrip("/")
    if source and not model_id:
        base = source.rstrip("/")
        if "://" in base:
            parts = urlsplit(base)  # drop the scheme, and any ?query or #fragment after the file
            base = (parts.netloc + parts.path).rstrip("/")
    last = base.rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if last.endswith(suffix):
            last = last[: -len(suffix)]
            break
    return validate_name(last)


# Well-known models whose metadata is missing or ambiguous.
CURATED_TASKS: dict[str, TaskType] = {
    "sentence-transformers/all-MiniLM-L6-v2": TaskType.TXT2EMBED,
    "sentence-transformers/all-mpnet-base-v2": TaskType.TXT2EMBED,
    "BAAI/bge-small-en-v1.5": TaskType.TXT2EMBED,
    "BAAI/bge-base-en-v1.5": TaskType.TXT2EMBED,
    "intfloat/e5-small-v2": TaskType.TXT2EMBED,
    "nomic-ai/nomic-embed-text-v1.5": TaskType.TXT2EMBED,
    "openai/clip-vit-base-patch32": TaskType.IMG2EMBED,
    "sentence-transformers/clip-ViT-B-32": TaskType.IMG2EMBED,
    "openai-community/gpt2": TaskType.TXT2TXT,
    "gpt2": TaskType.TXT2TXT,
    "Qwen/Qwen2.5-0.5B-Instruct": TaskType.TXT2TXT,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": TaskType.TXT2TXT,
    "stabilityai/sd-turbo": TaskType.TXT2IMG,
    "stabilityai/stable-diffusion-2-1": TaskType.TXT2IMG,
    "runwayml/stable-diffusion-v1-5": TaskType.TXT2IMG,
    "Salesforce/blip-image-captioning-base": TaskType.IMG2TXT,
    "nlpconnect/vit-gpt2-image-captioning": TaskType.IMG2TXT,
}

PIPELINE_TAG_TASKS: dict[str, TaskType] = {
    "sentence-similarity": TaskType.TXT2EMBED,
    "feature-extraction": TaskType.TXT2EMBED,
    "text-generation": TaskType.TXT2TXT,
    "text2text-generation": TaskType.TXT2TXT,
    "text-to-image": TaskType.TXT2IMG,
    "image-to-text": TaskType.IMG2TXT,
    "image-text-to-text": TaskType.IMG2TXT,
    "image-feature-extraction": TaskType.IMG2EMBED,
    "zero-shot-image-classification": TaskType.IMG2EMBED,
}

_ARCH_SUFFIX_TASKS: tuple[tuple[str, TaskType], ...] = (
    ("ForCausalLM", TaskType.TXT2TXT),
    ("LMHeadModel", TaskType.TXT2TXT),
    ("ForConditionalGeneration", TaskType.TXT2TXT),
    ("VisionEncoderDecoderModel", TaskType.IMG2TXT),
    ("CLIPModel", TaskType.IMG2EMBED),
    ("SiglipModel", TaskType.IMG2EMBED),
    ("CLIPVisionModel", TaskType.IMG2EMBED),
)

# Captioning architectures end in ForConditionalGeneration too; they win over the generic rule.
_CAPTION_ARCHS = ("Blip", "Blip2", "GitFor", "Pix2Struct", "VisionEncoderDecoder")


@dataclass(frozen=True)
class ModelMetadata:
    """What a model's own files say about it (read from the folder or from the Hub)."""

    files: frozenset[str] = frozenset()
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    pipeline_tag: str | None = None
    library_name: str | None = None


def detect_task(model_id: str | None, meta: ModelMetadata) -> TaskType | None:
    """Best guess of the task type; None when nothing says (the caller asks for --task)."""
    if meta.manifest.get("task_type"):
        return TaskType(meta.manifest["task_type"])
    if model_id and model_id in CURATED_TASKS:
        return CURATED_TASKS[model_id]
    if "model_index.json" in meta.files:
        return TaskType.TXT2IMG  # a diffusers pipeline
    if "modules.json" in meta.files or "config_sentence_transformers.json" in meta.files:
        arch_names = " ".join(meta.config.get("architectures") or [])
        # sentence-transformers' CLIP keeps its config in a module folder ("0_CLIPModel/"),
        # so the root config.json (when any) need not name it.
        clip_module = any(f.split("/", 1)[0].endswith("CLIPModel") for f in meta.files if "/" in f)
        return TaskType.IMG2EMBED if "CLIP" in arch_names or clip_module else TaskType.TXT2EMBED
    if meta.pipeline_tag and meta.pipeline_tag in PIPELINE_TAG_TASKS:
        return PIPELINE_TAG_TASKS[meta.pipeline_tag]
    if meta.library_name == "sentence-transformers":
        return TaskType.TXT2EMBED
    archs = list(meta.config.get("architectures") or [])
    for arch in archs:
        if any(arch.startswith(prefix) for prefix in _CAPTION_ARCHS):
            return TaskType.IMG2TXT
        for suffix, task in _ARCH_SUFFIX_TASKS:
            if arch.endswith(suffix):
                return task
    return None


def read_folder_metadata(folder: Path) -> ModelMetadata:
    """Collect the metadata files of a model folder (no model code is imported)."""
    files = frozenset(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def _json(name: str) -> dict[str, Any]:
        path = folder / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    return ModelMetadata(files=files, config=_json("config.json"), manifest=_json(MANIFEST_FILE))


@dataclass
class ModelVersion:
    version: str
    revision: str | None
    origin: str
    source_kind: str
    path: str
    files: dict[str, str]
    size_bytes: int
    installed_at: datetime


@dataclass
class ModelRecord:
    name: str
    model_id: str
    task_type: TaskType
    active_version: str | None
    versions: list[ModelVersion]
    display_name: str | None = None
    description: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    resource_requirements: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def version(self, version: str | None = None) -> ModelVersion:
        wanted = version or self.active_version
        for v in self.versions:
            if v.version == wanted:
                return v
        raise ModelMoraError(
            ErrorCode.MODEL_NOT_FOUND,
            f"model {self.name!r} has no version {wanted!r}",
            {"model": self.name, "version": wanted, "installed": [v.version for v in self.versions]},
        )


# Per-model settings that `update --set` / PUT may change, with their types.
CONFIG_KEYS: dict[str, type] = {
    "device": str,
    "dtype": str,
    "max_batch_size": int,
    "max_wait_ms": float,
    "keep_alive_seconds": float,
    "default_timeout_seconds": float,
    "adapter": str,
    "options": dict,  # passed to the adapter's load (e.g. the fake adapter's dim)
    "parameters": dict,  # default task parameters (e.g. {"normalize": true})
    "batching": str,  # continuous batching: "continuous" | "static" (inference/continuous.py)
    # OpenAI-compatible routes: Matryoshka sizes `/v1/embeddings` may cut vectors to
    # (`dimensions`), and the `WxH` sizes a txt2img model accepts on `/v1/images/generations`.
    "matryoshka_dimensions": list,
    "image_sizes": list,
}
