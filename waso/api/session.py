"""WhatsAppSession: one WhatsApp Web multi-device session (one linked device) of a tenant."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from waso.api.base import ApiModel, ObjectMeta, Timestamp, pattern_as_rule
from waso.api.conditions import Condition

E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"
REPAIR_ANNOTATION = "waso.dev/repair"
"""Set to a new value (``waso repair`` writes the time) to ask for a repair of the session."""
ROLLBACK_ANNOTATION = "waso.dev/rollback"
"""``<backup id or latest>#<token>`` (``waso repair rollback`` writes it) to restore a backup."""
ACTIVITY_GRANULARITY = timedelta(seconds=60)
"""status.runtime.lastActivityAt moves in steps of at least this, so busy sessions do not write on every
message: a session may have been active until this long after the time it shows."""
EVICT_ANNOTATION = "waso.dev/evict"
"""Set to a new value (``waso evict`` writes the time) to park the session until a person resumes it."""
RESUME_ANNOTATION = "waso.dev/resume"
"""Set to a new value (``waso resume`` writes the time) to bring an evicted session back now."""
CLEANUP_FINALIZER = "waso.dev/credentials"
"""Held while a session's credentials may exist, so that deleting it unlinks the device first."""


class PairingMethod(StrEnum):
    QR = "QR"
    """Scan a QR code with the phone (Linked devices, Link a device)."""
    PHONE_CODE = "PhoneCode"
    """Type an 8-character code on the phone (Link with phone number instead)."""


class Phase(StrEnum):
    """For display only; conditions are the contract."""

    PENDING = "Pending"
    WAITING = "Waiting"
    STARTING = "Starting"
    PAIRING = "Pairing"
    CONNECTED = "Connected"
    DISCONNECTED = "Disconnected"
    REPAIRING = "Repairing"
    SUSPENDED = "Suspended"
    BANNED = "Banned"
    """WhatsApp banned the account for a while (runtime.bannedUntil says until when, when it said so)."""
    EVICTED = "Evicted"
    FAILED = "Failed"
    DELETING = "Deleting"


class RuntimeState(StrEnum):
    STOPPED = "Stopped"
    CONNECTING = "Connecting"
    AWAITING_PAIRING = "AwaitingPairing"
    CONNECTED = "Connected"
    DISCONNECTED = "Disconnected"
    LOGGED_OUT = "LoggedOut"
    BANNED = "Banned"
    REMOVED = "Removed"
    """The session is being deleted and its device was unlinked and its credentials erased."""


DEVICE_NAME_PATTERN = r"^\S(.*\S)?$"
DeviceName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=DEVICE_NAME_PATTERN,
        json_schema_extra=pattern_as_rule(DEVICE_NAME_PATTERN, "deviceName must not begin or end with white space"),
    ),
]


class Pairing(ApiModel):
    """How the device is linked to the phone the first time."""

    method: PairingMethod = PairingMethod.QR
    """QR (scan a code) or PhoneCode (type a code on the phone)."""


class WhatsAppSessionSpec(ApiModel):
    """The session a platform engineer asks for."""

    phone_number: str = Field(
        pattern=E164_PATTERN,
        max_length=16,
        json_schema_extra=pattern_as_rule(
            E164_PATTERN,
            'phoneNumber must be in E.164 form such as +4915112345678 ("+", a country code not starting with 0, '
            "7 to 15 digits in all)",
            {
                "rule": "self == oldSelf",
                "message": "phoneNumber is immutable: create a new WhatsAppSession for another number",
                "messageExpression": "'phoneNumber is immutable: it stays ' + oldSelf + ', not ' + self "
                "+ '; create a new WhatsAppSession for another number'",
            },
        ),
    )
    """The account's number in E.164 form: '+', country code, number, 7 to 15 digits (+4915112345678)."""
    pairing: Pairing = Pairing()
    """How to link the device when no credentials are stored."""
    priority: int = Field(default=0, ge=0, le=1000)
    """Eviction order under capacity pressure: lower priority is evicted first; waiting sessions with a
    higher priority are admitted first."""
    suspend: bool = False
    """Stop the session and release its admission slot while keeping its credentials."""
    device_name: DeviceName | None = None
    """The name shown in the phone's Linked devices list (default: waso)."""


class RepairBackup(ApiModel):
    """A credential-store backup taken before a repair."""

    name: str = Field(min_length=1, max_length=253)
    """Backup identifier on the shard volume."""
    taken_at: Timestamp
    """When the backup was taken."""


