"""The zygote process: it imports torch and the task libraries once, then forks a worker per load.

A fresh worker spends most of its cold start importing torch and sentence-transformers (8-10 s
on a quiet 2-core machine, up to 50 s on a busy one); a fork of a process that already has them
takes milliseconds, and the children share the imported modules' pages copy-on-write.

The server starts the zygote as a fresh process (`python -m modelmora.lifecycle.zygote`, fork
and exec), never as a fork of itself: the server runs grpc and asyncio threads, and a fork of a
threaded process inherits locks that no thread will ever release. The zygote forks only while it
holds a single thread: it starts none, and the BLAS pools that numpy and scipy start at import
are shut down by their own fork handlers during one throwaway fork before the zygote says ready.
It never touches CUDA either (a CUDA context does not survive a fork): each worker creates its
own after its fork, when it loads a model.

Supervision: each worker is forked twice (zygote -> middle -> worker) and the middle process
exits at once, so that the worker is adopted by the server, which marks itself a child
subreaper first (`zygote_pool.become_subreaper`). The server is then the worker's real parent:
it waits on it through a pidfd and reads its exit status from the kernel, exactly as for a
worker it started itself, and a worker does not depend on the zygote once forked (a zygote that
dies takes no worker with it, and leaves none without a parent that supervises it).

The protocol, over a SOCK_SEQPACKET socketpair (one datagram per message):
  zygote -> server, once: JSON `Ready` (pid, rss_bytes, seconds, modules, failed, threads, cuda)
  server -> zygote, per worker: JSON {"name", "target"} with the worker's end of its own
      socketpair attached (SCM_RIGHTS); the zygote closes its copy once the worker is forked
  EOF from the server: the zygote exits (so it never outlives its server).
The worker's first bytes on its own socket are a hello (4-byte big-endian length, then JSON:
pid, the threads it found at its start, the kernel's task count), sent once the server has
adopted it; then the worker channel (`contracts/channel.py`) as in any worker.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

log = logging.getLogger("modelmora.zygote")

WORKER_TARGET = "modelmora.lifecycle.zygote:run_worker"
HELLO_HEADER = struct.Struct("!I")
MAX_MESSAGE = 1 << 16
# Linux prctl(2) options.
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Exit status of a worker that found no server to adopt it (it never said hello).
EX_NOT_ADOPTED = 70
ADOPTION_TIMEOUT_SECONDS = 30.0


def prctl(option: int, arg: int | bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}) failed: {os.strerror(errno)}")


def task_count() -> int:
    """Threads of this process as the kernel sees them (native ones included)."""
    return len(os.listdir("/proc/self/task"))


def preload(modules: list[str]) -> list[str]:
    """Import `modules`; the names that failed (the worker imports what it needs anyway)."""
    failed = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:
            log.warning("zygote could not import a module", extra={"module": module}, exc_info=True)
            failed.append(module)
    return failed


def quiesce() -> bool:
    """End the threads that libraries started at import: one fork runs every fork handler
    (OpenBLAS shuts its pool down before a fork and starts it again only when next used).
    True when that child could not have used CUDA: an import initialised the CUDA driver
    (torch then marks every fork "bad"; the server sets PYTORCH_NVML_BASED_CUDA_CHECK=1 so that
    `torch.cuda.is_available()` at import does not)."""
    pid = os.fork()
    if pid == 0:
        os._exit(1 if _in_bad_fork() else 0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0


def _in_bad_fork() -> bool:
    torch: Any = sys.modules.get("torch")
    return bool(torch is not None and (torch.cuda.is_initialized() or torch.cuda._is_in_bad_fork()))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(control: socket.socket, server_pid: int) -> None:
    """Fork a worker per request until the server closes the control socket."""
    while True:
        data, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, 4)
        if not data:
            return
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            continue
        try:
            request = json.loads(data)
            fork_worker(
                fds[0], str(request["name"]), str(request.get("target") or WORKER_TARGET), control, server_pid
            )
        except Exception:
            # The worker's socket closes below: the server sees EOF instead of a hello.
            log.exception("zygote could not fork a worker")
        finally:
            os.close(fds[0])


def fork_worker(fd: int, name: str, target: str, control: socket.socket, server_pid: int) -> None:
    gc.freeze()  # what the zygote allocated since: out of the children's collections too
    middle = os.fork()
    if middle == 0:
        code = 1
        try:
            middle = os.getpid()  # read before the fork: the child may outlive it at once
            if os.fork() == 0:
                become_worker(fd, name, target, control, server_pid, middle)
            code = 0
        finally:
            os._exit(code)
    os.waitpid(middle, 0)


def become_worker(
    fd: int, name: str, target: str, control: socket.socket, server_pid: int, middle: int
) -> None:
    """In the forked child: wait to be adopted by the server, say hello, run `target`."""
    code = 1
    try:
        control.close()
        deadline = time.monotonic() + ADOPTION_TIMEOUT_SECONDS
        while os.getppid() == middle and time.monotonic() < deadline:
            time.sleep(0.0005)  # the middle process exits right after its fork
        # Dies with the server even if a batch blocks the channel reader (no orphan worker).
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server_pid:
            code = EX_NOT_ADOPTED  # nobody would read its exit status: never start
            return
        with contextlib.suppress(OSError):
            prctl(PR_SET_NAME, b"modelmora-wrk")
        gc.enable()
        numpy: Any = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()  # numpy's global generator was copied: give each worker its own
        hello = {
            "pid": os.getpid(),
            "threads": [t.name for t in threading.enumerate()],
            "tasks": task_count(),
        }
        body = json.dumps(hello).encode()
        os.write(fd, HELLO_HEADER.pack(len(body)) + body)
        module, _, func = target.partition(":")
        getattr(importlib.import_module(module), func)(fd, name)
        code = 0
    except BaseException:
        log.exception("forked worker failed to start", extra={"model": name})
    finally:
        os._exit(code)


def run_worker(fd: int, name: str) -> None:
    """The default target: the same worker main as a fresh worker process runs."""
    from modelmora.lifecycle.worker import main as worker_main

    worker_main(["--fd", str(fd), "--name", name])


def main(argv: list[str] | None = None) -> None:
    gc.disable()  # no collection may leave holes in pages the children will share
    parser = argparse.ArgumentParser(prog="modelmora-zygote")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--modules", default="")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server ends us in order
    server_pid = os.getppid()
    from modelmora.observability.logging import configure_logging

    configure_logging(os.environ.get("MODELMORA_WORKER_LOG_LEVEL", "warning"), "auto")
    control = socket.socket(fileno=args.fd)
    started = time.perf_counter()
    modules = [m for m in args.modules.split(",") if m]
    failed = preload(["modelmora.lifecycle.worker", *modules])
    cuda = quiesce()
    gc.freeze()
    ready = {
        "pid": os.getpid(),
        "rss_bytes": _rss_bytes(),
        "seconds": time.perf_counter() - started,
        "modules": modules,
        "failed": failed,
        "threads": task_count(),
        "cuda": cuda,
    }
    try:
        control.sendall(json.dumps(ready).encode())
        serve(control, server_pid)
    except OSError:
        pass
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
