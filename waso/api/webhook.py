"""Webhook: where a tenant's session events go, in the style of Flux's notification-controller.

One resource names both the endpoint (Flux's Provider: URL, signing Secret) and what is
sent to it (Flux's Alert: the sessions, by label, and the event types). The session
runtimes deliver: CloudEvents 1.0 in structured mode, signed as Standard Webhooks do
(HMAC-SHA256 over id, timestamp and body), retried with back-off, in order per chat.
Each runtime shard reports its own deliveries in ``status.deliveries`` (one entry per
shard, written with server-side apply), so shards never overwrite each other.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from waso.api.base import ApiModel, ObjectMeta, Timestamp, pattern_as_rule

SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
URL_PATTERN = r"^https?://[^\s/?#]+[^\s]*$"
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


class EventType(StrEnum):
    """What a Webhook can subscribe to; each has a CloudEvents type (``CLOUD_EVENT_TYPES``)."""

    MESSAGE_RECEIVED = "MessageReceived"
    """A message arrived from WhatsApp."""
    MESSAGE_SENT = "MessageSent"
    """The runtime handed a message to WhatsApp (answered 202 to the API call)."""
    MESSAGE_ACK = "MessageAck"
    """WhatsApp or the recipient acknowledged a sent message (server, delivered, read)."""
    SESSION_STATUS = "SessionStatus"
    """The runtime's state of the session changed (Connecting, AwaitingPairing, Connected, ...)."""
    QR_CODE = "QrCode"
    """A new QR code is on offer (its payload included)."""
    PAIRED = "Paired"
    """A phone linked the session."""

    @property
    def cloud_event_type(self) -> str:
        return CLOUD_EVENT_TYPES[self]


CLOUD_EVENT_TYPES = {
    EventType.MESSAGE_RECEIVED: "dev.waso.message.received",
    EventType.MESSAGE_SENT: "dev.waso.message.sent",
    EventType.MESSAGE_ACK: "dev.waso.message.ack",
    EventType.SESSION_STATUS: "dev.waso.session.status",
    EventType.QR_CODE: "dev.waso.session.qr",
    EventType.PAIRED: "dev.waso.session.paired",
}


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class SelectorRequirement(
    ApiModel,
    json_schema_extra={
        "x-kubernetes-validations": [
            {
                "rule": "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                "message": "values must be non-empty for In and NotIn, and absent for Exists and DoesNotExist",
                "messageExpression": "self.operator in ['In', 'NotIn'] ? "
                "'values must be non-empty for operator ' + self.operator : "
                "'values must be absent for operator ' + self.operator",
                "fieldPath": ".values",
            }
        ]
    },
):
    """One requirement of a label selector, as metav1.LabelSelectorRequirement."""

    key: str = Field(
        pattern=LABEL_KEY_PATTERN,
        max_length=317,
        json_schema_extra=pattern_as_rule(LABEL_KEY_PATTERN, "key must be a label key such as app or example.com/app"),
    )
    operator: SelectorOperator
    values: Annotated[tuple[Annotated[str, Field(max_length=63)], ...], Field(max_length=64)] = ()


class LabelSelector(ApiModel):
    """A label query over the namespace's WhatsAppSessions, as metav1.LabelSelector; empty selects all."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(default=None, max_length=64)
    match_expressions: Annotated[tuple[SelectorRequirement, ...], Field(max_length=32)] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(key) != value for key, value in (self.match_labels or {}).items()):
            return False
        for requirement in self.match_expressions:
            present = requirement.key in labels
            match requirement.operator:
                case SelectorOperator.IN:
                    ok = present and labels[requirement.key] in requirement.values
                case SelectorOperator.NOT_IN:
                    ok = not present or labels[requirement.key] not in requirement.values
                case SelectorOperator.EXISTS:
                    ok = present
                case SelectorOperator.DOES_NOT_EXIST:
                    ok = not present
            if not ok:
                return False
        return True


class SecretKeyReference(ApiModel):
    """A key of a Secret in the Webhook's namespace."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=SECRET_NAME_PATTERN,
        json_schema_extra=pattern_as_rule(SECRET_NAME_PATTERN, "name must be a Secret's name (DNS subdomain)"),
    )
    key: str = Field(
        default="signingKey",
        min_length=1,
        max_length=253,
        pattern=SECRET_KEY_PATTERN,
        json_schema_extra=pattern_as_rule(SECRET_KEY_PATTERN, "key must be a Secret key (letters, digits, -, _, .)"),
    )
    """The key holding the signing secret: at least 24 bytes; ``whsec_`` + base64 is taken as Standard
    Webhooks writes it, anything else as raw bytes."""


class WebhookSpec(ApiModel):
    """Where and what: the endpoint, its signing key, the sessions and the event types."""

    url: str = Field(
        pattern=URL_PATTERN,
        max_length=2048,
        json_schema_extra=pattern_as_rule(URL_PATTERN, "url must be an http:// or https:// URL without spaces"),
    )
    """The endpoint that receives the events by POST (http or https)."""
    secret_ref: SecretKeyReference
    """The signing key. The session runtime reads it with its own ServiceAccount (waso-runtime): grant it
    ``get`` on this Secret with a Role (docs/events.md); until then the status says it cannot."""
    session_selector: LabelSelector = LabelSelector()
    """The sessions whose events go to this endpoint; empty selects every session of the namespace."""
    event_types: Annotated[tuple[EventType, ...], Field(min_length=1, max_length=8)]
    """The events sent; at least one."""
    timeout_seconds: int = Field(default=10, ge=1, le=60)
    """How long one delivery may take before it counts as failed and is retried."""
    suspend: bool = False
    """Stop delivering; events are still kept (in the outbox of the message store, or in memory)."""


class ShardDeliveries(ApiModel):
    """What one session pod (shard) delivered to this endpoint."""

    shard: int = Field(ge=0, le=9999)
    """The session pod's index."""
    delivered: int = Field(default=0, ge=0)
    """Events delivered since the runtime started."""
    failures: int = Field(default=0, ge=0)
    """Failed attempts since the runtime started (each is retried)."""
    consecutive_failures: int = Field(default=0, ge=0)
    """Failed attempts since the last success; 0 while the endpoint is healthy."""
    backlog: int = Field(default=0, ge=0)
    """Events waiting for delivery."""
    last_success_at: Timestamp | None = None
    last_failure_at: Timestamp | None = None
    last_error: str | None = Field(default=None, max_length=1024)
    """Why the last failed attempt failed."""


class WebhookStatus(ApiModel):
    """Written by the session runtimes, each shard its own entry."""

    deliveries: Annotated[
        tuple[ShardDeliveries, ...],
        Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["shard"]}),
    ] = ()
    """One entry per session pod that delivers to this endpoint."""


class Webhook(ApiModel):
    """An endpoint that receives the events of the namespace's WhatsApp sessions as signed CloudEvents."""

    KIND: ClassVar[str] = "Webhook"
    PLURAL: ClassVar[str] = "webhooks"

    api_version: Literal["waso.dev/v1alpha1"] = "waso.dev/v1alpha1"
    kind: Literal["Webhook"] = "Webhook"
    metadata: ObjectMeta
    spec: WebhookSpec
    status: WebhookStatus | None = None
