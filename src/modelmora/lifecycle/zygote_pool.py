"""The server's side of the zygote (`lifecycle/zygote.py`): start it, fork workers from it,
restart it when it dies, give it up under memory pressure.

`ZygotePool` offers the interface of the warm spare (`spare.WorkerSource`), so the manager
treats both alike; it differs in that a load does not consume it: every load forks a new
worker and the zygote stays. The worker is the server's child (the zygote forks twice and the
server is a child subreaper), watched through a pidfd (`ForkedProcess`), so its exit status is
the kernel's, exact, and the zygote plays no part in it after the fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from modelmora.contracts.runner import EventHandler, ExitHandler
from modelmora.lifecycle.eviction import MB, Need, is_gpu
from modelmora.lifecycle.memory import PLAIN_WORKER_BASE_BYTES
from modelmora.lifecycle.runners import ForkedWorker, ForkFailed, ProcessRunner, worker_env
from modelmora.lifecycle.spare import SparePool, WorkerSource
from modelmora.lifecycle.zygote import HELLO_HEADER, MAX_MESSAGE, PR_SET_CHILD_SUBREAPER, WORKER_TARGET, prctl
from modelmora.tasks.base import SPARE_MODULES

log = logging.getLogger("modelmora.zygote")

# What a worker of each task imports, preloaded by the zygote when the catalog has that task.
# An empty catalog gets SPARE_MODULES (embeddings and text generation), as the spare did.
TASK_MODULES: dict[str, list[str]] = {
    "txt2embed": ["torch", "sentence_transformers", "modelmora.tasks.txt2embed"],
    "txt2txt": ["torch", "transformers", "modelmora.tasks.txt2txt"],
    "img2embed": ["torch", "transformers", "modelmora.tasks.img2embed"],
    "img2txt": ["torch", "transformers", "modelmora.tasks.img2txt"],
    "txt2img": ["torch", "diffusers", "modelmora.tasks.txt2img"],
}
BASE_MODULES = ["modelmora.tasks.fake"]
# Share of the zygote's RSS that a forked worker keeps sharing (not written to) after a load
# and 100 requests: measured 0.78 for MiniLM (bench/lifecycle.py, row (f)); rounded down, so
# that a load's first estimate errs on the side of fitting.
SHARED_FRACTION = 0.75
START_TIMEOUT_SECONDS = 300.0
HELLO_TIMEOUT_SECONDS = 60.0
# A zygote that dies within this long of the previous death is restarted after a backoff.
CRASH_WINDOW_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 60.0


def fork_supported() -> bool:
    """A zygote needs fork, pidfds (Linux >= 5.3) and prctl's child subreaper (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(os, "pidfd_open")


def modules_for(task_type: str, adapter: str | None) -> list[str]:
    if adapter == "fake":
        return list(BASE_MODULES)
    return list(TASK_MODULES.get(task_type, SPARE_MODULES))


def catalog_modules(catalog: Iterable[tuple[str, str | None]]) -> list[str]:
    """What the zygote imports for a catalog of (task_type, adapter): each module once, in order."""
    entries = list(catalog)
    groups = [modules_for(task_type, adapter) for task_type, adapter in entries] or [SPARE_MODULES]
    wanted: list[str] = list(BASE_MODULES)
    for group in groups:
        wanted += [m for m in group if m not in wanted]
    return wanted


_subreaper = False


def become_subreaper() -> None:
    """Make this process adopt its descendants' orphans: the zygote's double fork hands each
    worker to the server this way. Process-wide and permanent (prctl cannot scope it)."""
    global _subreaper
    if not _subreaper:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        _subreaper = True


