"""The task types, named once for every layer.

The registry stores a model's task type, the server's task specs (`modelmora.tasks.specs`)
are looked up by it and the worker channel carries it; the registry and the tasks package sit
in one layer and may not import each other, so the enum lives here, below both.
"""

from __future__ import annotations

from enum import StrEnum


class TaskType(StrEnum):
    TXT2EMBED = "txt2embed"
    IMG2EMBED = "img2embed"
    TXT2TXT = "txt2txt"
    TXT2IMG = "txt2img"
    IMG2TXT = "img2txt"


class StreamKind(StrEnum):
    """What a task streams while it works: its value is the kind of the events its adapter
    emits (`Event.kind`), and a task with none cannot be asked to stream."""

    TOKENS = "token"
    PROGRESS = "progress"
