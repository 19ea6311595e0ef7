"""Management of the running server's models: load, unload, warm up, status, health, stats.

One method per management operation of the API contract, called by REST and gRPC (the CLI's
`load`, `unload`, `status` and `health` reach these through a running server). Unlike the
catalog (services/registry.py) these need the server's `ModelManager`. Load, unload and warm
up are admin actions: each leaves one audit line (auth/audit.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from modelmora.auth.audit import audited
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.observability.metrics import current_protocol
from modelmora.observability.stats import DEFAULT_WINDOW
from modelmora.registry.catalog import validate_name
from modelmora.services.inference import InferenceService

StatusSource = Callable[[], Awaitable[dict[str, Any]]]
ClusterSource = Callable[[], Awaitable[dict[str, Any]]]


class ManagementService:
    def __init__(
        self,
        manager: ModelManager,
        inference: InferenceService,
        status: StatusSource,
        cluster: ClusterSource | None = None,
    ) -> None:
        self.manager = manager
        self.inference = inference
        # The status document reads what only the composition root holds (readiness, drain,
        # requests in flight at the edge, job counts), so the root passes its builder in.
        self._status = status
        self._cluster = cluster  # the replicas' view (cluster/membership.py), from the root too

    async def load(self, name: str) -> dict[str, Any]:
        """Load the model now (bounded like a request: INSUFFICIENT_MEMORY past its deadline)."""
        with audited("model.load", name):
            slot = await self.manager.load(validate_name(name))
            return slot.status(self.manager.clock())

    async def unload(self, name: str, force: bool = False) -> dict[str, Any]:
        """End the model's worker; refused with MODEL_LOADED while requests run, unless `force`."""
        with audited("model.unload", name, force=force) as learned:
            name = validate_name(name)
            await asyncio.to_thread(self.manager.store.get, name)  # MODEL_NOT_FOUND for an unknown model
            learned["unloaded"] = unloaded = await self.manager.unload(name, "requested", force=force)
            return {"name": name, "unloaded": unloaded}

    async def warmup(self, name: str) -> dict[str, Any]:
        """Load the model and run its task's sample through the real request path."""
        with audited("model.warmup", name):
            return await self.inference.warmup(name)

    async def status(self) -> dict[str, Any]:
        """Version, uptime, readiness, models, memory, queues, workers, GPUs, jobs.

        `in_flight` leaves out the status request itself: a door (the REST edge, the gRPC
        door) counts every call it serves, this one included, and an idle server should read
        0 in flight, not 1."""
        body = await self._status()
        if current_protocol.get() in ("rest", "grpc") and body.get("in_flight"):
            body["in_flight"] -= 1
        return body

    async def cluster(self) -> dict[str, Any]:
        """The replicas behind this address: each one's models (state, queue, requests in
        flight) and memory, from their heartbeats (docs/api.md, "Cluster view"). Routing off: this
        replica alone, `enabled` false.

        This replica's `in_flight` leaves out the request asking, as in `status()`: its row is
        built now, while the door counts this call (the other rows come from heartbeats)."""
        if self._cluster is None:
            raise ModelMoraError(ErrorCode.INTERNAL_ERROR, "no cluster view in this server")
        body = await self._cluster()
        if current_protocol.get() in ("rest", "grpc"):
            for row in body.get("replicas", ()):
                if row.get("self") and row.get("in_flight"):
                    row["in_flight"] -= 1
        return body

    def stats(self, window: int | None = None) -> dict[str, Any]:
        """Each model's recent figures, one point per few seconds over the last `window`
        seconds (observability/stats.py): request and error rates, p50/p90/p99 latency, the
        mean batch size requests rode in. VALIDATION_ERROR for a window the server does not
        keep."""
        stats = self.manager.metrics.stats
        window = DEFAULT_WINDOW if window is None else window
        try:
            return stats.series(window)
        except ValueError as exc:
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR,
                str(exc),
                {"errors": [{"field": "window", "message": str(exc)}]},
            ) from None

    def health(self) -> dict[str, Any]:
        """Each known model's state, worker, queue and memory."""
        return {"models": self.manager.statuses()}
