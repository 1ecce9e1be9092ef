"""TenantQuota: the limits of one tenant (namespace), like a ResourceQuota for sessions.

At most one TenantQuota is honoured per namespace, the oldest; the others get a
``Conflict`` condition. A namespace without one gets the operator's default quota,
which is ``TenantQuotaSpec()`` unless the operator configuration overrides it.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from waso.api.base import ApiModel, ObjectMeta, quantity_field
from waso.api.conditions import Condition

DEFAULT_PAIRING_STREAMS = 2
"""The tenant's QR streams when maxPairingStreams is absent, unless maxSessions is smaller."""

# A value that is not a quantity is refused by its own isQuantity rule; this rule then passes rather than
# fail on quantity() with CEL's raw regular expression.
_REQUESTS_WITHIN_LIMITS = [
    {
        "rule": f"!has(self.requests) || !has(self.limits) || !has(self.requests.{resource}) "
        f"|| !has(self.limits.{resource}) "
        f"|| !isQuantity(self.requests.{resource}) || !isQuantity(self.limits.{resource}) "
        f"|| quantity(self.requests.{resource}).compareTo(quantity(self.limits.{resource})) <= 0",
        "message": f"requests.{resource} must not exceed limits.{resource}",
        "messageExpression": f"'requests.{resource} (' + self.requests.{resource} "
        f"+ ') must not exceed limits.{resource} (' + self.limits.{resource} + ')'",
        "fieldPath": f".requests.{resource}",
    }
    for resource in ("cpu", "memory")
]


class ResourceAmounts(ApiModel):
    """CPU and memory, as in a container's resources."""

    cpu: Annotated[str, quantity_field("cpu")] | None = None
    """CPU, e.g. 250m or 1."""
    memory: Annotated[str, quantity_field("memory")] | None = None
    """Memory, e.g. 256Mi."""


class PodResources(ApiModel, json_schema_extra={"x-kubernetes-validations": _REQUESTS_WITHIN_LIMITS}):
    """Resources of each session pod of the tenant."""

    requests: ResourceAmounts | None = None
    """Guaranteed resources per pod."""
    limits: ResourceAmounts | None = None
    """Hard ceiling per pod: a tenant's sessions cannot take memory from another tenant's."""


class TenantQuotaSpec(
    ApiModel,
    json_schema_extra={
        "x-kubernetes-validations": [
            {
                "rule": "!has(self.maxPairingStreams) || self.maxPairingStreams <= self.maxSessions",
                "message": "maxPairingStreams cannot exceed maxSessions",
                # format(), not string(int) + ...: the cost of joining strings of unknown length is estimated
                # without bound, and the API server refuses such a CRD.
                "messageExpression": "'maxPairingStreams (%d) cannot exceed maxSessions (%d)'"
                ".format([self.maxPairingStreams, self.maxSessions])",
                "fieldPath": ".maxPairingStreams",
            }
        ]
    },
):
    """Limits of the tenant that owns the namespace."""

    max_sessions: int = Field(default=10, ge=0, le=10000)
    """Sessions admitted at once in this namespace; further ones wait with QuotaExceeded."""
    messages_per_minute: int = Field(default=60, ge=1, le=60000)
    """Messages the tenant may send per minute through the runtime's API, over all its sessions."""
    max_pairing_streams: int | None = Field(default=None, ge=0, le=1000)
    """QR Server-Sent-Event streams open at once for the tenant, at most maxSessions; absent: min(2, maxSessions)."""
    auto_repair: bool = True
    """Repair this tenant's sessions with a broken device identity automatically (within the operator's limits)."""
    message_retention_days: int = Field(default=30, ge=1, le=3650)
    """Days the message store keeps this tenant's messages (when the operator has a message store)."""
    max_stored_messages: int = Field(default=100000, ge=0, le=100_000_000)
    """Messages the store keeps for this tenant at most; the oldest go first."""
    sessions_per_pod: int = Field(default=20, ge=1, le=500)
    """Sessions served by one session pod (shard)."""
    pod_resources: PodResources = PodResources(
        requests=ResourceAmounts(cpu="100m", memory="128Mi"), limits=ResourceAmounts(memory="512Mi")
    )
    """Resources of each session pod."""

    @property
    def pairing_streams_limit(self) -> int:
        """The QR streams the tenant may hold open at once: maxPairingStreams, or when absent 2 (at most
        maxSessions, so that a quota giving only maxSessions never breaks the rule between the two)."""
        if self.max_pairing_streams is not None:
            return self.max_pairing_streams
        return min(DEFAULT_PAIRING_STREAMS, self.max_sessions)


class QuotaAmounts(ApiModel):
    """Counted amounts, as in ResourceQuota status."""

    sessions: int = Field(default=0, ge=0)
    """Admitted sessions."""
    pairing_streams: int | None = Field(default=None, ge=0)
    """Open QR streams (reported by the runtimes)."""


class TenantQuotaStatus(ApiModel):
    """Usage against the quota, like ResourceQuota's used and hard."""

    hard: QuotaAmounts | None = None
    """The limits in force."""
    used: QuotaAmounts | None = None
    """Current usage."""
    conditions: Annotated[
        tuple[Condition, ...],
        Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
    ] = ()
    """Ready, Conflict."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the operator last acted on."""


class TenantQuota(ApiModel):
    """The session limits of the tenant that owns this namespace."""

    KIND: ClassVar[str] = "TenantQuota"
    PLURAL: ClassVar[str] = "tenantquotas"

    api_version: Literal["waso.dev/v1alpha1"] = "waso.dev/v1alpha1"
    kind: Literal["TenantQuota"] = "TenantQuota"
    metadata: ObjectMeta
    spec: TenantQuotaSpec = TenantQuotaSpec()
    status: TenantQuotaStatus | None = None
