"""The audit log: one JSON line per admin action, whoever asked and through whichever door.

The calls sit in the service layer (services/registry.py, services/management.py, the job
service, the keys commands), which every door goes through once, so an action is logged
exactly once whether it came by REST, gRPC or the CLI. A line says who (the key id and name
of `current_principal`), from where (`current_client`: the peer address, or "cli"), what
(`action`, `target`, `details`) and how it ended (`outcome`: "ok" or the error code).

The logger is `modelmora.audit`, set to INFO on its own: the lines are written even when
`logging.level` is `warning`, and can be routed or filtered by that name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from modelmora.auth.keys import current_client, current_principal
from modelmora.errors import ErrorCode, ModelMoraError

log = logging.getLogger("modelmora.audit")
log.setLevel(logging.INFO)

OK = "ok"


def audit(action: str, target: str | None, *, outcome: str = OK, **details: Any) -> None:
    """Write one audit line for `action` on `target` by the current principal."""
    principal = current_principal.get()
    log.info(
        "admin action",
        extra={
            "audit": True,
            "action": action,
            "target": target,
            "outcome": outcome,
            "key_id": principal.key_id,
            "key_name": principal.name,
            "client": current_client.get(),
            # Under one key: detail names must not collide with the log record's own
            # attributes (`name`, `module`...) nor with the fields above.
            "details": details,
        },
    )


@contextlib.contextmanager
def audited(action: str, target: str | None, **details: Any) -> Iterator[dict[str, Any]]:
    """Audit the action in the block once it ends, with its outcome: "ok", the error code
    of a ModelMoraError, INTERNAL_ERROR for any other exception, CANCELLED when the caller
    went away (task cancelled, Ctrl-C). The block may add details to the dict it gets."""
    learned: dict[str, Any] = {}
    try:
        yield learned
    except ModelMoraError as exc:
        audit(action, target, outcome=exc.code.value, **details, **learned)
        raise
    except Exception:
        audit(action, target, outcome=ErrorCode.INTERNAL_ERROR.value, **details, **learned)
        raise
    except BaseException:
        audit(action, target, outcome=ErrorCode.CANCELLED.value, **details, **learned)
        raise
    audit(action, target, **details, **learned)
