"""The Python SDK: the same typed methods over REST (`Client`, `AsyncClient`) and gRPC
(`GrpcClient`, `AsyncGrpcClient`). See docs/sdk.md.

    from modelmora.client import Client
    with Client("http://127.0.0.1:8000") as mm:
        vectors = mm.embed("all-MiniLM-L6-v2", ["first", "second"], normalize=True)
"""

from modelmora.client.errors import (
    ApiError,
    AuthError,
    CancelledError,
    ConflictError,
    DeadlineError,
    InferenceError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    TransportError,
    UnavailableError,
)
from modelmora.client.grpc_client import AsyncGrpcClient, GrpcClient
from modelmora.client.rest_client import AsyncClient, Client
from modelmora.client.retry import NO_RETRY, RetryPolicy

__all__ = [
    "NO_RETRY",
    "ApiError",
    "AsyncClient",
    "AsyncGrpcClient",
    "AuthError",
    "CancelledError",
    "Client",
    "ConflictError",
    "DeadlineError",
    "GrpcClient",
    "InferenceError",
    "InvalidRequestError",
    "NotFoundError",
    "OverloadedError",
    "RetryPolicy",
    "TransportError",
    "UnavailableError",
]