class ForkedProcess:
    """A child that this process did not spawn itself (it was adopted), with the part of
    `asyncio.subprocess.Process` that the runner uses. Its exit is seen through a pidfd and its
    status read with waitpid: the same figure `returncode` gives for a spawned child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._fd: int | None = os.pidfd_open(pid)
        self._loop.add_reader(self._fd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not ours after all (never adopted): no status to read
            pid, status = self.pid, 255 << 8
        if pid == 0:  # woken before the exit was complete: look again shortly
            self._loop.call_later(0.01, self._reap)
            return
        self.returncode = os.waitstatus_to_exitcode(status)
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if not self._done.done():
            self._done.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def kill(self) -> None:
        if self._fd is not None:  # a pidfd never signals a recycled pid
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)


@dataclass
class _Zygote:
    proc: asyncio.subprocess.Process
    control: socket.socket
    ready: dict[str, Any]
    modules: set[str] = field(default_factory=set)
    started_at: float = 0.0

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


class ZygotePool:
    """One zygote per server. `take` hands out a runner that forks from it; the zygote stays."""

    kind = "zygote"
    label = "zygote"

    def __init__(
        self,
        enabled: bool,
        catalog: Callable[[], Iterable[tuple[str, str | None]]] | None = None,
        modules: Sequence[str] | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        self.enabled = enabled and fork_supported()
        self.fits: Callable[[], bool] = lambda: True
        self.start_timeout = start_timeout
        self._catalog = catalog
        self._modules = list(modules) if modules is not None else None
        self._zygote: _Zygote | None = None
        self._filling: asyncio.Task[None] | None = None
        self._closed = False
        self._retry_after = 0.0
        self._deaths: list[float] = []
        self.restarts = 0  # zygotes started after one died
        self.last_ready: dict[str, Any] = {}

    # -- the spare's interface (spare.WorkerSource) ---------------------------------------------

    @property
    def ready(self) -> bool:
        return self._zygote is not None and self._zygote.alive

    @property
    def pid(self) -> int | None:
        return self._zygote.proc.pid if self._zygote is not None else None

    def rss_bytes(self) -> int:
        return _rss(self.pid) if self.ready else 0

    @property
    def last_rss_bytes(self) -> int:
        """The last zygote's RSS once ready (its size for budget planning); before, an
        estimate for one without torch, or 0 (the manager's estimate of a torch worker)."""
        if "rss_bytes" in self.last_ready:
            return int(self.last_ready["rss_bytes"])
        if self._modules is not None and "torch" not in self._modules:
            return PLAIN_WORKER_BASE_BYTES
        return 0

    def serves(self, task_type: str, adapter: str | None) -> bool:
        return True  # a fork is cheaper than an exec whatever the worker imports

    def consumed_by(self, task_type: str, adapter: str | None) -> bool:
        return False  # the zygote stays: its memory still counts next to the new worker

    def adjust_need(self, need: Need, measured: dict[str, Any] | None) -> Need:
        """A forked worker adds what it does not share with the zygote: its USS when a previous
        forked load measured it on the same kind of device, else its RSS less the zygote's
        pages it is expected to keep sharing."""
        if not self.ready or need.ram_bytes <= 0:
            return need
        if (
            measured
            and measured.get("uss_bytes")
            and is_gpu(str(measured.get("device"))) == is_gpu(need.device)
        ):
            return Need(need.name, int(measured["uss_bytes"]), need.gpu_bytes, need.device)
        shared = int(self.last_rss_bytes * SHARED_FRACTION)
        return Need(need.name, max(need.ram_bytes - shared, need.ram_bytes // 4), need.gpu_bytes, need.device)

    def take(self, name: str, on_event: EventHandler, on_exit: ExitHandler) -> ProcessRunner | None:
        if not self.ready:
            return None
        return ProcessRunner(name, on_event, on_exit, forker=self)

    def fill(self, quiet: bool = False) -> None:
        if not self.enabled or self._closed or self.ready or self._filling is not None:
            return
        if time.monotonic() < self._retry_after:
            return
        if not self.fits():
            if not quiet:
                log.info("zygote not started: the memory budget has no room for it")
            return
        self._filling = asyncio.create_task(self._fill(), name="zygote-fill")

    async def wait_filled(self) -> None:
        if self._filling is not None:
            await asyncio.gather(self._filling, return_exceptions=True)

    async def discard(self) -> int:
        """Give the zygote up (memory pressure): its forked workers go on serving."""
        zygote, self._zygote = self._zygote, None
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filling
            self._filling = None
        if zygote is None:
            return 0
        freed = _rss(zygote.proc.pid)
        await _stop(zygote)
        return freed

    async def close(self) -> None:
        self._closed = True
        await self.discard()

    def status(self) -> dict[str, Any]:
        ready = self.ready
        return {
            "kind": self.kind,
            "ready": ready,
            "pid": self.pid if ready else None,
            "rss_bytes": self.rss_bytes(),
            "start_seconds": round(float(self.last_ready.get("seconds", 0.0)), 3) if ready else None,
            "modules": sorted(self._zygote.modules) if self._zygote is not None else [],
            "restarts": self.restarts,
        }

    # -- forking ---------------------------------------------------------------------------------

    async def fork_worker(
        self, name: str, task_type: str | None = None, adapter: str | None = None, target: str = WORKER_TARGET
    ) -> ForkedWorker:
        """A new worker forked from the zygote, already the server's child; ForkFailed when the
        zygote cannot give one (the runner then starts a fresh process)."""
        zygote = self._zygote
        if zygote is None or not zygote.alive:
            raise ForkFailed("no zygote is ready")
        if task_type is not None:
            self._widen(zygote, modules_for(task_type, adapter))
        parent, child = socket.socketpair()
        try:
            request = json.dumps({"name": name, "target": target}).encode()
            socket.send_fds(zygote.control, [request], [child.fileno()])
        except OSError as exc:
            parent.close()
            raise ForkFailed(f"the zygote did not take the request: {exc}") from exc
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        try:
            header = await asyncio.wait_for(reader.readexactly(HELLO_HEADER.size), HELLO_TIMEOUT_SECONDS)
            hello = json.loads(await reader.readexactly(HELLO_HEADER.unpack(header)[0]))
            process = ForkedProcess(int(hello["pid"]))
        except (asyncio.IncompleteReadError, TimeoutError, OSError, ValueError) as exc:
            writer.close()
            raise ForkFailed(f"the zygote did not start a worker ({type(exc).__name__})") from exc
        return ForkedWorker(process, reader, writer, hello)

    def _widen(self, zygote: _Zygote, needed: list[str]) -> None:
        """The catalog gained a task whose libraries this zygote lacks: this worker imports them
        itself, and a zygote that has them replaces this one in the background."""
        missing = [m for m in needed if m not in zygote.modules]
        if not missing or self._filling is not None or self._closed:
            return
        if not self.fits():
            log.info("zygote not widened: the memory budget has no room for a second one")
            return
        log.info("zygote lacks modules for a task: starting a wider one", extra={"modules": missing})
        modules = [*zygote.ready.get("modules", []), *missing]
        self._filling = asyncio.create_task(self._fill(modules), name="zygote-widen")

    # -- the process -----------------------------------------------------------------------------

    def _wanted(self) -> list[str]:
        if self._modules is not None:
            return list(self._modules)
        entries = list(self._catalog()) if self._catalog is not None else []
        return catalog_modules(entries)

    async def _fill(self, modules: list[str] | None = None) -> None:
        try:
            if modules is None:
                modules = await asyncio.to_thread(self._wanted)
            become_subreaper()
            zygote = await self._start(modules)
        except Exception:
            log.warning("zygote failed to start", exc_info=True)
            self._retry_after = time.monotonic() + CRASH_WINDOW_SECONDS
            return
        finally:
            self._filling = None
        if self._closed:
            await _stop(zygote)
            return
        if zygote.ready["cuda"]:
            # Its forks could not create a CUDA context: start fresh workers from now on.
            log.error("zygote initialised CUDA while importing: workers start fresh", extra=zygote.ready)
            self.enabled = False
            await _stop(zygote)
            await self.discard()
            return
        old, self._zygote = self._zygote, zygote
        self.last_ready = zygote.ready
        asyncio.get_running_loop().create_task(self._watch(zygote), name="zygote-watch")
        log.info(
            "zygote ready",
            extra={
                "pid": zygote.proc.pid,
                "rss_mb": int(zygote.ready["rss_bytes"]) // MB,
                "import_s": round(float(zygote.ready["seconds"]), 2),
                "threads": zygote.ready["threads"],
                "failed": zygote.ready["failed"],
            },
        )
        if zygote.ready["threads"] != 1:
            log.warning("zygote holds threads after its imports: forks may inherit locks", extra=zygote.ready)
        if old is not None:
            await _stop(old)  # replaced by a wider one: its workers go on

    async def _start(self, modules: list[str]) -> _Zygote:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "modelmora.lifecycle.zygote",
                "--fd",
                str(child.fileno()),
                "--modules",
                ",".join(modules),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                # torch.cuda.is_available() from NVML: without it, a library that asks at
                # import initialises the CUDA driver, and no fork could use the GPU.
                env={**worker_env(), "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        zygote = _Zygote(proc, parent, {}, set(modules), time.monotonic())
        try:
            data = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(parent, MAX_MESSAGE), self.start_timeout
            )
            if not data:
                raise RuntimeError(f"the zygote exited while importing (status {await proc.wait()})")
            zygote.ready = json.loads(data)
        except BaseException:
            await _stop(zygote, grace=0)
            raise
        return zygote

    async def _watch(self, zygote: _Zygote) -> None:
        code = await zygote.proc.wait()
        if zygote is not self._zygote or self._closed:
            return  # discarded, replaced or closed on purpose
        self._zygote = None
        zygote.control.close()
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < CRASH_WINDOW_SECONDS] + [now]
        backoff = 0.0 if len(self._deaths) == 1 else min(2.0 ** len(self._deaths), MAX_BACKOFF_SECONDS)
        log.warning("zygote exited: starting another", extra={"status": code, "backoff_s": backoff})
        self.restarts += 1
        self._retry_after = now + backoff
        self.fill()  # at once after a first death; else the reaper's periodic fill retries


async def _stop(zygote: _Zygote, grace: float = 2.0) -> None:
    """EOF on its control socket ends the zygote; kill it when it has not after `grace`."""
    zygote.control.close()
    try:
        await asyncio.wait_for(zygote.proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            zygote.proc.kill()
        await zygote.proc.wait()


def _rss(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def worker_source(
    worker_start: str,
    enabled: bool,
    catalog: Callable[[], Iterable[tuple[str, str | None]]] | None = None,
) -> WorkerSource:
    """The pool `resources.worker_start` asks for (`enabled`: only with worker processes). A
    zygote where the platform cannot fork one falls back to the warm spare."""
    if worker_start == "zygote" and fork_supported():
        return ZygotePool(enabled, catalog)
    return SparePool(enabled and worker_start in ("zygote", "spare"))
