"""What the CLI's requests share: a NAMESPACE/NAME argument, a fresh token, an annotation patch.

A person's request to the operator is an annotation set to a new value (a token: the time);
the operator records the token it acted on in the session's status, so a request is carried
out once, survives an operator restart and is visible in ``kubectl get -o yaml``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from waso.api.session import WhatsAppSession
from waso.cli.connection import Cluster, connect, explain
from waso.kube import ApiError, Unreachable, reference

FIELD_MANAGER = "waso-cli"


def parse_target(text: str) -> tuple[str, str] | None:
    """``NAMESPACE/NAME`` as a pair; None when it is not one."""
    namespace, _, name = text.partition("/")
    return (namespace, name) if namespace and name and "/" not in name else None


def new_token() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


async def read_session(cluster: Cluster, target: tuple[str, str]) -> dict[str, Any]:
    """The session; raises CliError (not found, forbidden, unreachable) with one line to print."""
    kube = connect(cluster, threads=1)
    try:
        return await kube.get(WhatsAppSession.KIND, *target)
    except (ApiError, Unreachable, OSError) as error:
        raise explain(error, f"WhatsAppSession {'/'.join(target)}") from None
    finally:
        kube.close()


async def patch_session(cluster: Cluster, target: tuple[str, str], patch: dict[str, Any]) -> None:
    kube = connect(cluster, threads=1)
    try:
        await kube.merge_patch(reference(WhatsAppSession.KIND, *target), patch, FIELD_MANAGER)
    except (ApiError, Unreachable, OSError) as error:
        raise explain(error, f"WhatsAppSession {'/'.join(target)}") from None
    finally:
        kube.close()


async def annotate(cluster: Cluster, target: tuple[str, str], annotation: str, value: str) -> None:
    await patch_session(cluster, target, {"metadata": {"annotations": {annotation: value}}})
