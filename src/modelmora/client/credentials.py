"""Who the SDK says it is and how it checks whom it talks to: API key and TLS options.

The API key comes from `api_key=` or, when that is not given, from MODELMORA_API_KEY, and
travels as `Authorization: Bearer <key>` (REST) or `authorization` metadata (gRPC). TLS
verifies the server by default: against the system's (REST: certifi's) CAs, or `ca_certs`.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

API_KEY_ENV = "MODELMORA_API_KEY"
PathLike = str | Path

_SCHEMES = {"https://": True, "grpcs://": True, "http://": False, "grpc://": False}


def resolve_api_key(api_key: str | None) -> str | None:
    """`api_key`, else MODELMORA_API_KEY; "" turns the environment's key off."""
    if api_key is not None:
        return api_key or None
    return os.environ.get(API_KEY_ENV) or None


def bearer(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def rest_verify(
    verify: bool | PathLike | ssl.SSLContext,
    ca_certs: PathLike | None,
    client_cert: PathLike | None,
    client_key: PathLike | None,
) -> bool | ssl.SSLContext:
    """httpx's `verify=`: True (its default: certifi's CAs), False (no check: tests only), or
    an SSLContext trusting `ca_certs` (or a path given as `verify`) and presenting a client
    certificate for mTLS."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if not isinstance(verify, bool):
        ca_certs, verify = verify, True
    if ca_certs is None and client_cert is None:
        return verify
    if ca_certs is None:
        import certifi

        ca_certs = certifi.where()
    context = ssl.create_default_context(cafile=str(ca_certs))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key) if client_key is not None else None)
    return context


def grpc_target(
    target: str, tls: bool | None, ca_certs: PathLike | None, client_cert: PathLike | None
) -> tuple[str, bool]:
    """("host:port", secure): `https://` or `grpcs://` mean TLS, `http://` or `grpc://` not;
    a bare target uses TLS when asked (`tls=True`) or when a CA or client certificate is given."""
    for scheme, secure in _SCHEMES.items():
        if target.startswith(scheme):
            return target[len(scheme) :].rstrip("/"), secure if tls is None else tls
    if tls is None:
        tls = ca_certs is not None or client_cert is not None
    return target, tls


def grpc_credentials(
    ca_certs: PathLike | None, client_cert: PathLike | None, client_key: PathLike | None
) -> grpc.ChannelCredentials:
    """grpc.ssl_channel_credentials: the system's roots unless `ca_certs`, and the client's
    certificate and key for mTLS."""
    import grpc

    def read(path: PathLike | None) -> bytes | None:
        return Path(path).read_bytes() if path is not None else None

    if (client_cert is None) != (client_key is None):
        raise ValueError("mTLS needs both client_cert and client_key")
    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_certs), private_key=read(client_key), certificate_chain=read(client_cert)
    )
