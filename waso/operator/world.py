"""Plain facts about sessions and quotas, extracted once from API objects.

Every decision module works on these frozen records instead of raw bodies, so a unit
test can build a world in a few lines and the decisions never touch the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from waso.api.conditions import Condition, ConditionType, find_condition
from waso.api.session import (
    CLEANUP_FINALIZER,
    EVICT_ANNOTATION,
    REPAIR_ANNOTATION,
    RESUME_ANNOTATION,
    ROLLBACK_ANNOTATION,
    RuntimeStatus,
    WhatsAppSession,
    WhatsAppSessionStatus,
)
from waso.api.tenancy import SHARD_LABEL, revision


@dataclass(frozen=True)
class SessionFacts:
    uid: str
    namespace: str
    name: str
    phone_number: str
    priority: int
    suspend: bool
    created: datetime
    generation: int
    resource_version: int
    deleting: bool
    deleting_since: datetime | None
    has_finalizer: bool
    """Whether the credentials finalizer is on the object."""
    shard: int | None
    """The shard the session holds (label, else status); assigned once."""
    admitted: bool
    """Whether the last observed status says Admitted=True."""
    status: WhatsAppSessionStatus
    repair_request: str | None = None
    """The value of the annotation waso.dev/repair: a person asking for a repair."""
    rollback_request: str | None = None
    """The value of the annotation waso.dev/rollback: a person asking to restore a backup."""
    evict_request: str | None = None
    """The value of the annotation waso.dev/evict: a person asking to park the session."""
    resume_request: str | None = None
    """The value of the annotation waso.dev/resume: a person asking to bring an evicted session back."""
    finalizers: tuple[str, ...] = ()
    """All finalizers on the object, in order (releasing one is a JSON patch at its position)."""

    @cached_property
    def admitted_condition(self) -> Condition | None:
        """The observed Admitted condition (looked up once: admission and eviction ask for it many times a pass)."""
        return find_condition(self.status.conditions, ConditionType.ADMITTED)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def runtime(self) -> RuntimeStatus | None:
        return self.status.runtime

    @property
    def queue_order(self) -> tuple[int, datetime, str, str]:
        """Higher priority first, then older first; names break ties deterministically."""
        return (-self.priority, self.created, self.namespace, self.name)

    @property
    def age_order(self) -> tuple[datetime, str, str]:
        return (self.created, self.namespace, self.name)


def session_facts(body: Mapping[str, Any]) -> SessionFacts:
    """Facts of one WhatsAppSession body as delivered by the watch."""
    session = WhatsAppSession.model_validate(dict(body))
    meta, status = session.metadata, session.status or WhatsAppSessionStatus()
    assert meta.uid is not None
    assert meta.namespace is not None
    assert meta.creation_timestamp is not None
    label = meta.label(SHARD_LABEL)
    shard = int(label) if label is not None and label.isdigit() else status.shard
    admitted = find_condition(status.conditions, ConditionType.ADMITTED)
    return SessionFacts(
        uid=meta.uid,
        namespace=meta.namespace,
        name=meta.name,
        phone_number=session.spec.phone_number,
        priority=session.spec.priority,
        suspend=session.spec.suspend,
        created=meta.creation_timestamp,
        generation=meta.generation or 0,
        resource_version=revision(meta.resource_version),
        deleting=meta.deletion_timestamp is not None,
        deleting_since=meta.deletion_timestamp,
        has_finalizer=CLEANUP_FINALIZER in (meta.finalizers or []),
        finalizers=tuple(meta.finalizers or ()),
        shard=shard,
        admitted=admitted is not None and admitted.status == "True",
        status=status,
        repair_request=(meta.annotations or {}).get(REPAIR_ANNOTATION),
        rollback_request=(meta.annotations or {}).get(ROLLBACK_ANNOTATION),
        evict_request=(meta.annotations or {}).get(EVICT_ANNOTATION),
        resume_request=(meta.annotations or {}).get(RESUME_ANNOTATION),
    )


@dataclass(frozen=True)
class PodFacts:
    """What the operator needs to know about one session pod (a shard of a tenant)."""

    namespace: str
    name: str
    shard: int
    ready: bool
    out_of_memory: bool
    """The runtime container was OOMKilled and has not been ready since."""
    restarts: int
    memory_limit: str | None


def pod_facts(body: Mapping[str, Any]) -> PodFacts | None:
    """Facts of a session pod (a StatefulSet pod named ``<set>-<ordinal>``); None for any other pod."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    ordinal = meta.get("name", "").rpartition("-")[2]
    if not ordinal.isdigit():
        return None
    containers = status.get("containerStatuses") or []
    ready = bool(containers) and all(c.get("ready") for c in containers)

    def killed(state: Mapping[str, Any] | None) -> bool:
        return bool(state) and (state or {}).get("terminated", {}).get("reason") == "OOMKilled"

    oom = any(killed(c.get("state")) or killed(c.get("lastState")) for c in containers)
    limits = [c.get("resources", {}).get("limits", {}).get("memory") for c in spec.get("containers", [])]
    return PodFacts(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        shard=int(ordinal),
        ready=ready,
        out_of_memory=oom and not ready,
        restarts=sum(int(c.get("restartCount", 0)) for c in containers),
        memory_limit=next((limit for limit in limits if limit), None),
    )
