"""Status conditions: the contract that kubectl, kstatus (Flux, Helm), and Argo CD read.

Conditions follow metav1.Condition. ``Ready`` is the summary. ``Reconciling`` and
``Stalled`` are *abnormal-true* (kstatus): present only while true, never both true;
a hard failure is ``Stalled=True`` because ``Ready=False`` alone never reads as failed.
``lastTransitionTime`` moves only when a condition's status changes, so a writer can
rebuild all conditions on every visit and the diff stays empty when nothing changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from waso.api.base import ApiModel, Timestamp

REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
ConditionStatus = Literal["True", "False", "Unknown"]


class ConditionType(StrEnum):
    READY = "Ready"
    """Summary: the object does what its spec asks."""
    ADMITTED = "Admitted"
    """The session holds an admission slot (global capacity and tenant quota)."""
    PAIRED = "Paired"
    """The session has a stored WhatsApp device identity."""
    CONNECTED = "Connected"
    """A live socket to WhatsApp is open for the session."""
    DEVICE_HEALTHY = "DeviceHealthy"
    """The live device identity is well-formed and matches the stored one."""
    RECONCILING = "Reconciling"
    """Abnormal-true: work towards the desired state is in progress."""
    STALLED = "Stalled"
    """Abnormal-true: progress is impossible without a human (or a spec change)."""
    PARKED = "Parked"
    """Abnormal-true: stopped with credentials kept (evicted or suspended); says when it was parked too long."""
    CONFLICT = "Conflict"
    """TenantQuota only: another quota in the namespace is older and is the one honoured."""


class Reason(StrEnum):
    # Admission
    ADMITTED = "Admitted"
    """The session was given an admission slot."""
    CAPACITY_EXCEEDED = "CapacityExceeded"
    """The operator's global session cap is reached; the session waits in the queue."""
    QUOTA_EXCEEDED = "QuotaExceeded"
    """The tenant's TenantQuota maxSessions is reached; the session waits in the queue."""
    PHONE_NUMBER_CONFLICT = "PhoneNumberConflict"
    """An older session (in any namespace) claims the same phone number."""
    SUSPENDED = "Suspended"
    """spec.suspend is true: stopped, credentials kept, admission slot released."""
    EVICTED = "Evicted"
    """Stopped under capacity pressure with credentials kept; resumes when room appears."""
    PENDING = "Pending"
    """Not decided yet."""
    PARKED_TOO_LONG = "ParkedTooLong"
    """Parked longer than the flag age: WhatsApp may soon unlink the device (a new scan would be needed)."""
    DELETING = "Deleting"
    """Being deleted: the runtime unlinks the device and erases the credentials; no slot is held."""
    # Runtime-derived
    NO_RUNTIME_REPORT = "NoRuntimeReport"
    """No session runtime has reported on this session yet."""
    NOT_PAIRED = "NotPaired"
    """No device identity is stored; waiting for a QR scan or pairing code."""
    PAIRED = "Paired"
    """A device identity is stored."""
    CONNECTED = "Connected"
    """The socket is open and logged in."""
    DISCONNECTED = "Disconnected"
    """The socket is closed; the runtime retries with back-off."""
    LOGGED_OUT = "LoggedOut"
    """WhatsApp logged the device out (401); a new pairing is needed."""
    BANNED = "Banned"
    """WhatsApp temporarily banned the account."""
    HEALTHY = "Healthy"
    """The device identity passed every check."""
    MISSING_IDENTITY = "MissingIdentity"
    """Connected but without a JID."""
    MALFORMED_JID = "MalformedJid"
    """The JID does not parse as user:device@s.whatsapp.net with device >= 1."""
    IDENTITY_MISMATCH = "IdentityMismatch"
    """The live JID differs from the stored one."""
    DEVICE_ID_ABOVE_POLICY = "DeviceIdAbovePolicy"
    """The device number exceeds the opt-in maxDeviceId policy."""
    REPAIRING = "Repairing"
    """The runtime backs up and resets the credential store; a new pairing follows."""
    REPAIR_LOOP = "RepairLoop"
    """Repairs keep failing to fix the identity: automatic repair stopped until a person acts."""
    OUT_OF_MEMORY = "OutOfMemory"
    """The kernel killed the session pod at its memory limit (OOMKilled); the tenant's quota must allow more."""
    HEARTBEAT_LOST = "HeartbeatLost"
    """The runtime serving the session stopped renewing its heartbeat Lease: its last report is stale (the pod,
    its node or its network is down), so the device is likely offline."""
    # Summary
    READY = "Ready"
    """Everything the spec asks for holds."""
    PROGRESSING = "Progressing"
    """Work is under way towards the desired state."""
    # TenantQuota
    HONOURED = "Honoured"
    """This quota is the one applied to the namespace."""
    OLDER_QUOTA_EXISTS = "OlderQuotaExists"
    """Another TenantQuota in the namespace is older; this one is ignored."""


class Condition(ApiModel):
    """One observation of the object's state, as metav1.Condition."""

    type: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9]*$", max_length=316)
    """The aspect observed, CamelCase (Ready, Admitted, Paired, Connected, DeviceHealthy, ...)."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(pattern=REASON_PATTERN, min_length=1, max_length=1024)
    """A CamelCase word a program can switch on."""
    message: str = Field(default="", max_length=32768)
    """What happened, for a person."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation this condition was computed from."""
    last_transition_time: Timestamp
    """When status last changed."""


def find_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Iterable[Condition], type_: str) -> bool:
    condition = find_condition(conditions, type_)
    return condition is not None and condition.status == "True"


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    observed_generation: int | None,
    now: datetime,
) -> tuple[Condition, ...]:
    """Return ``conditions`` with ``type_`` set; its transition time moves only if its status changed."""
    previous = find_condition(conditions, type_)
    transition = previous.last_transition_time if previous is not None and previous.status == status else now
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        observed_generation=observed_generation,
        last_transition_time=transition,
    )
    if previous is None:
        return (*conditions, updated)
    return tuple(updated if c.type == type_ else c for c in conditions)


def remove_condition(conditions: Sequence[Condition], type_: str) -> tuple[Condition, ...]:
    return tuple(c for c in conditions if c.type != type_)


Progress = Literal["Ready", "Reconciling", "Stalled"]


def set_kstatus(
    conditions: Sequence[Condition],
    progress: Progress,
    reason: str,
    message: str,
    *,
    observed_generation: int | None,
    now: datetime,
) -> tuple[Condition, ...]:
    """Set ``Ready`` and the abnormal-true pair consistently, as kstatus reads them.

    ``Ready`` is True only for ``progress="Ready"``. ``Reconciling`` or ``Stalled`` is
    present (True) for the matching progress and removed otherwise, so both are never
    True at once.
    """
    ready: ConditionStatus = "True" if progress == "Ready" else "False"
    result = set_condition(
        conditions, ConditionType.READY, ready, reason, message, observed_generation=observed_generation, now=now
    )
    for abnormal in (ConditionType.RECONCILING, ConditionType.STALLED):
        if progress == abnormal.value:
            result = set_condition(
                result, abnormal, "True", reason, message, observed_generation=observed_generation, now=now
            )
        else:
            result = remove_condition(result, abnormal)
    return result
