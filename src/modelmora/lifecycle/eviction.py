"""Which models to evict before a load, and which have idled past their keep-alive.

Pure functions over a snapshot of the workers the manager holds: no processes, no probes, no
clock reads (the time is passed in). The manager measures, builds `Resident`s, asks
`plan_load`, and applies the plan; tests drive it with tables.

Accounting, in bytes:

- RAM: every resident's RSS counts against `Budget.ram_bytes`, whatever its device (a GPU
  worker still holds the interpreter, torch and its host-side buffers).
- VRAM: per device. A resident on ``cuda:1`` uses no VRAM of ``cuda:0``; evicting it frees
  RAM only, as far as a load on ``cuda:0`` is concerned.
- A resident that is loading counts with its estimate; it is never a victim.
- The warm spare (`SPARE`) counts like any worker and is the first thing given up. When the
  load is going to *take* the spare (the spare becomes the model's worker), leave the spare out
  of `residents`: its memory is then part of the new model's `Need`.

Figures in `Plan.details` are in MB of 2**20 bytes, the unit of `resources.max_memory_mb`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

SPARE = "<spare>"  # the warm spare's name (lifecycle/spare.py SPARE_NAME)
ANY_DEVICE = "*"  # a Budget.gpu_bytes key: the limit of every CUDA device not named on its own
MB = 1 << 20

PlanAction = Literal["load", "evict_then_load", "wait", "impossible"]


def normalize_device(device: str) -> str:
    """``"cuda"`` is torch's current device, ``cuda:0`` for a worker: one name per device."""
    name = device.strip().lower()
    return "cuda:0" if name == "cuda" else name


def is_gpu(device: str) -> bool:
    """Devices with their own memory budget. ``mps`` shares the host's memory: RAM only."""
    return normalize_device(device).startswith("cuda:")


@dataclass(frozen=True, slots=True)
class Resident:
    """One worker process the manager holds (a model's, or the warm spare)."""

    name: str  # model name; the warm spare uses SPARE
    ram_bytes: int  # measured RSS of its process tree
    gpu_bytes: int  # measured VRAM (0 on CPU)
    device: str  # "cpu" or "cuda:N" ("cuda" is read as "cuda:0")
    busy: bool  # requests in flight or queued: never evicted
    last_used: float  # monotonic seconds
    keep_alive: float  # seconds idle before unload; negative (-1) = forever; 0 = right after its request
    loading: bool = False  # a load in progress: counts its estimate, never a victim

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", normalize_device(self.device))


@dataclass(frozen=True, slots=True)
class Budget:
    ram_bytes: int | None  # all workers together; None = unlimited
    # per device ("cuda:0" -> bytes), ANY_DEVICE for devices not named; None = unlimited
    gpu_bytes: Mapping[str, int] | None

    def __post_init__(self) -> None:
        if self.gpu_bytes is not None:
            normalized = {normalize_device(k): int(v) for k, v in self.gpu_bytes.items()}
            object.__setattr__(self, "gpu_bytes", normalized)

    def gpu_limit(self, device: str) -> int | None:
        """The VRAM budget of `device`; None when unlimited (or not a CUDA device)."""
        if self.gpu_bytes is None or not is_gpu(device):
            return None
        device = normalize_device(device)
        if device in self.gpu_bytes:
            return self.gpu_bytes[device]
        return self.gpu_bytes.get(ANY_DEVICE)


@dataclass(frozen=True, slots=True)
class Need:
    """What loading one model will take (see memory.estimate_need)."""

    name: str
    ram_bytes: int
    gpu_bytes: int  # on `device`; ignored unless device is a CUDA device
    device: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", normalize_device(self.device))


@dataclass(frozen=True, slots=True)
class Plan:
    action: PlanAction
    victims: tuple[str, ...]  # in eviction order: the spare first, then least recently used idle
    reason: str  # one human sentence, for logs and error messages
    details: dict[str, Any]  # figures in MB: the 503 INSUFFICIENT_MEMORY body's `details`


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / MB, 1)


class _Account:
    """Usage after removing some residents, against one need and one budget."""

    def __init__(self, need: Need, budget: Budget) -> None:
        self.need = need
        self.device = need.device
        self.need_gpu = need.gpu_bytes if is_gpu(need.device) else 0
        self.ram_limit = budget.ram_bytes
        self.gpu_limit = budget.gpu_limit(need.device)  # None on the CPU

    def ram(self, residents: Iterable[Resident]) -> int:
        return sum(r.ram_bytes for r in residents)

    def gpu(self, residents: Iterable[Resident]) -> int:
        return sum(r.gpu_bytes for r in residents if r.device == self.device)

    def short(self, residents: Sequence[Resident]) -> tuple[int, int]:
        """Bytes missing (RAM, VRAM of need.device) to load next to `residents`; (0, 0) = fits."""
        ram_short = gpu_short = 0
        if self.ram_limit is not None:
            ram_short = max(0, self.ram(residents) + self.need.ram_bytes - self.ram_limit)
        if self.gpu_limit is not None:
            gpu_short = max(0, self.gpu(residents) + self.need_gpu - self.gpu_limit)
        return ram_short, gpu_short

    def helps(self, resident: Resident, short: tuple[int, int]) -> bool:
        ram_short, gpu_short = short
        return (ram_short > 0 and resident.ram_bytes > 0) or (
            gpu_short > 0 and resident.device == self.device and resident.gpu_bytes > 0
        )

    def describe(self, short: tuple[int, int]) -> str:
        parts = []
        if short[0]:
            parts.append(f"{_mb(short[0])} MB of RAM")
        if short[1]:
            parts.append(f"{_mb(short[1])} MB of VRAM on {self.device}")
        return " and ".join(parts)

    def free_after(self, residents: Sequence[Resident]) -> dict[str, float | None]:
        ram = gpu = None
        if self.ram_limit is not None:
            ram = self.ram_limit - self.ram(residents) - self.need.ram_bytes
        if self.gpu_limit is not None:
            gpu = self.gpu_limit - self.gpu(residents) - self.need_gpu
        return {"ram_mb": _mb(ram), "gpu_mb": _mb(gpu)}


