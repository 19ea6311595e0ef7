"""One typed Settings object: defaults < YAML file < MODELMORA_* environment < CLI flags.

Nothing here reads the environment at import time: `load_settings` is called once by the CLI
(or a test) and the result is passed to whatever needs it.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from modelmora.contracts.tasks import TaskType

DEFAULT_CONFIG_FILE = "modelmora.yaml"


class ConfigurationError(RuntimeError):
    """Settings that each parse but do not work together: the server refuses to start."""


def _drop_empty_sections(model: type[BaseModel], data: Any) -> Any:
    """A YAML section whose keys are all commented out (`registry:` alone, as `modelmora init`
    writes it) reads as null: take it as an empty section, not as an error."""
    if not isinstance(data, dict):
        return data
    sections = {
        name
        for name, info in model.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
    }
    return {k: v for k, v in data.items() if not (v is None and k in sections)}


class _Section(BaseModel):
    # A misspelt key (`server.prot`) is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        return _drop_empty_sections(cls, data)


class TlsSettings(_Section):
    """TLS on both doors (uvicorn's ssl options, grpc.ssl_server_credentials); off without a
    certificate. `client_auth` asks for client certificates (mTLS), checked against ca_certs."""

    certfile: Path | None = None  # PEM: the server's certificate (chain)
    keyfile: Path | None = None  # PEM: its private key
    keyfile_password: SecretStr | None = None  # REST only: grpc takes unencrypted keys
    ca_certs: Path | None = None  # PEM: the CAs client certificates are checked against
    client_auth: Literal["none", "optional", "required"] = "none"

    @property
    def enabled(self) -> bool:
        return self.certfile is not None

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("server.tls needs both certfile and keyfile")
        if self.client_auth != "none" and (self.certfile is None or self.ca_certs is None):
            raise ValueError("server.tls.client_auth needs certfile, keyfile and ca_certs")
        # Not checked for existence here: a client loading the server's file has none of them.
        for name in ("certfile", "keyfile", "ca_certs"):
            path: Path | None = getattr(self, name)
            if path is not None:
                setattr(self, name, path.expanduser().absolute())
        return self


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    rest_enabled: bool = True
    grpc_port: int = Field(50051, ge=0, le=65535)  # 0: any free port (logged at start)
    grpc_enabled: bool = True
    grpc_max_receive_message_bytes: int = Field(64 << 20, ge=1024)
    grpc_max_send_message_bytes: int = Field(64 << 20, ge=1024)
    grpc_result_chunk_bytes: int = Field(1 << 20, ge=1024)  # GetJobResult chunks when none asked
    data_dir: Path = Path("~/.modelmora")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console", "auto"] = "auto"
    drain_seconds: float = Field(30.0, ge=0)
    # -- connection limits (issue 14; docs/security.md "Limits"): the head's are enforced by
    # api/http_protocol.py, the body's by the ASGI edge (api/edge.py).
    header_timeout_seconds: float = Field(10.0, gt=0)  # connect (or first byte) to end of headers
    body_timeout_seconds: float = Field(30.0, gt=0)  # longest wait for the next body chunk
    body_deadline_seconds: float = Field(300.0, gt=0)  # the whole body, from the end of headers
    keep_alive_timeout_seconds: float = Field(5.0, gt=0)  # idle between requests on one connection
    max_header_bytes: int = Field(64 << 10, ge=1024)  # request line and headers
    # -- TLS on REST and gRPC (issue 14; docs/security.md "TLS")
    tls: TlsSettings = Field(default_factory=TlsSettings)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _expand(self) -> ServerSettings:
        self.data_dir = self.data_dir.expanduser().absolute()
        if not (self.rest_enabled or self.grpc_enabled):
            raise ValueError("rest_enabled and grpc_enabled are both false: nothing would be served")
        if self.grpc_result_chunk_bytes > self.grpc_max_send_message_bytes - 1024:
            raise ValueError("grpc_result_chunk_bytes must leave 1 KiB under grpc_max_send_message_bytes")
        return self


SourceScheme = Literal["hub", "file", "local", "http", "https", "s3"]
DEFAULT_SCHEMES: tuple[SourceScheme, ...] = ("hub", "https", "file", "s3")


class AllowedSourcesSettings(_Section):
    """Where an install through the API may take a model's files from (registry/policy.py)."""

    # "local" is another name for "file". Plain http is off: anyone on the path can swap bytes.
    schemes: list[SourceScheme] = Field(default_factory=lambda: list(DEFAULT_SCHEMES))
    # URL hosts (http/https), exact or "*.example.org" (any subdomain); empty: any host whose
    # every address is public. Checked again on every redirect.
    hosts: list[str] = Field(default_factory=list)
    # Hosts (same patterns) or networks ("10.1.0.0/16") a URL may reach although they resolve
    # to a loopback, private, link-local or otherwise non-public address.
    private_hosts: list[str] = Field(default_factory=list)
    # Folders a local source must lie under once every symlink is resolved; empty: none.
    local_roots: list[Path] = Field(default_factory=list)
    # s3:// buckets (read with the server's own credentials); empty: none.
    s3_buckets: list[str] = Field(default_factory=list)
    # The CLI run on the server machine is trusted (it reads the files anyway); true: it obeys
    # these rules and `testing.*` as the API does.
    enforce_on_cli: bool = False

    @field_validator("local_roots", mode="after")
    @classmethod
    def _absolute(cls, roots: list[Path]) -> list[Path]:
        for root in roots:
            if not root.expanduser().is_absolute():
                raise ValueError(f"registry.allowed_sources.local_roots: {root} is not an absolute path")
        return [root.expanduser() for root in roots]

    @field_validator("private_hosts", mode="after")
    @classmethod
    def _networks_parse(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError as exc:
                    raise ValueError(f"registry.allowed_sources.private_hosts: {exc}") from None
        return entries


class RegistrySettings(_Section):
    database_url: str | None = None
    cache_dir: Path | None = None
    hub_endpoint: str | None = None
    hub_token: str | None = None
    # s3:// sources; None: boto3's AWS_ENDPOINT_URL(_S3) or AWS itself.
    s3_endpoint_url: str | None = None
    # -- bounded resources (issue 14): what one archive source may expand to.
    max_archive_bytes: int = Field(64 << 30, ge=1)
    max_archive_files: int = Field(10_000, ge=1)
    # -- install sources (issue 14; docs/security.md "Install sources"): what an install
    # through the API (REST, gRPC) may fetch; the CLI too with `enforce_on_cli`.
    allowed_sources: AllowedSourcesSettings = Field(default_factory=AllowedSourcesSettings)  # type: ignore[arg-type]
    # -- replicas that share (issue 15; docs/operations.md "Running several replicas"):
    # where every installed version's files go once, for the other replicas to fetch on their
    # first load: "s3://bucket/prefix" (endpoint: s3_endpoint_url) or a shared directory.
    # None: the files stay on the node that installed them (one node, as before).
    model_store: str | None = None
    # How often a replica reads the catalog version (the safety net under PostgreSQL
    # LISTEN/NOTIFY, and the only way with SQLite).
    catalog_poll_seconds: float = Field(0.5, gt=0, le=60)


WorkerStart = Literal["zygote", "spare", "fresh"]


def default_worker_start() -> WorkerStart:
    """The zygote needs fork, pidfds and prctl: Linux. Elsewhere the warm spare."""
    return "zygote" if sys.platform.startswith("linux") and hasattr(os, "fork") else "spare"


class ResourcesSettings(_Section):
    max_memory_mb: int | None = Field(None, ge=1)
    gpu_memory_mb: int | None = Field(None, ge=1)
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    # How a worker starts: forked from the zygote, the warm spare, or a fresh process.
    # None: from the deprecated `warm_spare` when it is set, else the platform's default.
    worker_start: WorkerStart | None = None
    warm_spare: bool | None = None  # deprecated: true means "spare", false "fresh"
    default_device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    default_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # -- worker bounds (issue 14; docs/security.md "Worker bounds"): an idle worker whose RSS
    # stays above its high-water mark after a request is restarted (unloaded, loaded again on
    # the next demand). The mark is `worker_rss_high_water_mb` when set, else
    # `worker_rss_growth_factor` times the RSS the worker had right after its load (and at
    # least 512 MiB above it); both None: never.
    worker_rss_high_water_mb: int | None = Field(None, ge=1)
    worker_rss_growth_factor: float | None = Field(3.0, gt=1)

    @model_validator(mode="after")
    def _resolve_worker_start(self) -> ResourcesSettings:
        if self.worker_start is None:
            if self.warm_spare is None:
                self.worker_start = default_worker_start()
            else:
                warnings.warn(
                    "resources.warm_spare is deprecated: use resources.worker_start "
                    f"({'spare' if self.warm_spare else 'fresh'})",
                    FutureWarning,
                    stacklevel=2,
                )
                self.worker_start = "spare" if self.warm_spare else "fresh"
        return self


class LifecycleSettings(_Section):
    keep_alive_seconds: float = 300.0
    preload: list[str] = Field(default_factory=list)
    load_retries: int = Field(3, ge=0)
    load_backoff_seconds: float = Field(1.0, ge=0)
    health_check: bool = True
    unload_grace_seconds: float = Field(5.0, ge=0)
    load_timeout_seconds: float = Field(300.0, gt=0)


class SchedulerSettings(_Section):
    max_batch_size: int = Field(32, ge=1)
    max_wait_ms: float = Field(0.0, ge=0)
    queue_size: int = Field(10_000, ge=1)
    queue_size_per_model: int = Field(2_000, ge=1)
    critical_reserve: int = Field(64, ge=0)
    aging_seconds: float = Field(10.0, gt=0)
    # Per task, overriding the task's own default (its spec's, in tasks/specs.py); a task not
    # named keeps its default. A key that is no task type is an error, like a misspelt setting.
    default_timeout_seconds: dict[TaskType, float] = Field(default_factory=dict)


class JobsSettings(_Section):
    backend: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("modelmora:", min_length=1, max_length=64)
    max_pending: int = Field(10_000, ge=1)
    queued_ttl_seconds: float = Field(24 * 3600, gt=0)
    result_ttl_seconds: float = Field(24 * 3600, gt=0)
    # Jobs one replica runs at once (each model also stops at one batch: its max_batch_size).
    max_running: int = Field(256, ge=1)
    # Runs of one job that ended with its worker dying before the job is failed.
    max_attempts: int = Field(3, ge=1)
    # Redis: a replica silent this long has its jobs taken over by another (renewed every
    # poll_seconds, so 10 s is 20 missed renewals).
    lease_seconds: float = Field(10.0, gt=0)
    poll_seconds: float = Field(0.5, gt=0)
    expiry_interval_seconds: float = Field(60.0, gt=0)
    # -- fair claiming (issue 15): a job claimed but not started (its model still loading
    # here) this long goes back to the queue when another replica has nothing to do.
    release_after_seconds: float = Field(2.0, gt=0)


class S3Settings(_Section):
    endpoint_url: str | None = None
    bucket: str | None = None
    prefix: str = "modelmora/"
    presign_seconds: int = Field(3600, ge=1)


class ResultsSettings(_Section):
    backend: Literal["files", "s3"] = "files"
    inline_max_bytes: int = Field(1 << 20, ge=0)
    s3: S3Settings = Field(default_factory=S3Settings)  # type: ignore[arg-type]
    # -- replicas that share (issue 15): whether every replica reads the results any replica
    # wrote. None: true for s3, false for files (say true when the directory is shared).
    # Several replicas (jobs.backend redis) refuse to start with results not shared.
    shared: bool | None = None

    @property
    def is_shared(self) -> bool:
        return self.shared if self.shared is not None else self.backend == "s3"


class LimitsSettings(_Section):
    max_request_bytes: int = Field(16 << 20, ge=1)
    max_items: int = Field(256, ge=1)
    max_text_chars: int = Field(100_000, ge=1)
    max_image_bytes: int = Field(20 << 20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    allowed_image_url_hosts: list[str] = Field(default_factory=list)
    # -- bounded resources at the edge (issue 14; docs/security.md "Limits").
    max_multipart_parts: int = Field(300, ge=2)  # parts of one multipart/form-data body
    max_buffered_bytes: int = Field(128 << 20, ge=1)  # request bodies held at once, all connections
    # -- worker bounds (issue 14; docs/security.md "Worker bounds"): the bytes one request's
    # images may take once decoded (width x height x bytes per pixel, at least 3 for the RGB
    # conversion), read from each header before anything is decoded; checked by the server
    # and again by the worker.
    max_decoded_image_bytes_per_request: int = Field(64 << 20, ge=1)

    @model_validator(mode="after")
    def _buffer_fits_a_request(self) -> LimitsSettings:
        if self.max_buffered_bytes < self.max_request_bytes:
            raise ValueError("max_buffered_bytes must be at least max_request_bytes")
        return self


class AuthSettings(_Section):
    # "auto": off on a loopback bind (the first run and curl need no key), on for any other.
    enabled: bool | Literal["auto"] = "auto"
    # A non-loopback bind with auth off refuses to start unless this says it is meant.
    allow_unauthenticated: bool = False
    # An admin key taken from the environment (MODELMORA_AUTH__BOOTSTRAP_KEY, e.g. a Kubernetes
    # Secret) so a first start can create the real keys; at least 32 characters.
    bootstrap_key: SecretStr | None = None
    metrics_public: bool = True  # /metrics without a key (scrapers inside the cluster)
    # How long a verified key is trusted without a database read: the delay before a
    # revocation or an expiry done elsewhere takes effect on this replica.
    cache_seconds: float = Field(5.0, ge=0, le=300)
    # Per key, per replica ("redis": cluster-wide when jobs.backend is redis); None: no limit.
    rate_limit: str | None = None  # the `limits` notation: "100/second", "5000/minute"
    max_concurrent_per_key: int | None = Field(None, ge=1)
    # -- the web console's sign-in (issue 19; docs/console.md): an API key is exchanged once
    # for a signed session cookie. The secret signs it: set the same one on every replica
    # behind one address (at least 32 characters); None: random per process (a warning;
    # sessions then end with a restart and hold on one replica only).
    session_secret: SecretStr | None = None
    session_seconds: float = Field(8 * 3600.0, ge=60, le=30 * 86400)  # a session's lifetime

    @field_validator("session_secret", mode="after")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("auth.session_secret must be at least 32 characters")
        return value

    @field_validator("bootstrap_key", mode="after")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("auth.bootstrap_key must be at least 32 characters")
        return value

    @field_validator("rate_limit", mode="after")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                from limits import parse_many
            except ModuleNotFoundError:  # the bare SDK install: only the server enforces it
                return value
            parse_many(value)  # raises ValueError on a malformed limit
        return value


class ClusterSettings(_Section):
    """Model-affinity routing between replicas (issue 17; docs/operations.md, "Routing between
    replicas"). On when `advertise_url` is set (with jobs.backend redis: membership lives in the
    jobs' Redis)."""

    # The URL other replicas reach this one's REST door at (http(s)://pod-ip:8000); None: off.
    advertise_url: str | None = None
    # This replica's gRPC address as clients should see it (host:port), shown in the cluster
    # view only (forwarded requests always take the REST door).
    grpc_advertise_url: str | None = None
    heartbeat_seconds: float = Field(1.0, gt=0, le=60)
    # A replica silent this long disappears from every view (and gets no more forwards).
    ttl_seconds: float = Field(5.0, gt=0, le=600)
    # Forward synchronous requests to the replica that holds the model; false: publish only.
    forward: bool = True
    # A holder with this many requests waiting for the model counts as full: the receiving
    # replica serves locally instead, loading its own copy (copies grow with demand).
    saturation_queue_depth: int = Field(16, ge=1)
    # The credential of the hop between replicas (the same on every replica, >= 32
    # characters); required with authentication on.
    secret: SecretStr | None = None
    # PEM CAs to verify the peers' certificates with when they serve TLS; None: the server's
    # own server.tls.ca_certs, else the system's.
    ca_certs: Path | None = None
    connect_timeout_seconds: float = Field(1.0, gt=0, le=60)
    # This replica's name in the view; None: hostname-pid-random.
    replica_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")

    @property
    def enabled(self) -> bool:
        return self.advertise_url is not None

    @field_validator("advertise_url", mode="after")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.rstrip("/")
            message = "cluster.advertise_url must be http(s)://host:port ([v6-address] in brackets), no path"
            parts = urlsplit(value)
            try:
                port = parts.port
            except ValueError:  # e.g. an IPv6 address without brackets
                raise ValueError(message) from None
            if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
                raise ValueError(message)
            if parts.path or parts.query or parts.fragment or parts.username is not None:
                raise ValueError(message)
        return value

    @field_validator("secret", mode="after")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("cluster.secret must be at least 32 characters")
        return value

    @model_validator(mode="after")
    def _ttl_over_heartbeats(self) -> ClusterSettings:
        if self.ttl_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("cluster.ttl_seconds must be at least twice cluster.heartbeat_seconds")
        return self


class TelemetrySettings(_Section):
    # OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318); None: no traces exported.
    otlp_endpoint: str | None = None
    service_name: str = "modelmora"
    # A request slower than this (received to answered) is logged as a warning and counted.
    slow_request_seconds: float = Field(10.0, gt=0)


class TestingSettings(_Section):
    """Switches for test suites, never for production (docs/security.md "Install sources")."""

    # Installs and updates through the API may name the fake adapter (tasks/fake.py: fake
    # vectors with 200) and adapter options other than `threads` and `pipeline` (the fake
    # adapter's `fail_health_if_exists` reads a server path).
    allow_fake_adapter: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MODELMORA_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)  # type: ignore[arg-type]
    registry: RegistrySettings = Field(default_factory=RegistrySettings)  # type: ignore[arg-type]
    resources: ResourcesSettings = Field(default_factory=ResourcesSettings)  # type: ignore[arg-type]
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)  # type: ignore[arg-type]
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)  # type: ignore[arg-type]
    jobs: JobsSettings = Field(default_factory=JobsSettings)  # type: ignore[arg-type]
    results: ResultsSettings = Field(default_factory=ResultsSettings)  # type: ignore[arg-type]
    limits: LimitsSettings = Field(default_factory=LimitsSettings)  # type: ignore[arg-type]
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)  # type: ignore[arg-type]
    auth: AuthSettings = Field(default_factory=AuthSettings)  # type: ignore[arg-type]
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)  # type: ignore[arg-type]
    testing: TestingSettings = Field(default_factory=TestingSettings)  # type: ignore[arg-type]

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        return _drop_empty_sections(cls, data)

    # Set per load by `load_settings` on a throwaway subclass: pydantic-settings builds its
    # sources from the class, not the instance.
    config_path: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = getattr(settings_cls, "config_path", None)
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    # Derived locations: one data dir holds everything by default.
    @property
    def database_url(self) -> str:
        return self.registry.database_url or f"sqlite:///{self.server.data_dir / 'registry.db'}"

    @property
    def cache_dir(self) -> Path:
        return (self.registry.cache_dir or self.server.data_dir / "cache").expanduser().absolute()

    @property
    def models_dir(self) -> Path:
        return self.server.data_dir / "models"


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build Settings from the YAML file (explicit, else ./modelmora.yaml when present), the
    environment, and `overrides` (CLI flags, nested dicts) on top of both."""
    if config_file is None and Path(DEFAULT_CONFIG_FILE).is_file():
        config_file = Path(DEFAULT_CONFIG_FILE)
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"configuration file not found: {config_file}")
    cls: type[Settings] = type("Settings", (Settings,), {"config_path": config_file})
    base = cls()
    if not overrides:
        return base
    # CLI flags win over everything: merge them into the already-resolved tree.
    merged = _deep_merge(base.model_dump(), overrides)
    return Settings.model_validate(merged)
