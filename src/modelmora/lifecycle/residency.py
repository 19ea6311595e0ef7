"""The memory side of residency: what each resident takes, what a model will need, and the
budget both are held to.

A snapshot of the slots becomes the `Resident` list that the pure `plan_load` and `expired`
(`lifecycle/eviction.py`) decide over; the figures come from the workers (RSS, torch's GPU
view) and NVML (per-process VRAM) where it answers.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from modelmora.config import Settings
from modelmora.lifecycle.eviction import SPARE, Budget, Need, Resident, plan_load
from modelmora.lifecycle.memory import (
    CUDA_CONTEXT_BYTES,
    TORCH_WORKER_BASE_BYTES,
    MemoryProbe,
    accounted_bytes,
    budget_from_settings,
    estimate_need,
    process_tree_memory,
    weights_bytes,
)
from modelmora.lifecycle.spare import WorkerSource
from modelmora.lifecycle.state import ModelSlot
from modelmora.registry.catalog import ModelRecord, ModelState
from modelmora.tasks.specs import spec_for


class Residency:
    def __init__(
        self, settings: Settings, slots: dict[str, ModelSlot], probe: MemoryProbe, spares: WorkerSource
    ) -> None:
        self.settings = settings
        self.slots = slots  # the manager's own dict: always the current set
        self.probe = probe
        self.spares = spares
        self.budget: Budget = budget_from_settings(settings.resources, probe)

    def keep_alive_of(self, slot: ModelSlot) -> float:
        if slot.keep_alive is not None:
            return slot.keep_alive
        configured = slot.record.config.get("keep_alive_seconds")
        return float(configured) if configured is not None else self.settings.lifecycle.keep_alive_seconds

    def gpu_bytes(self, slot: ModelSlot, by_pid: dict[int, int]) -> int:
        """VRAM of a worker as NVML sees its process (CUDA context included); without NVML,
        what torch reserved plus the context's usual size."""
        if slot.loaded is None or not slot.loaded.device.startswith("cuda"):
            return 0
        pid = slot.runner.pid if slot.runner else None
        if pid is not None and pid in by_pid:
            return by_pid[pid]
        reported = slot.stats.gpu_bytes if slot.stats is not None else slot.loaded.gpu_bytes
        return reported + CUDA_CONTEXT_BYTES

    def residents(self, exclude: str | None = None, spare: bool = True) -> list[Resident]:
        residents = []
        on_gpu = any(s.loaded and s.loaded.device.startswith("cuda") for s in self.slots.values())
        by_pid = self.probe.gpu_bytes_by_pid() if on_gpu else {}
        for slot in self.slots.values():
            if slot.runner is None or slot.name == exclude:
                continue
            device = slot.loaded.device if slot.loaded else "cpu"
            residents.append(
                Resident(
                    name=slot.name,
                    ram_bytes=accounted_bytes(slot.runner),
                    gpu_bytes=self.gpu_bytes(slot, by_pid),
                    device=device,
                    busy=slot.busy,
                    last_used=slot.last_used,
                    keep_alive=self.keep_alive_of(slot),
                    loading=slot.state is ModelState.LOADING,
                )
            )
        if spare and self.spares.ready:
            residents.append(
                Resident(SPARE, self.spares.rss_bytes(), 0, "cpu", busy=False, last_used=0.0, keep_alive=-1)
            )
        return residents

    def need(self, record: ModelRecord) -> Need:
        version = record.version()
        device = str(record.config.get("device") or self.settings.resources.default_device)
        if device == "auto":
            device = "cuda:0" if self.probe.gpu_total_bytes() else "cpu"
        sizes = _file_sizes(Path(version.path), version.files)
        # Measured at the last load wins; else what the user declared; else an estimate.
        measured: dict[str, Any] | None = record.memory or None
        declared = record.resource_requirements
        if measured is None and declared.get("memory_mb"):
            measured = {
                "rss_bytes": int(declared["memory_mb"]) << 20,
                "gpu_bytes": int(declared.get("gpu_memory_mb") or 0) << 20,
            }
        return estimate_need(
            record.name,
            device,
            measured,
            weights_bytes(sizes),
            uses_torch=spec_for(record.task_type).uses_torch(record.config.get("adapter")),
        )

    def spare_fits(self) -> bool:
        """A spare is a convenience: it may only take memory no model needs (no eviction)."""
        size = self.spares.last_rss_bytes or TORCH_WORKER_BASE_BYTES
        plan = plan_load(self.residents(spare=False), Need(SPARE, size, 0, "cpu"), self.budget)
        return plan.action == "load"

    def memory_status(self) -> dict[str, Any]:
        residents = self.residents()
        return {
            "budget_ram_bytes": self.budget.ram_bytes,
            "budget_gpu_bytes": dict(self.budget.gpu_bytes) if self.budget.gpu_bytes else None,
            "used_ram_bytes": sum(r.ram_bytes for r in residents),
            "system_available_bytes": self.probe.system_available_bytes(),
            "spare": self.spares.status(),
            "tree": process_tree_memory(os.getpid()),
        }

    def gpu_bytes_by_model(self) -> dict[str, tuple[str, int]]:
        """(device, bytes) of each model on a GPU: NVML's per-process figure where it has one,
        else what the worker reported plus the CUDA context."""
        on_gpu = [s for s in self.slots.values() if s.loaded and s.loaded.device.startswith("cuda")]
        if not on_gpu:
            return {}
        by_pid = self.probe.gpu_bytes_by_pid()
        return {s.name: (s.loaded.device, self.gpu_bytes(s, by_pid)) for s in on_gpu if s.loaded}


def _file_sizes(folder: Path, files: dict[str, str]) -> dict[str, int]:
    sizes = {}
    for rel in files:
        with contextlib.suppress(OSError):
            sizes[rel] = (folder / rel).stat().st_size
    return sizes