class RepairRequest(ApiModel):
    """A repair the operator asked the session's runtime to carry out."""

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Names the repair and its backup."""
    reason: str = Field(min_length=1, max_length=64)
    """The DeviceHealthy reason that called for it, Manual, or Rollback."""
    requested_at: Timestamp
    """When the operator asked for it."""
    backup: str | None = Field(default=None, max_length=128)
    """A rollback: restore this backup instead of backing up and resetting."""


class RepairStatus(ApiModel):
    """Repairs of this session (back up, reset, re-pair)."""

    count: int = Field(default=0, ge=0)
    """Repairs performed since creation."""
    last_reason: str | None = Field(default=None, max_length=1024)
    """Why the last repair ran."""
    last_time: Timestamp | None = None
    """When the last repair started."""
    backups: tuple[RepairBackup, ...] = Field(default=(), max_length=100)
    """Kept backups, oldest first."""
    requested: RepairRequest | None = None
    """The repair in flight: asked of the runtime and not yet reported done."""
    starts: tuple[Timestamp, ...] | None = Field(default=None, max_length=20)
    """When the recent repairs started, oldest first (loop protection)."""
    handled_request: str | None = Field(default=None, max_length=253)
    """The last manual request (annotation waso.dev/repair) the operator acted on."""
    acted_at: Timestamp | None = None
    """When a person last asked for a repair; loop protection counts from then."""
    handled_rollback: str | None = Field(default=None, max_length=253)
    """The last rollback request (annotation waso.dev/rollback) the operator acted on."""


class EvictionReason(StrEnum):
    CAPACITY_PRESSURE = "CapacityPressure"
    """A waiting session needed a slot under the global cap."""
    QUOTA_PRESSURE = "QuotaPressure"
    """A waiting session of the same tenant needed a slot under the tenant's maxSessions."""
    MEMORY_PRESSURE = "MemoryPressure"
    """Its session pod neared its memory limit; it resumes when the pod is back below the resume fraction."""
    MANUAL = "Manual"
    """A person asked (``waso evict``, annotation waso.dev/evict); only a person resumes it."""


class EvictionStatus(ApiModel):
    """Evictions of this session: stopped with its credentials kept, to make room."""

    count: int = Field(default=0, ge=0)
    """Evictions since creation."""
    last_reason: EvictionReason | None = None
    """Why the last eviction happened."""
    slot_taken_by: str | None = Field(default=None, max_length=317)
    """The session (namespace/name) that took the slot at the last eviction."""
    idle_since: Timestamp | None = None
    """The session's last activity (or connection) before the last eviction."""
    handled_evict: str | None = Field(default=None, max_length=253)
    """The last eviction request (annotation waso.dev/evict) the operator acted on."""
    handled_resume: str | None = Field(default=None, max_length=253)
    """The last resume request (annotation waso.dev/resume) the operator acted on."""


class RepairReport(ApiModel):
    """What the runtime did for a repair (or rollback) request."""

    id: str = Field(min_length=1, max_length=128)
    """The request's id."""
    backup: str | None = Field(default=None, max_length=128)
    """The backup taken before the reset (absent: nothing to back up), or the one restored."""
    completed_at: Timestamp
    """When the store was reset."""
    error: str | None = Field(default=None, max_length=1024)
    """Why the backup failed, if it did (the store is then left as it was)."""


class RuntimeStatus(ApiModel):
    """Written by the session runtime (server-side apply field manager waso-runtime), only on change."""

    state: RuntimeState | None = None
    """What the runtime's socket is doing."""
    jid: str | None = Field(default=None, max_length=128)
    """The live device JID, user:device@s.whatsapp.net (not validated here: the operator judges it)."""
    device_id: int | None = Field(default=None, ge=0, le=9999)
    """The device number of the live JID (the part after ':')."""
    stored_jid: str | None = Field(default=None, max_length=128)
    """The JID held in the session's credential store (absent: never paired)."""
    push_name: str | None = Field(default=None, max_length=256)
    """The account's display name."""
    connected_at: Timestamp | None = None
    """When the current connection was established."""
    last_activity_at: Timestamp | None = None
    """Last message sent or received, at 60-second granularity."""
    qr_expires_at: Timestamp | None = None
    """When the QR code now on offer expires."""
    last_error: str | None = Field(default=None, max_length=4096)
    """The last error the transport reported."""
    banned_until: Timestamp | None = None
    """When a temporary ban ends, when WhatsApp said so."""
    last_repair: RepairReport | None = None
    """The last repair this session's runtime carried out."""


class WhatsAppSessionStatus(ApiModel):
    """Observed state; written by the operator except for runtime."""

    phase: Phase | None = None
    """A one-word summary for display; read conditions in programs."""
    conditions: Annotated[
        tuple[Condition, ...],
        Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
    ] = ()
    """Ready, Admitted, Paired, Connected, DeviceHealthy, Reconciling, Stalled."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the operator last acted on."""
    shard: int | None = Field(default=None, ge=0, le=9999)
    """The index of the tenant's session pod that serves this session; assigned once."""
    endpoint: str | None = Field(default=None, max_length=512)
    """The runtime's HTTP base URL for this session (QR stream, pairing code, messages)."""
    admitted_at: Timestamp | None = None
    """When the session last got its admission slot."""
    evicted_at: Timestamp | None = None
    """When the session was last evicted under pressure."""
    eviction: EvictionStatus | None = None
    """Eviction history and the requests of people the operator acted on."""
    repairs: RepairStatus | None = None
    """Repair history."""
    runtime: RuntimeStatus | None = None
    """Reported by the session runtime."""


class WhatsAppSession(ApiModel):
    """A WhatsApp Web multi-device session of the tenant that owns the namespace."""

    KIND: ClassVar[str] = "WhatsAppSession"
    PLURAL: ClassVar[str] = "whatsappsessions"

    api_version: Literal["waso.dev/v1alpha1"] = "waso.dev/v1alpha1"
    kind: Literal["WhatsAppSession"] = "WhatsAppSession"
    metadata: ObjectMeta
    spec: WhatsAppSessionSpec
    status: WhatsAppSessionStatus | None = None
