"""Facts shared by the operator, the session runtime and the CLI: labels, revisions, the quota in force."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from waso.api.quota import TenantQuota, TenantQuotaSpec, TenantQuotaStatus

SHARD_LABEL = "waso.dev/shard"
DEFAULT_MAX_SESSIONS = 35
"""The global cap when the operator's configuration sets none (``maxSessions``)."""
OPERATOR_LABELS = "app.kubernetes.io/name=waso-operator"
"""The selector of the chart's operator objects (its ConfigMap holds the configuration, ``config.yaml``)."""
"""On a WhatsAppSession: the index of the tenant's session pod that serves it."""


@dataclass(frozen=True)
class QuotaFacts:
    uid: str
    namespace: str
    name: str
    created: datetime
    generation: int
    resource_version: int
    spec: TenantQuotaSpec
    status: TenantQuotaStatus

    @property
    def age_order(self) -> tuple[datetime, str]:
        return (self.created, self.name)


def quota_facts(body: Mapping[str, Any]) -> QuotaFacts:
    quota = TenantQuota.model_validate(dict(body))
    meta = quota.metadata
    assert meta.uid is not None
    assert meta.namespace is not None
    assert meta.creation_timestamp is not None
    return QuotaFacts(
        uid=meta.uid,
        namespace=meta.namespace,
        name=meta.name,
        created=meta.creation_timestamp,
        generation=meta.generation or 0,
        resource_version=revision(meta.resource_version),
        spec=quota.spec,
        status=quota.status or TenantQuotaStatus(),
    )


def revision(resource_version: str | None) -> int:
    """etcd-backed API servers issue numeric, increasing resourceVersions; anything else reads as 0."""
    return int(resource_version) if resource_version and resource_version.isdigit() else 0


def honoured_quota(quotas: list[QuotaFacts]) -> QuotaFacts | None:
    """The oldest quota of a namespace is the one in force."""
    return min(quotas, key=lambda q: q.age_order, default=None)


HEARTBEAT_LABEL = "waso.dev/heartbeat"
"""On a session pod's heartbeat Lease (``true``); with SHARD_LABEL, so the operator can index them."""
MEMORY_ANNOTATION = "waso.dev/memory"
"""On the heartbeat Lease: ``<used bytes>/<limit bytes>`` of the pod's memory cgroup at the last renewal
(limit 0: none). Written with every renewal, which writes the Lease anyway."""


@dataclass(frozen=True)
class MemoryReport:
    """A session pod's memory as its runtime last reported it."""

    namespace: str
    shard: int
    used: int
    limit: int
    """0: no limit."""
    at: datetime

    @property
    def fraction(self) -> float:
        return self.used / self.limit if self.limit > 0 else 0.0


def memory_annotation(used: int, limit: int) -> str:
    return f"{used}/{limit}"


@dataclass(frozen=True)
class Heartbeat:
    """A session pod's heartbeat Lease: the runtime of ``shard`` was alive at ``renewed``, and is taken for
    alive until ``expires``, two Lease durations later (a renewal delayed by a busy API server is not a lost
    runtime); with its memory report, if it carries one."""

    namespace: str
    shard: int
    renewed: datetime
    expires: datetime
    memory: MemoryReport | None


def heartbeat(lease: Mapping[str, Any]) -> Heartbeat | None:
    """The facts of a heartbeat Lease; None when it is not one (no shard, never renewed)."""
    meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
    shard = (meta.get("labels") or {}).get(SHARD_LABEL, "")
    renewed, duration = spec.get("renewTime"), spec.get("leaseDurationSeconds")
    if not (shard.isdigit() and renewed and isinstance(duration, int) and meta.get("namespace")):
        return None
    at = datetime.fromisoformat(str(renewed).replace("Z", "+00:00"))
    return Heartbeat(str(meta["namespace"]), int(shard), at, at + timedelta(seconds=2 * duration), memory_report(lease))


def memory_report(lease: Mapping[str, Any]) -> MemoryReport | None:
    """The report on a heartbeat Lease; None when it carries none (or an unreadable one)."""
    meta = lease.get("metadata") or {}
    shard = (meta.get("labels") or {}).get(SHARD_LABEL, "")
    used, _, limit = ((meta.get("annotations") or {}).get(MEMORY_ANNOTATION) or "").partition("/")
    renewed = (lease.get("spec") or {}).get("renewTime")
    if not (shard.isdigit() and used.isdigit() and limit.isdigit() and renewed and meta.get("namespace")):
        return None
    at = datetime.fromisoformat(str(renewed).replace("Z", "+00:00"))
    return MemoryReport(str(meta["namespace"]), int(shard), int(used), int(limit), at)