def _details(
    acc: _Account,
    budget: Budget,
    residents: Sequence[Resident],
    after: Sequence[Resident],
    victims: Sequence[Resident],
) -> dict[str, Any]:
    on_gpu = is_gpu(acc.device)
    devices = sorted({r.device for r in residents if is_gpu(r.device)} | set(budget.gpu_bytes or {}))
    per_device = {
        dev: {
            "budget_mb": _mb(budget.gpu_limit(dev)),
            "used_mb": _mb(sum(r.gpu_bytes for r in residents if r.device == dev)),
        }
        for dev in devices
        if dev != ANY_DEVICE
    }
    return {
        "model": acc.need.name,
        "device": acc.device,
        "need": {"ram_mb": _mb(acc.need.ram_bytes), "gpu_mb": _mb(acc.need_gpu)},
        "budget": {"ram_mb": _mb(acc.ram_limit), "gpu_mb": _mb(acc.gpu_limit)},
        "used": {"ram_mb": _mb(acc.ram(residents)), "gpu_mb": _mb(acc.gpu(residents)) if on_gpu else None},
        "free_after": acc.free_after(after),
        "devices": per_device,
        "victims": [r.name for r in victims],
    }


def _eviction_order(residents: Iterable[Resident]) -> list[Resident]:
    """Idle residents (not busy, not loading): the spare first, then least recently used."""
    idle = [r for r in residents if not r.busy and not r.loading]
    return sorted(idle, key=lambda r: (r.name != SPARE, r.last_used, r.name))


def plan_load(residents: Sequence[Resident], need: Need, budget: Budget) -> Plan:
    """What to do so that `need` fits next to `residents` within `budget`.

    - "impossible": the model alone exceeds the RAM budget or its device's VRAM budget. (Evicting
      every resident, busy ones included, leaves only the model, so this is also the case where
      not even that would make room.)
    - "load": it fits now.
    - "evict_then_load": evicting `victims` makes it fit. Victims are idle (never busy, never
      loading), chosen in order, the spare first then least recently used, each only if it frees
      memory that is short (a GPU worker on another device frees RAM, not VRAM of this one);
      a victim that turns out not to be needed once later ones are chosen is kept (the spare
      aside: it is cheap to refill and always goes first).
    - "wait": evicting every idle resident is not enough, but busy or loading ones hold enough;
      the caller waits (within its deadline) for one to become idle and plans again.

    A resident named like the model is ignored: it is the one being replaced. Names are unique.
    """
    acc = _Account(need, budget)
    others = [r for r in residents if r.name != need.name]
    name = need.name

    if acc.short([]) != (0, 0):
        too_big = acc.describe(acc.short([]))
        return Plan(
            "impossible",
            (),
            f"model {name!r} alone needs {too_big} more than the memory budget allows",
            _details(acc, budget, others, [], []),
        )

    short = acc.short(others)
    if short == (0, 0):
        return Plan("load", (), f"model {name!r} fits in memory", _details(acc, budget, others, others, []))

    chosen: list[Resident] = []
    remaining = list(others)
    for candidate in _eviction_order(others):
        if short == (0, 0):
            break
        if acc.helps(candidate, short):
            chosen.append(candidate)
            remaining.remove(candidate)
            short = acc.short(remaining)

    if short != (0, 0):
        held = [r for r in others if r.busy or r.loading]
        waiting_for = [
            r.name for r in sorted(held, key=lambda r: (r.last_used, r.name)) if acc.helps(r, short)
        ]
        details = _details(acc, budget, others, remaining, [])
        details["waiting_for"] = waiting_for
        return Plan(
            "wait",
            (),
            f"model {name!r} needs {acc.describe(short)} more than evicting every idle model frees; "
            f"waiting for a busy model ({', '.join(waiting_for)}) to become idle",
            details,
        )

    # Only as many as needed: give back a victim (most recently used first) whose eviction the
    # later, larger ones made unnecessary. The spare is never given back: it goes first.
    for victim in reversed(chosen[:]):
        if victim.name == SPARE:
            continue
        if acc.short([*remaining, victim]) == (0, 0):
            chosen.remove(victim)
            remaining.append(victim)

    victims = tuple(r.name for r in chosen)
    return Plan(
        "evict_then_load",
        victims,
        f"evicting {', '.join(victims)} to make room for model {name!r}",
        _details(acc, budget, others, remaining, chosen),
    )


def expired(residents: Sequence[Resident], now: float) -> list[str]:
    """Models idle past their keep-alive, oldest first: not busy, not loading, keep_alive >= 0
    and now - last_used >= keep_alive. The spare never expires."""
    due = [
        r
        for r in residents
        if r.name != SPARE
        and not r.busy
        and not r.loading
        and r.keep_alive >= 0
        and now - r.last_used >= r.keep_alive
    ]
    return [r.name for r in sorted(due, key=lambda r: (r.last_used, r.name))]
