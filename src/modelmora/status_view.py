"""`modelmora status` as rich tables, from the `GET /api/v1/status` document."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _mb(value: Any) -> str:
    return f"{int(value) / 2**20:,.0f} MiB" if value else "-"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    head = f"{days}d " if days else ""
    return f"{head}{hours:02d}:{minutes:02d}:{secs:02d}"


def render_status(body: dict[str, Any]) -> list[Any]:
    """Renderables, in order: a summary line, models, memory, GPUs, jobs."""
    state = "ready" if body.get("ready") else ("draining" if body.get("draining") else "not ready")
    summary = (
        f"modelmora {body.get('version', '?')}: {state}, up {_duration(body.get('uptime_seconds', 0))}, "
        f"{body.get('workers', 0)} worker(s), {body.get('in_flight', 0)} in flight, "
        f"{body.get('queued', 0)} queued"
    )
    parts: list[Any] = [summary]

    models = Table(title="models")
    for col in (
        "name",
        "task",
        "state",
        "device",
        "pid",
        "queued",
        "in flight",
        "rss",
        "gpu",
        "idle",
        "error",
    ):
        models.add_column(col)
    for m in body.get("models", []):
        idle = m.get("idle_seconds")
        memory = m.get("memory") or {}
        models.add_row(
            m["name"], m.get("task_type", ""), m["state"], m.get("device") or "-", str(m.get("pid") or "-"),
            str(m.get("queued", 0)), str(m.get("in_flight", 0)), _mb(memory.get("rss_bytes")),
            _mb(memory.get("gpu_bytes")), f"{idle:.0f} s" if idle is not None else "-", m.get("error") or "",
        )  # fmt: skip
    parts.append(models)

    mem = body.get("memory") or {}
    memory = Table(title="memory")
    memory.add_column("what")
    memory.add_column("value", justify="right")
    memory.add_row(
        "RAM budget (workers)", _mb(mem.get("budget_ram_bytes")) if mem.get("budget_ram_bytes") else "none"
    )
    memory.add_row("RAM used by workers", _mb(mem.get("used_ram_bytes")))
    memory.add_row("system available", _mb(mem.get("system_available_bytes")))
    spare = mem.get("spare") or {}
    memory.add_row(
        "zygote" if spare.get("kind") == "zygote" else "warm spare",
        f"pid {spare['pid']}, {_mb(spare.get('rss_bytes'))}" if spare.get("ready") else "-",
    )
    for device, size in (mem.get("budget_gpu_bytes") or {}).items():
        memory.add_row(f"GPU budget {device}", _mb(size))
    parts.append(memory)

    gpus = body.get("gpus") or []
    if gpus:
        table = Table(title="GPU devices")
        for col in ("device", "name", "used", "total", "utilization"):
            table.add_column(col)
        for g in gpus:
            util = g.get("utilization")
            table.add_row(
                g["device"], g.get("name", ""), _mb(g.get("used_bytes")), _mb(g.get("total_bytes")),
                f"{util * 100:.0f}%" if util is not None else "-",
            )  # fmt: skip
        parts.append(table)
    else:
        parts.append("GPU devices: none (or NVML not available)")

    jobs = body.get("jobs") or {}
    counters = body.get("counters") or {}
    parts.append("jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(jobs.items())) or "none"))
    parts.append("lifecycle: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    return parts
