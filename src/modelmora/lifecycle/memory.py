"""Memory probes and the memory accounting that feeds lifecycle/eviction.py.

The server process never imports torch: RAM comes from psutil, VRAM from NVML (the
`nvidia-ml-py` package, module `pynvml`) when it is importable and a GPU answers. NVML is
optional: without it, or on any NVML error, the probe reports no GPU, and VRAM figures come
from what the workers report about themselves.

Everything but `SystemProbe` is pure: probes are passed in, no clock is read.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import psutil

from modelmora.lifecycle.eviction import ANY_DEVICE, MB, Budget, Need, is_gpu, normalize_device

if TYPE_CHECKING:
    from modelmora.config import ResourcesSettings
    from modelmora.contracts.runner import Runner

# -- estimates before a model's first load -----------------------------------------------------
#
# RSS of one process, measured on the CPU development machine (torch 2.13 CPU build,
# sentence-transformers, Python 3.11):
#   bare interpreter 13 MB; + modelmora's worker module 17 MB; + the fake adapter 20 MB;
#   + torch 219 MB; + sentence-transformers 409 MB; all-MiniLM-L6-v2 loaded (87 MB of
#   safetensors) 441 MB, after one encode 488 MB. The lifecycle issue measured 511 MB for the
#   same MiniLM worker.
# and on an H100 (torch 2.11 CUDA 13 build, Python 3.12, driver 580):
#   bare 20 MB; + torch 491 MB; + sentence-transformers 836 MB; after CUDA init 961 MB of RSS,
#   with 612 MB of VRAM (NVML, per process) for 2 MB that torch had reserved; after a 1 GB
#   tensor and one fp16 matmul: 1798 MB of VRAM for 1122 MB reserved.
# The constants round those up so that a first estimate errs on the side of fitting: after the
# first load the registry keeps what the worker really used, and that wins.

TORCH_WORKER_BASE_BYTES = 450 * MB
"""RAM of a worker with torch (CPU build) and sentence-transformers imported, no model: 409 MB
measured, plus room. A CUDA build of torch takes about twice that (836 MB above), also for a
CPU load: the first measurement corrects it."""

TORCH_CUDA_WORKER_BASE_BYTES = 1000 * MB
"""RAM of a GPU worker, its CUDA context initialised, no model: 961 MB measured on the H100."""

PLAIN_WORKER_BASE_BYTES = 40 * MB
"""A worker that never imports torch (the fake adapter): 20 MB measured, doubled."""

WEIGHTS_OVERHEAD = 1.2
"""Loaded weights take more than their files: buffers, allocator slack, first activations
(MiniLM: 87 MB of weights added ~80 MB after load and encode on top of the imports)."""

CUDA_CONTEXT_BYTES = 700 * MB
"""VRAM a process spends outside torch's allocator: the CUDA context with torch's kernels, then
cuBLAS workspaces: 610 MB at CUDA init and 676 MB after a matmul, measured on the H100 (NVML
per-process use less torch's `memory_reserved()`). Worker-reported `memory_reserved()` leaves
it out; NVML's per-process figure includes it."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx")

# One format is loaded when a repository ships several: the first present in this order.
_FORMATS: tuple[frozenset[str], ...] = (
    frozenset({".safetensors"}),
    frozenset({".bin", ".pt", ".pth", ".ckpt"}),
    frozenset({".gguf"}),
    frozenset({".onnx"}),
)
# Exports for other runtimes that Hub repositories ship beside the torch weights.
_EXPORT_DIRS = frozenset({"onnx", "openvino", "coreml", "tflite"})
# Training state that trainers save with a checkpoint: not loaded for inference.
_TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng_state", "training_args", "trainer_state")
# Precision variants of one file (diffusers: diffusion_pytorch_model.fp16.safetensors).
_VARIANTS = frozenset({"fp16", "bf16", "fp32", "ema", "non_ema", "onnx"})


class MemoryProbe(Protocol):
    def process_tree_rss(self, pid: int) -> int:
        """RSS of `pid` and all its descendants; 0 when the process is gone."""
        ...

    def gpu_bytes_by_pid(self) -> dict[int, int]:
        """VRAM used per process, all devices added up; {} without a GPU."""
        ...

    def gpu_total_bytes(self) -> dict[str, int]:
        """Each device's total VRAM ({"cuda:0": bytes}); {} without a GPU."""
        ...

    def system_available_bytes(self) -> int:
        """RAM the system can give without swapping."""
        ...


def _import_pynvml() -> Any:
    return importlib.import_module("pynvml")


class SystemProbe:
    """The real probe: psutil, plus NVML when `pynvml` imports and a GPU answers.

    NVML is initialised on first use (never at import or construction) and any NVML error is
    read as "no GPU". Caveats: NVML numbers devices in PCI bus order, which is CUDA's order when
    CUDA_DEVICE_ORDER=PCI_BUS_ID or with one GPU, and ignores CUDA_VISIBLE_DEVICES; inside a
    container NVML may report host process ids, so `gpu_bytes_by_pid` can miss the workers
    (then use what the worker reports, plus CUDA_CONTEXT_BYTES).
    """

    def __init__(self, nvml_loader: Callable[[], Any] | None = _import_pynvml) -> None:
        self._loader = nvml_loader
        self._nvml: Any = None
        self._nvml_tried = False

    # -- RAM ------------------------------------------------------------------------------------

    def process_tree_rss(self, pid: int) -> int:
        try:
            root = psutil.Process(pid)
            total = int(root.memory_info().rss)
            children = root.children(recursive=True)
        except (psutil.Error, ValueError):
            return 0
        for child in children:
            try:
                total += int(child.memory_info().rss)
            except psutil.Error:
                continue  # ended between the listing and the reading
        return total

    def system_available_bytes(self) -> int:
        return int(psutil.virtual_memory().available)

    # -- VRAM -----------------------------------------------------------------------------------

    def _nvml_module(self) -> Any:
        if not self._nvml_tried:
            self._nvml_tried = True
            if self._loader is not None:
                try:
                    nvml = self._loader()
                    nvml.nvmlInit()
                    if int(nvml.nvmlDeviceGetCount()) > 0:
                        self._nvml = nvml
                except Exception:
                    self._nvml = None
        return self._nvml

    def _handles(self, nvml: Any) -> list[tuple[str, Any]]:
        count = int(nvml.nvmlDeviceGetCount())
        return [(f"cuda:{i}", nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]

    def gpu_total_bytes(self) -> dict[str, int]:
        nvml = self._nvml_module()
        if nvml is None:
            return {}
        try:
            return {dev: int(nvml.nvmlDeviceGetMemoryInfo(h).total) for dev, h in self._handles(nvml)}
        except Exception:
            return {}

    def gpu_bytes_by_pid(self) -> dict[int, int]:
        nvml = self._nvml_module()
        if nvml is None:
            return {}
        used: dict[int, int] = {}
        try:
            for _dev, handle in self._handles(nvml):
                on_device: dict[int, int] = {}
                for listing in (
                    nvml.nvmlDeviceGetComputeRunningProcesses,
                    nvml.nvmlDeviceGetGraphicsRunningProcesses,
                ):
                    for proc in listing(handle):
                        # None where the driver cannot tell (NVML_VALUE_NOT_AVAILABLE).
                        amount = int(getattr(proc, "usedGpuMemory", None) or 0)
                        pid = int(proc.pid)
                        # A process in both listings is one allocation, not two.
                        on_device[pid] = max(on_device.get(pid, 0), amount)
                for pid, amount in on_device.items():
                    used[pid] = used.get(pid, 0) + amount
        except Exception:
            return {}
        return used

    def gpu_devices(self) -> list[dict[str, float | str]]:
        """Each device's total and used memory and, where the driver reports it, its
        utilization (0..1 over NVML's last sample period), for metrics and status."""
        nvml = self._nvml_module()
        if nvml is None:
            return []
        devices: list[dict[str, float | str]] = []
        try:
            for dev, handle in self._handles(nvml):
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                entry: dict[str, float | str] = {
                    "device": dev,
                    "total_bytes": int(info.total),
                    "used_bytes": int(info.used),
                }
                with contextlib.suppress(Exception):
                    entry["utilization"] = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100
                with contextlib.suppress(Exception):
                    name = nvml.nvmlDeviceGetName(handle)
                    entry["name"] = name.decode() if isinstance(name, bytes) else str(name)
                devices.append(entry)
        except Exception:
            return []
        return devices

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        self._nvml, self._nvml_tried = None, False


# -- what a worker holds ------------------------------------------------------------------------


@runtime_checkable
class SharesPages(Protocol):
    """A runner whose process may share pages with another (a fork of the zygote)."""

    @property
    def forked(self) -> bool: ...

    def accounted_bytes(self) -> int: ...

    def memory(self) -> dict[str, int]: ...


def accounted_bytes(runner: Runner) -> int:
    """The RAM the budget counts for a runner's worker: RSS, or USS for a fork of the zygote
    (whose shared pages the zygote's RSS counts once). Summing RSS over forks would count
    torch's pages once per worker: 3 MiniLM forks would look like 3 fresh workers."""
    if isinstance(runner, SharesPages):
        return runner.accounted_bytes()
    return runner.rss_bytes()


def fork_measurements(runner: Runner) -> dict[str, int]:
    """What to keep beside a load's RSS for the next estimate: a fork's USS (what the next
    fork of the same model will add, `ZygotePool.adjust_need`)."""
    if isinstance(runner, SharesPages) and runner.forked:
        return {"uss_bytes": runner.accounted_bytes()}
    return {}


def memory_breakdown(runner: Runner) -> dict[str, int]:
    """PSS and USS of a runner's worker, for status (empty for an in-process runner)."""
    if not isinstance(runner, SharesPages):
        return {}
    figures = runner.memory()
    return {k: v for k, v in figures.items() if k != "rss_bytes"}


def process_tree_memory(pid: int) -> dict[str, int]:
    """RSS and PSS of `pid` and all its descendants, added up. The PSS total is what the tree
    really holds (each shared page divided among its sharers); the RSS total counts a page
    shared by a zygote and its forks once per process."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except (psutil.Error, ValueError):
        return {"rss_bytes": 0, "pss_bytes": 0, "processes": 0}
    rss = pss = count = 0
    for proc in processes:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue  # ended between the listing and the reading
        rss, pss, count = rss + int(info.rss), pss + int(info.pss), count + 1
    return {"rss_bytes": rss, "pss_bytes": pss, "processes": count}


# -- budgets and needs -------------------------------------------------------------------------


def budget_from_settings(resources: ResourcesSettings, probe: MemoryProbe) -> Budget:
    """The memory budget `resources` asks for.

    RAM: `max_memory_mb` for all workers together, None (unlimited) when unset.
    VRAM, per device: `gpu_memory_mb`, or `gpu_memory_fraction` of each device's total (the
    smaller when both are set), never more than the device has; None when neither is set.
    `gpu_memory_mb` also applies (under ANY_DEVICE) to devices the probe does not see, so that
    it holds without NVML; a fraction needs the probe's totals and limits nothing without them.
    """
    ram = resources.max_memory_mb * MB if resources.max_memory_mb is not None else None
    mb, fraction = resources.gpu_memory_mb, resources.gpu_memory_fraction
    if mb is None and fraction is None:
        return Budget(ram, None)
    gpu: dict[str, int] = {}
    for device, total in probe.gpu_total_bytes().items():
        limit = total
        if mb is not None:
            limit = min(limit, mb * MB)
        if fraction is not None:
            limit = min(limit, int(total * fraction))
        gpu[normalize_device(device)] = limit
    if mb is not None:
        gpu[ANY_DEVICE] = mb * MB
    return Budget(ram, gpu)


def _is_training_state(name: str) -> bool:
    return name.startswith(_TRAINING_STATE)


def _variant_key(path: PurePosixPath) -> tuple[str, str]:
    parts = path.name.split(".")
    if len(parts) >= 3 and parts[-2].lower() in _VARIANTS:
        parts = [*parts[:-2], parts[-1]]
    return str(path.parent), ".".join(parts)


def weights_bytes(files: Mapping[str, int]) -> int:
    """Bytes of the weights a load will read, from a model's files (path -> size).

    Weight files are *.safetensors, *.bin, *.pt, *.pth, *.ckpt, *.gguf and *.onnx. Hub
    repositories often ship one model several times, so that adding every file up would count
    it several times (all-MiniLM-L6-v2 ships safetensors, a pytorch .bin, eight ONNX and three
    OpenVINO exports). So: exports in onnx/, openvino/, coreml/, tflite/ folders are left out
    when anything else is there; only one format counts, the first present of safetensors,
    torch pickles (.bin/.pt/.pth/.ckpt), gguf, onnx; optimizer and other training state is left
    out; and of a file's precision variants (x.safetensors, x.fp16.safetensors) only the largest
    counts. Sharded weights and the components of a pipeline (unet/, vae/, ...) add up.
    """
    weights: dict[PurePosixPath, int] = {}
    for raw, size in files.items():
        path = PurePosixPath(raw.replace("\\", "/"))
        if path.suffix.lower() in WEIGHT_SUFFIXES and not _is_training_state(path.name.lower()):
            weights[path] = int(size)
    native = {
        p: s for p, s in weights.items() if not _EXPORT_DIRS.intersection(x.lower() for x in p.parts[:-1])
    }
    if native:
        weights = native
    for fmt in _FORMATS:
        chosen = {p: s for p, s in weights.items() if p.suffix.lower() in fmt}
        if chosen:
            largest: dict[tuple[str, str], int] = {}
            for path, size in chosen.items():
                key = _variant_key(path)
                largest[key] = max(largest.get(key, 0), size)
            return sum(largest.values())
    return 0


def resolve_device(device: str, gpu_totals: Mapping[str, int]) -> str:
    """The device a worker will use, as the server can tell without torch: "auto" is cuda:0
    when the probe sees a GPU, else cpu (the worker's own rule, tasks/torch_utils.py)."""
    name = normalize_device(device)
    if name == "auto":
        return "cuda:0" if gpu_totals else "cpu"
    return name


def estimate_need(
    name: str,
    device: str,
    measured: Mapping[str, Any] | None,
    weights: int,
    *,
    uses_torch: bool,
) -> Need:
    """What loading `name` on `device` will take.

    `measured` is what the registry kept from the previous load ({"rss_bytes", "gpu_bytes"},
    optionally "device"); it wins when present, unless it was measured on the other kind of
    device (CPU against GPU, by its "device" or, without one, by VRAM on a CPU load or none on
    a GPU load). Otherwise an estimate from the weights' size:
      CPU: RAM = base + weights * WEIGHTS_OVERHEAD, no VRAM;
      GPU: RAM = TORCH_CUDA_WORKER_BASE_BYTES, VRAM = weights * WEIGHTS_OVERHEAD + CUDA_CONTEXT_BYTES;
    base = TORCH_WORKER_BASE_BYTES for a torch worker, PLAIN_WORKER_BASE_BYTES otherwise. A
    worker that does not use torch holds no VRAM, whatever its device. Pass a resolved device
    (see `resolve_device`): anything but cuda:N is estimated as the CPU.
    """
    device = normalize_device(device)
    on_gpu = uses_torch and is_gpu(device)
    base = TORCH_WORKER_BASE_BYTES if uses_torch else PLAIN_WORKER_BASE_BYTES
    loaded = int(weights * WEIGHTS_OVERHEAD)

    if measured:
        rss = int(measured.get("rss_bytes") or 0)
        gpu = int(measured.get("gpu_bytes") or 0)
        where = measured.get("device")
        measured_on_gpu = is_gpu(str(where)) if where is not None else gpu > 0
        # A footprint does not depend on which GPU, but RAM and VRAM trade places between the
        # CPU and a GPU: a measurement from the other kind is no guide.
        same_kind = not uses_torch or measured_on_gpu == on_gpu
        if rss > 0 and same_kind:
            return Need(name, rss, gpu if on_gpu else 0, device)

    if on_gpu:
        return Need(name, TORCH_CUDA_WORKER_BASE_BYTES, loaded + CUDA_CONTEXT_BYTES, device)
    return Need(name, base + loaded, 0, device)
