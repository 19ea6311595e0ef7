"""Where a request for a model goes: a pure function of the replicas' records.

Every replica ranks the holders of a model the same way (rendezvous hashing of model and
replica id), so all of them send a model's requests to the same copy: at low load each model
ends up loaded once in the cluster, and a duplicate loaded in a race goes idle and leaves with
keep-alive. A holder whose queue for the model has reached `saturation` is passed over; when
every holder is full, the request is served where it arrived, which loads another copy:
copies grow with demand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from modelmora.cluster.view import HOLDING_STATES, ModelPresence, ReplicaInfo


def rank(model: str, replica_id: str) -> int:
    """Rendezvous (highest random weight) score: stable across processes and machines."""
    digest = hashlib.blake2b(f"{model}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def has_room(presence: ModelPresence | None, saturation: int) -> bool:
    return presence is not None and presence.state in HOLDING_STATES and presence.queue_depth < saturation


def choose(
    model: str,
    self_id: str,
    local: ModelPresence | None,
    peers: Iterable[ReplicaInfo],
    saturation: int,
) -> ReplicaInfo | None:
    """The peer to forward to, or None to serve here. `local`: this replica's own presence
    for the model (None when it does not hold it); `peers`: the others' live records."""
    best_peer: ReplicaInfo | None = None
    best = rank(model, self_id) if has_room(local, saturation) else -1
    for peer in peers:
        if peer.id == self_id or not peer.ready or peer.draining or not peer.advertise_url:
            continue
        if not has_room(peer.model(model), saturation):
            continue
        score = rank(model, peer.id)
        if score > best:
            best, best_peer = score, peer
    return best_peer
