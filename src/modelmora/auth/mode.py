"""Whether this server checks keys: `auth.enabled` against the address it binds."""

from __future__ import annotations

import ipaddress
import logging

from modelmora.config import Settings

log = logging.getLogger("modelmora.auth")


class UnsafeBindError(RuntimeError):
    """A public bind with auth off and no explicit consent: the server must not start."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so treat it as public


def auth_enabled(settings: Settings) -> bool:
    """On or off for this start; raises UnsafeBindError for an open public server nobody asked for."""
    mode = settings.auth.enabled
    loopback = is_loopback(settings.server.host)
    if mode == "auto":
        return not loopback
    if mode:
        return True
    if not loopback:
        if not settings.auth.allow_unauthenticated:
            raise UnsafeBindError(
                f"refusing to serve on {settings.server.host} without authentication: anyone who "
                "can reach the port could install, replace or delete models. Create a key "
                "(`modelmora keys create`) and leave auth.enabled at auto, or set "
                "auth.allow_unauthenticated: true if something in front already checks callers."
            )
        log.warning(
            "authentication is OFF on a non-loopback bind (auth.allow_unauthenticated): every "
            "caller that reaches %s can change the catalog and read every job",
            settings.server.host,
        )
    return False
