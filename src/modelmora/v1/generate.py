"""Regenerate the committed protobuf / gRPC code from modelmora.proto.

The code is committed rather than built so that installing ModelMora (wheel, sdist, editable)
needs no protoc, and so that a change to the protocol shows up in review as a diff of the
generated API. The generator versions are pinned in the `test` extra; a test runs this into a
temporary folder and compares, so a proto edit without regeneration fails CI.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PROTO = "modelmora/v1/modelmora.proto"
SRC_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `modelmora` package
OUTPUTS = ("modelmora_pb2.py", "modelmora_pb2.pyi", "modelmora_pb2_grpc.py", "modelmora_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Write the generated files under `out_dir` (as `modelmora/v1/...`); returns their paths."""
    from grpc_tools import protoc

    plugin = shutil.which("protoc-gen-mypy") or str(Path(sys.executable).parent / "protoc-gen-mypy")
    grpc_plugin = shutil.which("protoc-gen-mypy_grpc") or str(
        Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    )
    include = Path(protoc.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{SRC_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={plugin}",
        f"--plugin=protoc-gen-mypy_grpc={grpc_plugin}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return [out_dir / "modelmora" / "v1" / name for name in OUTPUTS]


def main() -> None:
    for path in generate(SRC_ROOT):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
