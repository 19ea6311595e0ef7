"""Which scope each operation needs, for REST paths and gRPC methods: one table per door.

Closed by default: a path or method missing from these tables needs `admin`, so a route
added without a thought for auth is never open to an `infer` key, let alone to anyone.
"""

from __future__ import annotations

from modelmora.auth.keys import Scope

# Answer without a key: probes, and the API description (static, it holds no data).
OPEN_PREFIXES = ("/health/", "/docs", "/redoc", "/openapi.json")
# The web console's page, files and sign-in (api/console*.py): they hold no data; the page
# reads the API with the session it signs in to, and `/` redirects to it.
CONSOLE_PREFIX = "/ui"
METRICS_PATHS = ("/metrics", "/api/v1/metrics")

# (method or "*", path prefix, scope), first match wins.
_REST: tuple[tuple[str, str, Scope], ...] = (
    ("POST", "/infer/", Scope.INFER),
    ("POST", "/api/v1/infer/", Scope.INFER),  # and .../async: the caller's own job
    ("*", "/api/v1/jobs", Scope.INFER),  # ownership is checked per job by the job service
    ("GET", "/api/v1/results/", Scope.INFER),  # result keys are random and unguessable
    ("GET", "/api/v1/models", Scope.INFER),  # reading the catalog; changing it is admin
    ("GET", "/api/v1/stats", Scope.INFER),  # recent rates and latencies per model (the console)
    ("*", "/v1/", Scope.INFER),  # the OpenAI-compatible routes
)

_GRPC_INFER = frozenset(
    {
        "/modelmora.v1.InferenceService/Infer",
        "/modelmora.v1.InferenceService/InferStream",
        "/modelmora.v1.InferenceService/Generate",
        "/modelmora.v1.InferenceService/InferAsync",
        "/modelmora.v1.InferenceService/GetJobStatus",
        "/modelmora.v1.InferenceService/ListJobs",
        "/modelmora.v1.InferenceService/GetJobResult",
        "/modelmora.v1.InferenceService/CancelJob",
        "/modelmora.v1.RegistryService/ListModels",
        "/modelmora.v1.RegistryService/GetModel",
        "/modelmora.v1.ManagementService/GetStats",
    }
)
# Health checking and reflection, as the REST probes: open.
_GRPC_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def rest_scope(method: str, path: str, metrics_public: bool) -> Scope | None:
    """The scope a REST call needs; None: open to anyone."""
    if path.startswith(OPEN_PREFIXES) or path == "/" or path == CONSOLE_PREFIX or path.startswith("/ui/"):
        return None
    if path in METRICS_PATHS:
        return None if metrics_public else Scope.ADMIN
    for rule_method, prefix, scope in _REST:
        if (rule_method == "*" or rule_method == method) and path.startswith(prefix):
            return scope
    return Scope.ADMIN


def grpc_scope(method: str) -> Scope | None:
    """The scope a gRPC method (`/package.Service/Method`) needs; None: open to anyone."""
    if method.startswith(_GRPC_OPEN_PREFIXES):
        return None
    return Scope.INFER if method in _GRPC_INFER else Scope.ADMIN
