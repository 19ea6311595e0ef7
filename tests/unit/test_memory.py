"""Memory accounting: budgets from settings, weight sizes, load estimates, and the real probe."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

from modelmora.config import ResourcesSettings
from modelmora.lifecycle.eviction import ANY_DEVICE, MB, Budget, Need
from modelmora.lifecycle.memory import (
    CUDA_CONTEXT_BYTES,
    PLAIN_WORKER_BASE_BYTES,
    TORCH_CUDA_WORKER_BASE_BYTES,
    TORCH_WORKER_BASE_BYTES,
    SystemProbe,
    budget_from_settings,
    estimate_need,
    resolve_device,
    weights_bytes,
)

GB = 1024 * MB


class FakeProbe:
    def __init__(self, totals: dict[str, int] | None = None) -> None:
        self.totals = totals or {}
        self.total_calls = 0

    def process_tree_rss(self, pid: int) -> int:
        return 0

    def gpu_bytes_by_pid(self) -> dict[int, int]:
        return {}

    def gpu_total_bytes(self) -> dict[str, int]:
        self.total_calls += 1
        return dict(self.totals)

    def system_available_bytes(self) -> int:
        return 64 * GB


TWO_GPUS = {"cuda:0": 80 * GB, "cuda:1": 40 * GB}

# -- budget_from_settings --------------------------------------------------------------------------

BUDGET_CASES: list[tuple[str, dict[str, Any], dict[str, int], Budget]] = [
    ("nothing set", {}, TWO_GPUS, Budget(None, None)),
    ("ram only", {"max_memory_mb": 4096}, TWO_GPUS, Budget(4096 * MB, None)),
    (
        "gpu mb per device",
        {"gpu_memory_mb": 8000},
        TWO_GPUS,
        Budget(None, {"cuda:0": 8000 * MB, "cuda:1": 8000 * MB, ANY_DEVICE: 8000 * MB}),
    ),
    (
        "gpu mb capped at the device",
        {"gpu_memory_mb": 50 * 1024},
        TWO_GPUS,
        Budget(None, {"cuda:0": 50 * GB, "cuda:1": 40 * GB, ANY_DEVICE: 50 * GB}),
    ),
    ("gpu mb without nvml", {"gpu_memory_mb": 8000}, {}, Budget(None, {ANY_DEVICE: 8000 * MB})),
    (
        "fraction",
        {"gpu_memory_fraction": 0.5},
        TWO_GPUS,
        Budget(None, {"cuda:0": 40 * GB, "cuda:1": 20 * GB}),
    ),
    ("fraction without nvml", {"gpu_memory_fraction": 0.5}, {}, Budget(None, {})),
    (
        "mb and fraction: the smaller",
        {"max_memory_mb": 1000, "gpu_memory_mb": 30 * 1024, "gpu_memory_fraction": 0.5},
        TWO_GPUS,
        Budget(1000 * MB, {"cuda:0": 30 * GB, "cuda:1": 20 * GB, ANY_DEVICE: 30 * GB}),
    ),
    ("probe says cuda", {"gpu_memory_fraction": 0.25}, {"cuda": 8 * GB}, Budget(None, {"cuda:0": 2 * GB})),
]


@pytest.mark.parametrize(
    ("settings", "totals", "want"), [c[1:] for c in BUDGET_CASES], ids=[c[0] for c in BUDGET_CASES]
)
def test_budget_from_settings(settings: dict[str, Any], totals: dict[str, int], want: Budget) -> None:
    assert budget_from_settings(ResourcesSettings.model_validate(settings), FakeProbe(totals)) == want


def test_budget_without_gpu_settings_does_not_probe_the_gpu() -> None:
    probe = FakeProbe(TWO_GPUS)
    budget_from_settings(ResourcesSettings.model_validate({"max_memory_mb": 100}), probe)
    assert probe.total_calls == 0


# -- weights_bytes --------------------------------------------------------------------------------

MINILM_HUB_REPO = {
    "config.json": 600,
    "tokenizer.json": 466_000,
    "vocab.txt": 232_000,
    "model.safetensors": 90_900_000,
    "pytorch_model.bin": 90_900_000,
    "tf_model.h5": 91_000_000,
    "rust_model.ot": 90_900_000,
    "onnx/model.onnx": 90_400_000,
    "onnx/model_qint8_avx512.onnx": 23_000_000,
    "openvino/openvino_model.bin": 90_300_000,
    "openvino/openvino_model_qint8_quantized.bin": 22_900_000,
}

WEIGHTS_CASES: list[tuple[str, dict[str, int], int]] = [
    ("nothing", {}, 0),
    ("no weights", {"config.json": 10, "README.md": 20}, 0),
    ("one safetensors", {"model.safetensors": 1000, "config.json": 10}, 1000),
    (
        "safetensors shards add up",
        {"model-00001-of-00002.safetensors": 600, "model-00002-of-00002.safetensors": 400},
        1000,
    ),
    ("one format counts", MINILM_HUB_REPO, 90_900_000),
    ("pickles when no safetensors", {"pytorch_model.bin": 500, "extra.pt": 20, "onnx/model.onnx": 480}, 520),
    (
        "training state is not weights",
        {"model.pt": 100, "optimizer.pt": 200, "scheduler.pt": 1, "rng_state.pth": 1},
        100,
    ),
    ("training_args.bin", {"pytorch_model.bin": 100, "training_args.bin": 5}, 100),
    ("ckpt", {"sd.ckpt": 4000}, 4000),
    ("gguf", {"model.Q4_K_M.gguf": 700}, 700),
    ("onnx only", {"onnx/model.onnx": 480, "onnx/model_O2.onnx": 470}, 950),
    ("openvino only", {"openvino/openvino_model.bin": 480}, 480),
    (
        "pipeline components add up, variants do not",
        {
            "unet/diffusion_pytorch_model.safetensors": 3400,
            "unet/diffusion_pytorch_model.fp16.safetensors": 1700,
            "vae/diffusion_pytorch_model.safetensors": 330,
            "text_encoder/model.safetensors": 490,
            "text_encoder/model.fp16.safetensors": 245,
            "unet/diffusion_pytorch_model.bin": 3400,
        },
        3400 + 330 + 490,
    ),
    ("suffix case and windows paths", {"sub\\Model.SafeTensors": 10, "sub\\other.bin": 99}, 10),
]


@pytest.mark.parametrize(("files", "want"), [c[1:] for c in WEIGHTS_CASES], ids=[c[0] for c in WEIGHTS_CASES])
def test_weights_bytes(files: dict[str, int], want: int) -> None:
    assert weights_bytes(files) == want


# -- estimate_need --------------------------------------------------------------------------------

W = 90 * MB  # MiniLM-sized weights
LOADED = int(W * 1.2)

NEED_CASES: list[tuple[str, str, dict[str, Any] | None, bool, Need]] = [
    # estimated from the weights
    ("cpu torch", "cpu", None, True, Need("m", TORCH_WORKER_BASE_BYTES + LOADED, 0, "cpu")),
    (
        "gpu torch",
        "cuda:0",
        None,
        True,
        Need("m", TORCH_CUDA_WORKER_BASE_BYTES, LOADED + CUDA_CONTEXT_BYTES, "cuda:0"),
    ),
    (
        "cuda is cuda:0",
        "cuda",
        None,
        True,
        Need("m", TORCH_CUDA_WORKER_BASE_BYTES, LOADED + CUDA_CONTEXT_BYTES, "cuda:0"),
    ),
    ("cpu plain", "cpu", None, False, Need("m", PLAIN_WORKER_BASE_BYTES + LOADED, 0, "cpu")),
    ("plain holds no vram", "cuda:0", None, False, Need("m", PLAIN_WORKER_BASE_BYTES + LOADED, 0, "cuda:0")),
    ("mps is estimated as the cpu", "mps", None, True, Need("m", TORCH_WORKER_BASE_BYTES + LOADED, 0, "mps")),
    ("empty measurement", "cpu", {}, True, Need("m", TORCH_WORKER_BASE_BYTES + LOADED, 0, "cpu")),
    (
        "no rss measured",
        "cpu",
        {"rss_bytes": 0, "gpu_bytes": 0},
        True,
        Need("m", TORCH_WORKER_BASE_BYTES + LOADED, 0, "cpu"),
    ),
    # measured wins
    ("measured cpu", "cpu", {"rss_bytes": 511 * MB, "gpu_bytes": 0}, True, Need("m", 511 * MB, 0, "cpu")),
    (
        "measured gpu",
        "cuda:0",
        {"rss_bytes": 700 * MB, "gpu_bytes": 900 * MB},
        True,
        Need("m", 700 * MB, 900 * MB, "cuda:0"),
    ),
    (
        "measured on another gpu",
        "cuda:1",
        {"rss_bytes": 700 * MB, "gpu_bytes": 900 * MB, "device": "cuda:0"},
        True,
        Need("m", 700 * MB, 900 * MB, "cuda:1"),
    ),
    ("measured plain", "cpu", {"rss_bytes": 25 * MB, "gpu_bytes": 0}, False, Need("m", 25 * MB, 0, "cpu")),
    # measured on the other kind of device: no guide
    (
        "gpu measurement for a cpu load",
        "cpu",
        {"rss_bytes": 700 * MB, "gpu_bytes": 900 * MB},
        True,
        Need("m", TORCH_WORKER_BASE_BYTES + LOADED, 0, "cpu"),
    ),
    (
        "cpu measurement for a gpu load",
        "cuda:0",
        {"rss_bytes": 511 * MB, "gpu_bytes": 0},
        True,
        Need("m", TORCH_CUDA_WORKER_BASE_BYTES, LOADED + CUDA_CONTEXT_BYTES, "cuda:0"),
    ),
    (
        "device says cpu",
        "cuda:0",
        {"rss_bytes": 511 * MB, "gpu_bytes": 0, "device": "cpu"},
        True,
        Need("m", TORCH_CUDA_WORKER_BASE_BYTES, LOADED + CUDA_CONTEXT_BYTES, "cuda:0"),
    ),
]


@pytest.mark.parametrize(
    ("device", "measured", "uses_torch", "want"), [c[1:] for c in NEED_CASES], ids=[c[0] for c in NEED_CASES]
)
def test_estimate_need(device: str, measured: dict[str, Any] | None, uses_torch: bool, want: Need) -> None:
    assert estimate_need("m", device, measured, W, uses_torch=uses_torch) == want


def test_estimate_for_minilm_is_close_to_what_was_measured() -> None:
    # a MiniLM worker with 87 MB of weights: 488-511 MB RSS measured on this machine
    need = estimate_need("minilm", "cpu", None, 87 * MB, uses_torch=True)
    assert 488 * MB <= need.ram_bytes <= 600 * MB


@pytest.mark.parametrize(
    ("device", "totals", "want"),
    [
        ("auto", {}, "cpu"),
        ("auto", {"cuda:0": GB}, "cuda:0"),
        ("cuda", {}, "cuda:0"),
        ("cuda:1", {"cuda:0": GB}, "cuda:1"),
        ("cpu", {"cuda:0": GB}, "cpu"),
        ("mps", {}, "mps"),
    ],
)
def test_resolve_device(device: str, totals: dict[str, int], want: str) -> None:
    assert resolve_device(device, totals) == want


# -- SystemProbe: RAM -----------------------------------------------------------------------------


def test_process_tree_rss_of_this_process() -> None:
    assert SystemProbe().process_tree_rss(os.getpid()) > 0


def test_process_tree_rss_counts_children() -> None:
    probe = SystemProbe()
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"up\n"  # its interpreter is up
        child_rss = probe.process_tree_rss(child.pid)
        own = psutil.Process().memory_info().rss
        assert child_rss > MB
        assert probe.process_tree_rss(os.getpid()) > own
    finally:
        child.communicate(b"")


def test_process_tree_rss_of_a_dead_process_is_zero() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert SystemProbe().process_tree_rss(child.pid) == 0


def test_process_tree_rss_of_an_impossible_pid_is_zero() -> None:
    assert SystemProbe().process_tree_rss(-1) == 0
    assert SystemProbe().process_tree_rss(2**31 - 1) == 0


def test_system_available_bytes() -> None:
    assert 0 < SystemProbe().system_available_bytes() <= psutil.virtual_memory().total


# -- SystemProbe: VRAM through a fake NVML ----------------------------------------------------------


@dataclass
class _Proc:
    pid: int
    usedGpuMemory: int | None  # NVML's name


@dataclass
class _MemInfo:
    total: int


class FakeNvml:
    """The part of pynvml that SystemProbe uses."""

    def __init__(
        self,
        totals: list[int],
        compute: list[list[_Proc]],
        graphics: list[list[_Proc]] | None = None,
        fail_init: bool = False,
        fail_query: bool = False,
    ) -> None:
        self.totals, self.compute = totals, compute
        self.graphics = graphics or [[] for _ in totals]
        self.fail_init, self.fail_query = fail_init, fail_query
        self.inits = self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.fail_init:
            raise RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.totals)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> _MemInfo:
        if self.fail_query:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return _MemInfo(self.totals[h])

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[_Proc]:
        if self.fail_query:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return self.compute[h]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int) -> list[_Proc]:
        return self.graphics[h]


def test_nvml_totals_and_use_per_pid() -> None:
    nvml = FakeNvml(
        totals=[80 * GB, 40 * GB],
        compute=[[_Proc(10, 2 * GB), _Proc(11, None)], [_Proc(10, 1 * GB), _Proc(12, 3 * GB)]],
        graphics=[[_Proc(10, 2 * GB)], []],  # the same allocation, listed twice
    )
    probe = SystemProbe(lambda: nvml)
    assert nvml.inits == 0  # nothing at construction
    assert probe.gpu_total_bytes() == {"cuda:0": 80 * GB, "cuda:1": 40 * GB}
    assert probe.gpu_bytes_by_pid() == {10: 3 * GB, 11: 0, 12: 3 * GB}
    assert nvml.inits == 1  # once
    probe.close()
    assert nvml.shutdowns == 1


def test_nvml_missing_is_no_gpu() -> None:
    def missing() -> Any:
        raise ModuleNotFoundError("No module named 'pynvml'")

    probe = SystemProbe(missing)
    assert probe.gpu_total_bytes() == {}
    assert probe.gpu_bytes_by_pid() == {}
    assert SystemProbe(None).gpu_total_bytes() == {}


def test_nvml_without_driver_is_no_gpu() -> None:
    nvml = FakeNvml([80 * GB], [[]], fail_init=True)
    probe = SystemProbe(lambda: nvml)
    assert probe.gpu_total_bytes() == {}
    assert probe.gpu_bytes_by_pid() == {}
    assert nvml.inits == 1  # not retried at every call


def test_nvml_without_devices_is_no_gpu() -> None:
    probe = SystemProbe(lambda: FakeNvml([], []))
    assert probe.gpu_total_bytes() == {}
    assert probe.gpu_bytes_by_pid() == {}


def test_nvml_errors_while_querying_are_no_gpu() -> None:
    probe = SystemProbe(lambda: FakeNvml([80 * GB], [[_Proc(1, GB)]], fail_query=True))
    assert probe.gpu_total_bytes() == {}
    assert probe.gpu_bytes_by_pid() == {}


def test_default_probe_here() -> None:
    totals = SystemProbe().gpu_total_bytes()
    if importlib.util.find_spec("pynvml") is None:
        assert totals == {}
    assert all(dev.startswith("cuda:") and size > 0 for dev, size in totals.items())


def test_importing_memory_imports_neither_torch_nor_pynvml() -> None:
    code = (
        "import sys, modelmora.lifecycle.memory, modelmora.lifecycle.eviction; "
        "print(sorted(m for m in ('torch', 'pynvml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
