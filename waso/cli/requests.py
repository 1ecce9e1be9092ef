"""What the CLI's requests share: a NAMESPACE/NAME argument, a fresh token, an annotation patch.

A person's request to the operator is an annotation set to a new value (a token: the time);
the operator records the token it acted on in the session's status, so a request is carried
out once, survives an operator restart and is visible in ``kubectl get -o yaml``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from waso.api.session import WhatsAppSession
from waso.kube import KubeClient, reference

FIELD_MANAGER = "waso-cli"


def parse_target(text: str) -> tuple[str, str] | None:
    """``NAMESPACE/NAME`` as a pair; None when it is not one."""
    namespace, _, name = text.partition("/")
    return (namespace, name) if namespace and name and "/" not in name else None


def new_token() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


async def read_session(target: tuple[str, str]) -> dict[str, Any]:
    kube = KubeClient.connect(threads=1)
    try:
        return await kube.get(WhatsAppSession.KIND, *target)
    finally:
        kube.close()


async def annotate(target: tuple[str, str], annotation: str, value: str) -> None:
    kube = KubeClient.connect(threads=1)
    try:
        patch = {"metadata": {"annotations": {annotation: value}}}
        await kube.merge_patch(reference(WhatsAppSession.KIND, *target), patch, FIELD_MANAGER)
    finally:
        kube.close()
