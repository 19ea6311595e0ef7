"""What an install through the API may fetch, and which per-model settings it may set.

Anyone who can call the API's install would otherwise make the server read its own files
(`/proc/self/environ` copied into the data dir), fetch internal URLs (server-side request
forgery against `127.0.0.1`, a cloud metadata address, the private network), or switch a
model to the test-only fake adapter. `InstallPolicy` is built from `registry.allowed_sources`
and `testing` (config.py) and handed to the `RegistryService` of the API doors; the CLI, run
by the operator on the machine, gets none unless `registry.allowed_sources.enforce_on_cli`.

Every refusal is FORBIDDEN (403, gRPC PERMISSION_DENIED) with `details.setting` naming the
setting that would allow it, raised before anything is fetched or written. URL sources are
checked twice: the URL (scheme, host) before the request and on every redirect, and the
addresses at connect time (`sources/guard.py` connects to exactly the address checked here,
so a name that resolves differently on a second lookup cannot slip through).

Stdlib only (plus config and errors): services import this without the source stack.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError

log = logging.getLogger("modelmora.registry.policy")

# `SourceKind` of sources/common.py, repeated here so this module stays light.
Kind = Literal["hub", "local", "url", "s3"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses to connect to, in order (getaddrinfo's; tests inject their own).
Resolver = Callable[[str, int], list[str]]

# Adapters that exist for tests only (tasks/specs.py maps "fake" to tasks/fake.py).
TEST_ADAPTERS = frozenset({"fake"})
# Adapter options every model may set: the worker's own (lifecycle/worker.py). The real
# adapters read no other option; the fake one reads many, one of them a server path.
SERVING_OPTIONS = frozenset({"threads", "pipeline"})
# Well-known NAT64 prefix: 64:ff9b::a.b.c.d reaches the IPv4 a.b.c.d through a NAT64 gateway.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def system_resolver(host: str, port: int) -> list[str]:
    """Every address of `host` (an IP literal resolves to itself), without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast. An IPv6 address that carries an IPv4 one (mapped, 6to4,
    Teredo, NAT64) must carry a public one too: `64:ff9b::7f00:1` is 127.0.0.1 behind NAT64,
    and Python calls it global."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
    return True


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """Exact (case-insensitive) or `*.example.org`: any subdomain, not example.org itself."""
    name = _normal_host(host)
    for pattern in patterns:
        pattern = _normal_host(pattern)
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


def local_source_path(source: str) -> Path:
    """The path a local source names: a plain path (`~` expanded) or a `file://` URL on this
    host. Not made absolute: the caller decides against which folder."""
    if source.lower().startswith("file://"):
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ModelMoraError(
                ErrorCode.SOURCE_UNAVAILABLE,
                f"cannot fetch {source}: file URLs on another host are not supported",
                {"source": source, "source_kind": "local"},
            )
        return Path(url2pathname(unquote(parts.path)))
    return Path(source).expanduser()


def forbidden(message: str, setting: str, **details: Any) -> ModelMoraError:
    return ModelMoraError(ErrorCode.FORBIDDEN, message, {"setting": setting, **details})


