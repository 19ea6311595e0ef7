"""The `modelmora.v1` protocol: the .proto and the code protoc generates from it (committed).

Regenerate with `python -m modelmora.v1.generate` (needs the `test` extra: grpcio-tools and
mypy-protobuf at the pinned versions); tests/unit/test_protos.py fails when the committed code
is stale.
"""
