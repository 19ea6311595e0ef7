"""The hop's headers: who forwarded, the cluster credential, and the caller it acts for.

The receiving door (api/edge.py) trusts the carried caller only when the cluster credential
is right; the forwarding replica has already checked the caller's key and counted its rate
limit, so the receiver checks the scope again but counts nothing. A forwarded request is
never forwarded again (`forwarded_from`): at most one hop, even when two replicas each think
the other holds the model.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from contextvars import ContextVar

import orjson

from modelmora.auth.keys import Principal, Scope
from modelmora.errors import ErrorCode, ModelMoraError

HOP = b"x-modelmora-hop"  # the id of the replica that forwarded the request
CLUSTER_KEY = b"x-modelmora-cluster-key"
PRINCIPAL = b"x-modelmora-principal"
HOP_HEADERS = (HOP, CLUSTER_KEY, PRINCIPAL)
MAX_PRINCIPAL_BYTES = 4096

# Set by the door for a request that came over the hop: the forwarding replica's id.
forwarded_from: ContextVar[str | None] = ContextVar("modelmora_forwarded_from", default=None)


def encode_principal(principal: Principal) -> bytes:
    data = {"k": principal.key_id, "n": principal.name, "s": sorted(s.value for s in principal.scopes)}
    return base64.urlsafe_b64encode(orjson.dumps(data))


def decode_principal(raw: bytes) -> Principal:
    try:
        if len(raw) > MAX_PRINCIPAL_BYTES:
            raise ValueError("too long")
        data = orjson.loads(base64.urlsafe_b64decode(raw))
        key_id, name, scopes = data["k"], data["n"], data["s"]
        if not (key_id is None or isinstance(key_id, str)) or not isinstance(name, str):
            raise ValueError("bad types")
        return Principal(key_id, name, frozenset(Scope(s) for s in scopes))
    except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise ModelMoraError(ErrorCode.UNAUTHORIZED, "malformed forwarded caller") from None


def verify_hop(headers: dict[bytes, bytes], secret: str | None, auth_on: bool) -> Principal | None:
    """The caller a forwarded request acts for (None with auth off: no caller to carry).
    UNAUTHORIZED unless the cluster credential matches; a replica without one accepts
    forwarded requests only while authentication is off."""
    if secret is not None:
        given = headers.get(CLUSTER_KEY, b"")
        if not hmac.compare_digest(given, secret.encode()):
            raise ModelMoraError(ErrorCode.UNAUTHORIZED, "forwarded request without the cluster credential")
    elif auth_on:
        raise ModelMoraError(
            ErrorCode.UNAUTHORIZED, "this replica accepts no forwarded requests (no cluster.secret)"
        )
    if not auth_on:
        return None
    raw = headers.get(PRINCIPAL)
    if raw is None:
        raise ModelMoraError(ErrorCode.UNAUTHORIZED, "forwarded request without its caller")
    return decode_principal(raw)
