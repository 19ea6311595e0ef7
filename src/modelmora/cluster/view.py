"""What one replica tells the others about itself: the record it heartbeats into Redis, and
the cluster view (`GET /api/v1/cluster`) built from those records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# States in which a replica counts as holding a model: a request sent there is served
# without loading (ready), or after a load already under way (loading).
HOLDING_STATES = frozenset({"ready", "loading"})


@dataclass(frozen=True, slots=True)
class ModelPresence:
    name: str
    state: str
    version: str | None = None
    queue_depth: int = 0  # requests waiting for this model on that replica
    in_flight: int = 0  # requests holding the model there (queued or running)
    device: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    id: str
    advertise_url: str | None
    heartbeat_at: float  # wall-clock seconds (time.time()) of the record
    grpc_url: str | None = None
    version: str = ""
    started_at: float = 0.0
    ready: bool = True
    draining: bool = False
    in_flight: int = 0
    queued: int = 0
    memory: dict[str, int] = field(default_factory=dict)
    models: tuple[ModelPresence, ...] = ()

    def model(self, name: str) -> ModelPresence | None:
        for presence in self.models:
            if presence.name == name:
                return presence
        return None

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["models"] = [asdict(m) for m in self.models]
        return body

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplicaInfo:
        """A record another replica wrote (a mismatch raises: the reader skips that record)."""
        models = tuple(ModelPresence(**m) for m in data.get("models", ()))
        memory = {str(k): int(v) for k, v in (data.get("memory") or {}).items()}
        return cls(**{**data, "models": models, "memory": memory})


def view_document(self_id: str, enabled: bool, replicas: list[ReplicaInfo], now: float) -> dict[str, Any]:
    """The cluster view every door returns: each replica with the age of its record."""
    rows = []
    for info in sorted(replicas, key=lambda r: r.id):
        row = info.to_dict()
        row["age_seconds"] = round(max(0.0, now - info.heartbeat_at), 3)
        row["self"] = info.id == self_id
        rows.append(row)
    return {"enabled": enabled, "self": self_id, "replicas": rows}
