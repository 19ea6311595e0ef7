"""Catalog rules: names, refs, derived names, Hub IDs, task detection, folder metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import (
    MANIFEST_FILE,
    ModelMetadata,
    derive_name,
    detect_task,
    is_hub_id,
    parse_ref,
    read_folder_metadata,
    validate_name,
)


def assert_invalid(exc: pytest.ExceptionInfo[ModelMoraError], field: str) -> None:
    assert exc.value.code is ErrorCode.VALIDATION_ERROR
    assert exc.value.details["errors"][0]["field"] == field


# -- validate_name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "A", "0", "all-MiniLM-L6-v2", "bge_small.en-v1.5", "x" * 128, "9lives", "a.b.c", "a-", "a_"],
)
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../x",
        "a/../b",
        "a/b",
        "a\\b",
        ".hidden",
        "-dash",
        "_under",
        "a..b",
        "x" * 129,
        "has space",
        " lead",
        "trail ",
        "tab\t",
        "line\n",
        "modèle",
        "模型",
        "\uff46\uff55\uff4c\uff4c",  # full-width "full"
        "a@b",
        "a:b",
        "a%2Fb",
        "~home",
        "null\x00",
    ],
)
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(ModelMoraError) as info:
        validate_name(name)
    assert_invalid(info, "name")


# -- parse_ref --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("minilm", ("minilm", None)),
        ("minilm@v2", ("minilm", "v2")),
        ("minilm@0123abcd", ("minilm", "0123abcd")),
        ("m@1.0.0-rc1", ("m", "1.0.0-rc1")),
    ],
)
def test_parse_ref(ref: str, expected: tuple[str, str | None]) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    ("ref", "field"),
    [
        ("@v1", "name"),
        ("../x@v1", "name"),
        ("m@", "version"),
        ("m@../v", "version"),
        ("m@a/b", "version"),
        ("m@v1@v2", "version"),
        ("m@.v", "version"),
    ],
)
def test_parse_ref_rejects(ref: str, field: str) -> None:
    with pytest.raises(ModelMoraError) as info:
        parse_ref(ref)
    assert_invalid(info, field)


# -- derive_name / is_hub_id ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "source", "expected"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", None, "all-MiniLM-L6-v2"),
        ("gpt2", None, "gpt2"),
        ("BAAI/bge-small-en-v1.5", "/ignored/when/an/id/is/given", "bge-small-en-v1.5"),
        (None, "/models/my-model", "my-model"),
        (None, "/models/my-model/", "my-model"),
        (None, "./relative/thing", "thing"),
        (None, "https://example.com/files/tiny.tar.gz", "tiny"),
        (None, "https://example.com/files/tiny.tgz", "tiny"),
        (None, "https://example.com/files/tiny.tar", "tiny"),
        (None, "https://example.com/files/tiny.zip", "tiny"),
        (None, "s3://bucket/prefix/model-x.zip", "model-x"),
        (None, "https://example.com/files/tiny.zip?token=abc&x=1", "tiny"),  # query is not the name
        (None, "https://example.com/files/tiny.tar.gz#frag", "tiny"),
        (None, "https://example.com/models/tiny/", "tiny"),
    ],
)
def test_derive_name(model_id: str | None, source: str | None, expected: str) -> None:
    assert derive_name(model_id, source) == expected


@pytest.mark.parametrize(("model_id", "source"), [(None, None), (None, "/"), (None, "/models/.hidden")])
def test_derive_name_fails_with_a_validation_error(model_id: str | None, source: str | None) -> None:
    with pytest.raises(ModelMoraError) as info:
        derive_name(model_id, source)
    assert_invalid(info, "name")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gpt2", True),
        ("sentence-transformers/all-MiniLM-L6-v2", True),
        ("BAAI/bge-small-en-v1.5", True),
        ("a/b/c", False),
        ("/abs/path", False),
        ("./rel", False),
        ("../up", False),
        ("org/..", False),
        ("org/a..b", False),
        ("https://example.com/x", False),
        ("", False),
        ("org/", False),
        ("has space/x", False),
        ("o" * 96 + "/m", True),
        ("o" * 97 + "/m", False),
    ],
)
def test_is_hub_id(value: str, expected: bool) -> None:
    assert is_hub_id(value) is expected


# -- detect_task ------------------------------------------------------------------------------


def meta(
    files: tuple[str, ...] = (),
    archs: list[str] | None = None,
    manifest: dict[str, object] | None = None,
    pipeline_tag: str | None = None,
    library_name: str | None = None,
) -> ModelMetadata:
    return ModelMetadata(
        files=frozenset(files),
        config={"architectures": archs} if archs is not None else {},
        manifest=manifest or {},
        pipeline_tag=pipeline_tag,
        library_name=library_name,
    )


ST_FILES = ("modules.json", "config_sentence_transformers.json", "config.json", "1_Pooling/config.json")
ST_CLIP_FILES = ("modules.json", "0_CLIPModel/config.json", "0_CLIPModel/pytorch_model.bin")


@pytest.mark.parametrize(
    ("model_id", "metadata", "expected"),
    [
        # the manifest wins over everything
        ("gpt2", meta(manifest={"task_type": "txt2embed"}, archs=["GPT2LMHeadModel"]), TaskType.TXT2EMBED),
        (None, meta(files=("model_index.json",), manifest={"task_type": "img2txt"}), TaskType.IMG2TXT),
        # curated table, even with misleading metadata
        ("sentence-transformers/all-MiniLM-L6-v2", meta(pipeline_tag="text-generation"), TaskType.TXT2EMBED),
        ("openai/clip-vit-base-patch32", meta(), TaskType.IMG2EMBED),
        ("stabilityai/sd-turbo", meta(), TaskType.TXT2IMG),
        ("Salesforce/blip-image-captioning-base", meta(), TaskType.IMG2TXT),
        ("Qwen/Qwen2.5-0.5B-Instruct", meta(), TaskType.TXT2TXT),
        # diffusers pipelines
        (None, meta(files=("model_index.json", "unet/config.json")), TaskType.TXT2IMG),
        (
            "someone/diffusion",
            meta(files=("model_index.json",), pipeline_tag="image-to-text"),
            TaskType.TXT2IMG,
        ),
        # sentence-transformers folders
        (None, meta(files=ST_FILES, archs=["BertModel"]), TaskType.TXT2EMBED),
        (None, meta(files=("config_sentence_transformers.json",)), TaskType.TXT2EMBED),
        (None, meta(files=("modules.json",), archs=["CLIPModel"]), TaskType.IMG2EMBED),
        # sentence-transformers CLIP: the CLIP config lives in 0_CLIPModel/, not at the root
        (None, meta(files=ST_CLIP_FILES), TaskType.IMG2EMBED),
        ("sentence-transformers/clip-ViT-L-14", meta(files=ST_CLIP_FILES), TaskType.IMG2EMBED),
        # pipeline tags
        ("x/y", meta(pipeline_tag="sentence-similarity"), TaskType.TXT2EMBED),
        ("x/y", meta(pipeline_tag="feature-extraction"), TaskType.TXT2EMBED),
        ("x/y", meta(pipeline_tag="text-generation", archs=["CLIPModel"]), TaskType.TXT2TXT),
        ("x/y", meta(pipeline_tag="text2text-generation"), TaskType.TXT2TXT),
        ("x/y", meta(pipeline_tag="text-to-image"), TaskType.TXT2IMG),
        ("x/y", meta(pipeline_tag="image-to-text"), TaskType.IMG2TXT),
        ("x/y", meta(pipeline_tag="image-text-to-text"), TaskType.IMG2TXT),
        ("x/y", meta(pipeline_tag="image-feature-extraction"), TaskType.IMG2EMBED),
        ("x/y", meta(pipeline_tag="zero-shot-image-classification"), TaskType.IMG2EMBED),
        # an unknown tag falls through to the architectures
        ("x/y", meta(pipeline_tag="audio-classification", archs=["LlamaForCausalLM"]), TaskType.TXT2TXT),
        ("x/y", meta(library_name="sentence-transformers"), TaskType.TXT2EMBED),
        # architectures
        (None, meta(archs=["GPT2LMHeadModel"]), TaskType.TXT2TXT),
        (None, meta(archs=["LlamaForCausalLM"]), TaskType.TXT2TXT),
        (None, meta(archs=["Qwen2ForCausalLM"]), TaskType.TXT2TXT),
        (None, meta(archs=["T5ForConditionalGeneration"]), TaskType.TXT2TXT),
        (None, meta(archs=["BlipForConditionalGeneration"]), TaskType.IMG2TXT),
        (None, meta(archs=["Blip2ForConditionalGeneration"]), TaskType.IMG2TXT),
        (None, meta(archs=["VisionEncoderDecoderModel"]), TaskType.IMG2TXT),
        (None, meta(archs=["CLIPModel"]), TaskType.IMG2EMBED),
        (None, meta(archs=["SiglipModel"]), TaskType.IMG2EMBED),
        (None, meta(archs=["SomethingUnknown", "GPT2LMHeadModel"]), TaskType.TXT2TXT),
        # nothing says
        (None, meta(), None),
        ("x/y", meta(archs=["BertModel"]), None),
        ("x/y", meta(archs=[]), None),
        ("x/y", meta(pipeline_tag="audio-classification"), None),
        ("x/y", meta(files=("config.json", "README.md")), None),
    ],
)
def test_detect_task(model_id: str | None, metadata: ModelMetadata, expected: TaskType | None) -> None:
    assert detect_task(model_id, metadata) == expected


def test_detect_task_null_architectures() -> None:
    assert detect_task(None, ModelMetadata(config={"architectures": None})) is None


# -- read_folder_metadata ---------------------------------------------------------------------


def test_read_folder_metadata(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}), "utf-8")
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"task_type": "txt2txt"}), "utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\0")
    (tmp_path / "empty-dir").mkdir()
    m = read_folder_metadata(tmp_path)
    assert m.files == frozenset({"config.json", MANIFEST_FILE, "sub/weights.bin"})
    assert m.config == {"architectures": ["GPT2LMHeadModel"]}
    assert m.manifest == {"task_type": "txt2txt"}
    assert m.pipeline_tag is None and m.library_name is None
    assert detect_task(None, m) is TaskType.TXT2TXT


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2, 3]", b'"a string"', b"\xff\xfe\x00garbage", b"null"],
)
def test_read_folder_metadata_tolerates_bad_json(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "config.json").write_bytes(content)
    (tmp_path / MANIFEST_FILE).write_bytes(content)
    m = read_folder_metadata(tmp_path)
    assert m.config == {} and m.manifest == {}
    assert m.files == frozenset({"config.json", MANIFEST_FILE})
    assert detect_task(None, m) is None


def test_read_folder_metadata_of_a_sentence_transformers_clip_folder(tmp_path: Path) -> None:
    (tmp_path / "0_CLIPModel").mkdir()
    (tmp_path / "0_CLIPModel" / "config.json").write_text('{"architectures": ["CLIPModel"]}', "utf-8")
    (tmp_path / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}]',
        "utf-8",
    )
    m = read_folder_metadata(tmp_path)
    assert m.config == {}  # no root config.json
    assert detect_task(None, m) is TaskType.IMG2EMBED


def test_read_folder_metadata_of_an_empty_folder(tmp_path: Path) -> None:
    assert read_folder_metadata(tmp_path) == ModelMetadata()
