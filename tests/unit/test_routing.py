"""Where a request goes (cluster/routing.py) and what the hop carries (cluster/hop.py)."""

from __future__ import annotations

import pytest

from modelmora.auth.keys import ANONYMOUS, Principal, Scope
from modelmora.cluster.hop import CLUSTER_KEY, PRINCIPAL, decode_principal, encode_principal, verify_hop
from modelmora.cluster.routing import choose, rank
from modelmora.cluster.view import ModelPresence, ReplicaInfo, view_document
from modelmora.errors import ErrorCode, ModelMoraError

SAT = 4


def replica(rid: str, *models: ModelPresence, ready: bool = True, draining: bool = False) -> ReplicaInfo:
    return ReplicaInfo(
        id=rid,
        advertise_url=f"http://{rid}:8000",
        heartbeat_at=0.0,
        ready=ready,
        draining=draining,
        models=models,
    )


def held(name: str = "m", state: str = "ready", queue: int = 0) -> ModelPresence:
    return ModelPresence(name=name, state=state, queue_depth=queue)


def test_no_holder_anywhere_is_served_here() -> None:
    assert choose("m", "a", None, [replica("b"), replica("c", held("other"))], SAT) is None


def test_the_only_holder_gets_the_request() -> None:
    peer = replica("b", held())
    assert choose("m", "a", None, [peer, replica("c")], SAT) is peer


def test_a_loading_holder_counts_a_failed_one_does_not() -> None:
    loading = replica("b", held(state="loading"))
    assert choose("m", "a", None, [loading], SAT) is loading
    assert choose("m", "a", None, [replica("b", held(state="failed"))], SAT) is None


def test_a_full_holder_is_passed_over_and_with_all_full_the_request_stays() -> None:
    full, free = replica("b", held(queue=SAT)), replica("c", held(queue=SAT - 1))
    assert choose("m", "a", None, [full, free], SAT) is free
    assert choose("m", "a", None, [full], SAT) is None


def test_draining_or_unready_replicas_get_nothing() -> None:
    assert choose("m", "a", None, [replica("b", held(), draining=True)], SAT) is None
    assert choose("m", "a", None, [replica("b", held(), ready=False)], SAT) is None


def test_every_replica_picks_the_same_copy_among_several() -> None:
    """Rendezvous ranking: each model's traffic converges on one copy wherever it arrives, so
    a duplicate loaded in a race goes idle (and leaves with keep-alive)."""
    ids = ["r1", "r2", "r3"]
    for model in ("alpha", "beta", "gamma", "delta"):
        winner = max(ids, key=lambda rid: rank(model, rid))
        for here in ids:
            peers = [replica(rid, held(model)) for rid in ids if rid != here]
            picked = choose(model, here, held(model), peers, SAT)
            assert (picked.id if picked is not None else here) == winner


def test_models_spread_over_replicas() -> None:
    winners = {max(["r1", "r2", "r3"], key=lambda rid: rank(f"model-{i}", rid)) for i in range(30)}
    assert winners == {"r1", "r2", "r3"}


def test_view_document_marks_self_and_ages() -> None:
    me = ReplicaInfo(id="a", advertise_url=None, heartbeat_at=100.0, models=(held(),))
    other = ReplicaInfo(id="b", advertise_url="http://b:1", heartbeat_at=98.5)
    doc = view_document("a", True, [other, me], now=100.25)
    assert [r["id"] for r in doc["replicas"]] == ["a", "b"]
    assert doc["replicas"][0]["self"] and not doc["replicas"][1]["self"]
    assert doc["replicas"][1]["age_seconds"] == 1.75
    assert doc["replicas"][0]["models"][0] == {
        "name": "m",
        "state": "ready",
        "version": None,
        "queue_depth": 0,
        "in_flight": 0,
        "device": None,
    }
    assert ReplicaInfo.from_dict(me.to_dict()) == me


# -- the hop's credentials ----------------------------------------------------------------------

SECRET = "s" * 32


def test_the_carried_caller_round_trips() -> None:
    caller = Principal("k123", "ci", frozenset({Scope.INFER}))
    assert decode_principal(encode_principal(caller)) == caller
    assert decode_principal(encode_principal(ANONYMOUS)) == ANONYMOUS


@pytest.mark.parametrize("raw", [b"", b"!!!", b"e30=", b"x" * 5000, encode_principal(ANONYMOUS)[:-4]])
def test_a_malformed_carried_caller_is_unauthorized(raw: bytes) -> None:
    with pytest.raises(ModelMoraError) as err:
        decode_principal(raw)
    assert err.value.code is ErrorCode.UNAUTHORIZED


def test_a_hop_needs_the_cluster_credential() -> None:
    caller = Principal("k1", "ci", frozenset({Scope.INFER}))
    good = {CLUSTER_KEY: SECRET.encode(), PRINCIPAL: encode_principal(caller)}
    assert verify_hop(good, SECRET, auth_on=True) == caller
    for headers in ({PRINCIPAL: good[PRINCIPAL]}, {**good, CLUSTER_KEY: b"t" * 32}):
        with pytest.raises(ModelMoraError) as err:
            verify_hop(headers, SECRET, auth_on=True)
        assert err.value.code is ErrorCode.UNAUTHORIZED
    with pytest.raises(ModelMoraError, match=r"no cluster\.secret"):  # auth on, no secret: refused
        verify_hop(good, None, auth_on=True)
    with pytest.raises(ModelMoraError, match="without its caller"):
        verify_hop({CLUSTER_KEY: SECRET.encode()}, SECRET, auth_on=True)
    assert verify_hop({}, None, auth_on=False) is None  # auth off: nothing to carry
