"""`modelmora status` and `ps` as rich tables, from the `GET /api/v1/status` document (and
`status --cluster` from `GET /api/v1/cluster`), and the rule every CLI table follows to stay
readable on a narrow terminal (`fitted_table`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table


@dataclass(frozen=True)
class Column:
    header: str
    # Which columns go first when the terminal is too narrow: the lowest `keep` first. The
    # first column (the model's or job's name) is never dropped and never cut short.
    keep: int = 0
    justify: str = "left"


def fitted_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> Table:
    """A table that fits `width`: columns are dropped, least useful first, until the widest
    cells fit; what still does not fit wraps (never an ellipsis: a name cut to `all…` is of
    no use). The first column keeps its longest name on one line while it can."""
    shown = list(range(len(columns)))

    def needed(indices: list[int]) -> int:
        cells = [max([len(columns[i].header), *(_longest_line(r[i]) for r in rows)]) for i in indices]
        return sum(cells) + 3 * len(indices) + 1  # rich's borders and padding

    for index in sorted(range(1, len(columns)), key=lambda i: columns[i].keep):
        if needed(shown) <= width:
            break
        shown.remove(index)
    table = Table(title=title)
    longest = max([len(columns[0].header), *(len(r[0]) for r in rows)]) if columns else 0
    for i in shown:
        col = columns[i]
        table.add_column(
            col.header,
            overflow="fold",
            justify=col.justify,  # type: ignore[arg-type]
            min_width=min(longest, max(8, width // 2)) if i == 0 else None,
        )
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    if len(shown) < len(columns):
        dropped = ", ".join(columns[i].header for i in range(len(columns)) if i not in shown)
        table.caption = f"(narrow terminal: {dropped} left out)"
    return table


def _longest_line(cell: str) -> int:
    """A cell's width: a cell of several lines (the cluster table's models) is as wide as its
    longest line."""
    return max(len(line) for line in cell.split("\n"))


def _mb(value: Any) -> str:
    return f"{int(value) / 2**20:,.0f} MiB" if value else "-"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    head = f"{days}d " if days else ""
    return f"{head}{hours:02d}:{minutes:02d}:{secs:02d}"


def models_table(models: list[dict[str, Any]], width: int, title: str = "models") -> Table:
    columns = [
        Column("name"),
        Column("task", keep=3),
        Column("state", keep=9),
        Column("device", keep=5),
        Column("pid", keep=1),
        Column("queued", keep=7, justify="right"),
        Column("in flight", keep=8, justify="right"),
        Column("rss", keep=6, justify="right"),
        Column("gpu", keep=4, justify="right"),
        Column("idle", keep=2, justify="right"),
        Column("error", keep=0),
    ]
    rows = []
    for m in models:
        idle = m.get("idle_seconds")
        memory = m.get("memory") or {}
        rows.append(
            [
                m["name"], m.get("task_type", ""), m["state"], m.get("device") or "-",
                str(m.get("pid") or "-"), str(m.get("queued", 0)), str(m.get("in_flight", 0)),
                _mb(memory.get("rss_bytes")), _mb(memory.get("gpu_bytes")),
                f"{idle:.0f} s" if idle is not None else "-", m.get("error") or "",
            ]
        )  # fmt: skip
    return fitted_table(title, columns, rows, width)


def ps_table(models: list[dict[str, Any]], width: int) -> Table:
    """`modelmora ps`: the models with a worker, what each holds and until when it stays."""
    columns = [
        Column("name"),
        Column("state", keep=6),
        Column("device", keep=5),
        Column("rss", keep=7, justify="right"),
        Column("gpu", keep=4, justify="right"),
        Column("in flight", keep=3, justify="right"),
        Column("until", keep=2),  # when keep-alive unloads it, or how long it has been idle
        Column("pid", keep=1),
    ]
    rows = []
    for m in models:
        if m.get("pid") is None:
            continue
        memory = m.get("memory") or {}
        rows.append(
            [
                m["name"], m["state"], m.get("device") or "-", _mb(memory.get("rss_bytes")),
                _mb(memory.get("gpu_bytes")), str(m.get("in_flight", 0)), _until(m), str(m["pid"]),
            ]
        )  # fmt: skip
    return fitted_table("loaded models", columns, rows, width)


def _until(model: dict[str, Any]) -> str:
    """When keep-alive unloads the model if nothing uses it, as `ollama ps` says it."""
    keep, idle = model.get("keep_alive_seconds"), model.get("idle_seconds")
    if model.get("in_flight"):
        return "in use"
    if keep is None:  # the model's own keep-alive: the status does not carry it
        return f"idle {_duration(idle or 0.0)}"
    if keep < 0:
        return "forever"
    left = keep - (idle or 0.0)
    if left <= 0:
        return "now"
    return f"{_duration(left)} from now" if left >= 60 else f"{left:.0f} s from now"


def render_status(body: dict[str, Any], width: int = 120) -> list[Any]:
    """Renderables, in order: a summary line, models, memory, GPUs, jobs (tables fit `width`)."""
    state = "ready" if body.get("ready") else ("draining" if body.get("draining") else "not ready")
    summary = (
        f"modelmora {body.get('version', '?')}: {state}, up {_duration(body.get('uptime_seconds', 0))}, "
        f"{body.get('workers', 0)} worker(s), {body.get('in_flight', 0)} in flight, "
        f"{body.get('queued', 0)} queued"
    )
    parts: list[Any] = [summary]

    parts.append(models_table(body.get("models", []), width))

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


def cluster_table(body: dict[str, Any], width: int) -> Table:
    """`modelmora status --cluster`: one row per replica, its models one per line."""
    columns = [
        Column("replica"),  # `*`: the one that answered
        Column("models", keep=9),
        Column("state", keep=8),
        Column("url", keep=6),
        Column("queued", keep=5, justify="right"),
        Column("in flight", keep=4, justify="right"),
        Column("free memory", keep=7, justify="right"),  # what routing weighs with the queues
        Column("age", keep=3, justify="right"),  # of its heartbeat record
    ]
    rows = []
    for r in body.get("replicas", []):
        state = "draining" if r.get("draining") else ("ready" if r.get("ready") else "not ready")
        memory = r.get("memory") or {}
        free = _mb(memory.get("free_ram_bytes")) if memory.get("budget_ram_bytes") else "no budget"
        rows.append(
            [
                r["id"] + (" *" if r.get("self") else ""), _models_cell(r.get("models") or []), state,
                r.get("advertise_url") or "-", str(r.get("queued", 0)), str(r.get("in_flight", 0)),
                free, f"{r.get('age_seconds', 0.0):.1f} s",
            ]
        )  # fmt: skip
    return fitted_table("replicas", columns, rows, width)


def _models_cell(models: list[dict[str, Any]]) -> str:
    lines = []
    for m in models:
        line = f"{m['name']}: {m['state']}, queue {m.get('queue_depth', 0)}"
        if m.get("in_flight"):
            line += f", {m['in_flight']} in flight"
        lines.append(line)
    return "\n".join(lines) or "-"


def render_cluster(body: dict[str, Any], width: int = 120) -> list[Any]:
    """A summary line, then the replicas' table."""
    count = len(body.get("replicas", []))
    if body.get("enabled"):
        summary = f"cluster: routing on, {count} replica(s); * = {body.get('self', '?')}, which answered"
    else:
        summary = "cluster: routing off (cluster.advertise_url not set), this replica alone"
    return [summary, cluster_table(body, width)]
