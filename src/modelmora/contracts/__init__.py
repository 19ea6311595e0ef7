"""The bottom layer: what two or more packages must agree on, importing nothing of the project.

The worker channel's messages (`channel`), the `Runner` protocol between the scheduler and a
worker (`runner`), the one orjson setting of every JSON response (`encoding`) and the S3
client factory (`s3`). Everything above may import these; these import only the standard
library and third-party packages (lazily, where they are heavy), so no package cycle can form
through them. `tests/unit/test_import_layers.py` holds the tree to that.
"""
