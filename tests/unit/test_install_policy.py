"""The install policy's rules on their own: addresses, host patterns, local roots, settings."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.policy import InstallPolicy, Resolver, host_matches, is_public


def refused(call: object, *args: object, **kwargs: object) -> dict[str, object]:
    assert callable(call)
    with pytest.raises(ModelMoraError) as info:
        call(*args, **kwargs)
    assert info.value.code is ErrorCode.FORBIDDEN, info.value
    return info.value.details


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "fe80::1",
        "fc00::1",
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff0e::1",  # global-scope multicast: "global" to Python, still no source
        "240.0.0.1",
        "255.255.255.255",
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1: Python calls it global
        "2002:7f00:1::",  # 6to4 of 127.0.0.1: Python calls it global
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "64:ff9b::808:808"])
def test_public_addresses(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def test_host_patterns() -> None:
    patterns = ["models.example.org", "*.cdn.example.net", "[::1]"]
    assert host_matches("Models.Example.Org.", patterns)
    assert host_matches("a.cdn.example.net", patterns) and host_matches("b.a.cdn.example.net", patterns)
    assert not host_matches("cdn.example.net", patterns)  # the wildcard is for subdomains
    assert not host_matches("evilcdn.example.net", patterns)
    assert not host_matches("models.example.org.evil.com", patterns)
    assert host_matches("::1", patterns)


def _resolver(table: dict[str, list[str]]) -> Resolver:
    def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


def test_every_resolved_address_is_checked() -> None:
    policy = InstallPolicy(
        resolver=_resolver(
            {
                "public.test": ["93.184.216.34"],
                "mixed.test": ["93.184.216.34", "127.0.0.1"],
                "inside.test": ["10.1.2.3"],
                "mirror.test": ["10.1.2.3"],
            }
        ),
        private_hosts=("mirror.test",),
        private_networks=(ipaddress.ip_network("192.168.7.0/24"),),
    )
    assert policy.connect_addresses("public.test", 443) == ["93.184.216.34"]
    # One bad address is enough: which one a client would pick is not ours to guess.
    assert refused(policy.connect_addresses, "mixed.test", 443)["setting"] == (
        "registry.allowed_sources.private_hosts"
    )
    refused(policy.connect_addresses, "inside.test", 443)
    assert policy.connect_addresses("mirror.test", 80) == ["10.1.2.3"]  # named by the operator
    ok = InstallPolicy(resolver=_resolver({"lan.test": ["192.168.7.9"]}))
    refused(ok.connect_addresses, "lan.test", 80)
    allowed = InstallPolicy(
        resolver=_resolver({"lan.test": ["192.168.7.9"]}),
        private_networks=(ipaddress.ip_network("192.168.7.0/24"),),
    )
    assert allowed.connect_addresses("lan.test", 80) == ["192.168.7.9"]


def test_urls_by_scheme_and_host() -> None:
    policy = InstallPolicy(hosts=("models.example.org", "*.cdn.example.org"))
    policy.check_url("https://models.example.org/m.zip")
    policy.check_url("https://eu.cdn.example.org/m.zip")
    assert refused(policy.check_url, "http://models.example.org/m.zip")["setting"] == (
        "registry.allowed_sources.schemes"
    )
    assert refused(policy.check_url, "https://other.example.org/m.zip")["setting"] == (
        "registry.allowed_sources.hosts"
    )
    details = refused(policy.check_url, "http://user:secret@models.example.org/m.zip")
    assert "secret" not in str(details)
    InstallPolicy().check_url("https://anywhere.example/m.zip")  # no host list: any public host


def test_local_sources_resolve_under_a_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "model").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    policy = InstallPolicy(local_roots=(root.resolve(),))
    assert policy.check_local(str(root / "model")) == (root / "model").resolve()
    assert policy.check_local((root / "model").as_uri()) == (root / "model").resolve()
    for source in (
        "/proc/self/environ",
        str(outside),
        str(root / "escape"),  # a symlink out of the root
        str(root / "model" / ".." / ".." / "outside"),
        str(root) + "-sibling",  # a name that merely starts like the root
    ):
        assert refused(policy.check_local, source)["setting"] == "registry.allowed_sources.local_roots"
    # The same answer for a path that exists and one that does not: no probing for files.
    missing = refused(policy.check_source, "local", "/etc/no-such-file")
    present = refused(policy.check_source, "local", "/etc/hostname")
    assert missing.keys() == present.keys()
    refused(InstallPolicy().check_local, str(root / "model"))  # no roots: nothing local


def test_schemes_and_buckets() -> None:
    policy = InstallPolicy(schemes=frozenset({"https"}), s3_buckets=frozenset({"models"}))
    assert refused(policy.check_source, "hub", None)["setting"] == "registry.allowed_sources.schemes"
    refused(policy.check_source, "s3", "s3://models/m")  # the scheme is off
    s3 = InstallPolicy(s3_buckets=frozenset({"models"}))
    s3.check_source("s3", "s3://models/minilm")
    assert refused(s3.check_source, "s3", "s3://secrets/dump")["setting"] == (
        "registry.allowed_sources.s3_buckets"
    )
    InstallPolicy().check_source("hub", None)  # the Hub by default


def test_test_adapters_and_options() -> None:
    strict = InstallPolicy()
    strict.check_config({"adapter": None, "options": {"threads": 2, "pipeline": False}, "device": "cpu"})
    assert refused(strict.check_config, {"adapter": "fake"})["setting"] == "testing.allow_fake_adapter"
    details = refused(strict.check_config, {"options": {"fail_health_if_exists": "/etc/shadow"}})
    assert details["options"] == ["fail_health_if_exists"]
    assert refused(strict.check_config, {"options": {"dim": 8}}, where="modelmora.json")["field"] == (
        "modelmora.json.options"
    )
    InstallPolicy(allow_fake_adapter=True).check_config({"adapter": "fake", "options": {"fail_health": 1}})


def test_settings(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "registry": {
                "allowed_sources": {
                    "schemes": ["hub", "local", "http"],
                    "private_hosts": ["mirror.internal", "10.0.0.0/8"],
                    "local_roots": [str(tmp_path)],
                }
            },
            "testing": {"allow_fake_adapter": True},
        }
    )
    policy = InstallPolicy.from_settings(settings)
    assert policy.schemes == {"hub", "file", "http"}
    assert policy.private_hosts == ("mirror.internal",)
    assert policy.private_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert policy.local_roots == (Path(os.path.realpath(tmp_path)),)
    assert policy.allow_fake_adapter
    assert InstallPolicy.for_cli(settings) is None  # the operator's CLI is trusted by default
    default = InstallPolicy.from_settings(Settings())
    assert default.schemes == {"hub", "https", "file", "s3"} and not default.local_roots
    assert not default.allow_fake_adapter and not default.s3_buckets
    with pytest.raises(ValidationError, match="absolute"):
        Settings.model_validate({"registry": {"allowed_sources": {"local_roots": ["models"]}}})
    with pytest.raises(ValidationError):
        Settings.model_validate({"registry": {"allowed_sources": {"private_hosts": ["10.0.0.0/33"]}}})
    with pytest.raises(ValidationError):
        Settings.model_validate({"registry": {"allowed_sources": {"schemes": ["ftp"]}}})