@dataclass(frozen=True)
class InstallPolicy:
    """The rules of `registry.allowed_sources` and `testing.allow_fake_adapter`."""

    schemes: frozenset[str] = frozenset({"hub", "https", "file", "s3"})
    hosts: tuple[str, ...] = ()
    private_hosts: tuple[str, ...] = ()
    private_networks: tuple[IPNetwork, ...] = ()
    local_roots: tuple[Path, ...] = ()  # resolved
    s3_buckets: frozenset[str] = frozenset()
    allow_fake_adapter: bool = False
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, resolver: Resolver = system_resolver) -> InstallPolicy:
        allowed = settings.registry.allowed_sources
        networks = tuple(ipaddress.ip_network(p, strict=False) for p in allowed.private_hosts if "/" in p)
        return cls(
            schemes=frozenset("file" if s == "local" else s for s in allowed.schemes),
            hosts=tuple(allowed.hosts),
            private_hosts=tuple(p for p in allowed.private_hosts if "/" not in p),
            private_networks=networks,
            local_roots=tuple(root.resolve() for root in allowed.local_roots),
            s3_buckets=frozenset(allowed.s3_buckets),
            allow_fake_adapter=settings.testing.allow_fake_adapter,
            resolver=resolver,
        )

    @classmethod
    def for_cli(cls, settings: Settings) -> InstallPolicy | None:
        """The CLI's policy: none (trusted), unless the operator asked for the same rules."""
        return cls.from_settings(settings) if settings.registry.allowed_sources.enforce_on_cli else None

    # -- sources ------------------------------------------------------------------------------

    def check_source(self, kind: Kind, source: str | None) -> None:
        """Refuse a source this policy does not allow, before anything is fetched."""
        if kind == "hub":
            # The Hub endpoint is the operator's (registry.hub_endpoint); a repo ID is no URL.
            self._scheme("hub", source or "the Hub")
        elif kind == "local":
            assert source is not None
            self._scheme("file", source)
            self.check_local(source)
        elif kind == "s3":
            assert source is not None
            self._scheme("s3", source)
            bucket = urlsplit(source).netloc
            if bucket not in self.s3_buckets:
                raise forbidden(
                    f"installs through the API may not read the S3 bucket {bucket!r}",
                    "registry.allowed_sources.s3_buckets",
                    source=source,
                )
        else:
            assert source is not None
            self.check_url(source)

    def _scheme(self, scheme: str, source: str) -> None:
        if scheme not in self.schemes:
            raise forbidden(
                f"installs through the API may not use {scheme} sources ({source})",
                "registry.allowed_sources.schemes",
                source=source,
                scheme=scheme,
            )

    def check_local(self, source: str) -> Path:
        """The resolved path of a local source if it lies under a local root. The answer is
        the same for a path that exists and one that does not: no probing for files."""
        resolved = Path(os.path.abspath(local_source_path(source))).resolve()
        if not self.within_roots(resolved):
            raise forbidden(
                f"installs through the API may only read folders under registry.allowed_sources."
                f"local_roots{'' if self.local_roots else ' (none configured)'}; refusing {source}",
                "registry.allowed_sources.local_roots",
                source=source,
            )
        return resolved

    def within_roots(self, path: str | os.PathLike[str]) -> bool:
        """Whether `path`, symlinks resolved, is under one of the local roots."""
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(root) for root in self.local_roots)

    def check_url(self, url: str) -> None:
        """Scheme and host of a URL (the source, and each redirect on the way)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise forbidden(f"refusing {scheme}:// in a URL source", "registry.allowed_sources.schemes")
        self._scheme(scheme, _no_credentials(url))
        host = parts.hostname
        if not host:
            raise forbidden(f"{_no_credentials(url)} names no host", "registry.allowed_sources.hosts")
        if self.hosts and not host_matches(host, self.hosts):
            raise forbidden(
                f"installs through the API may not fetch from {host}",
                "registry.allowed_sources.hosts",
                host=host,
            )

    def connect_addresses(self, host: str, port: int) -> list[str]:
        """Resolve `host` once and check every address; the caller connects to these only.
        A host that also resolves to one non-public address is refused as a whole: which
        address a client would pick is not ours to guess."""
        addresses = self.resolver(host, port)
        if host_matches(host, self.private_hosts):
            return addresses
        hidden = [a for a in addresses if not self._reachable(ipaddress.ip_address(a))]
        if hidden:
            log.warning(
                "refused a URL source resolving to a non-public address",
                extra={"host": host, "addresses": hidden},
            )
            raise forbidden(
                f"refusing to connect to {host}: it resolves to a loopback, private, link-local "
                "or otherwise non-public address",
                "registry.allowed_sources.private_hosts",
                host=host,
            )
        return addresses

    def _reachable(self, address: IPAddress) -> bool:
        return is_public(address) or any(address in net for net in self.private_networks)

    # -- per-model settings -------------------------------------------------------------------

    def check_config(self, config: Mapping[str, Any], where: str = "config") -> None:
        """Refuse the test-only adapter and adapter options beyond the serving ones, in an
        install's or update's `config` or a model folder's manifest (`where`)."""
        if self.allow_fake_adapter:
            return
        adapter = config.get("adapter")
        if isinstance(adapter, str) and adapter in TEST_ADAPTERS:
            raise forbidden(
                f"{where}.adapter: the {adapter!r} adapter is for tests only",
                "testing.allow_fake_adapter",
                field=f"{where}.adapter",
            )
        options = config.get("options")
        if isinstance(options, Mapping):
            extra = sorted(set(options) - SERVING_OPTIONS)
            if extra:
                raise forbidden(
                    f"{where}.options: {', '.join(extra)} not allowed (only "
                    f"{', '.join(sorted(SERVING_OPTIONS))}; the others are test options)",
                    "testing.allow_fake_adapter",
                    field=f"{where}.options",
                    options=extra,
                )


def _no_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=netloc).geturl()
