"""Which Kubernetes Events a session's status change is worth: a pure function of before and after.

The operator records one Event per lifecycle change it writes (paired, connected again
after an outage, logged out, re-paired, banned, ban lifted, identity mismatch), so
``kubectl describe`` and ``kubectl get events`` tell a session's story. Each message
names the tenant, because Events are read across namespaces too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from waso.api.conditions import Condition, ConditionType, Reason, find_condition


class EventReason(StrEnum):
    PAIRED = "Paired"
    RE_PAIRED = "RePaired"
    RECONNECTED = "Reconnected"
    LOGGED_OUT = "LoggedOut"
    BANNED = "Banned"
    BAN_LIFTED = "BanLifted"
    IDENTITY_MISMATCH = "IdentityMismatch"
    REPAIR_STARTED = "RepairStarted"
    REPAIRED = "Repaired"
    REPAIR_LOOP = "RepairLoop"


@dataclass(frozen=True)
class LifecycleEvent:
    reason: EventReason
    message: str
    warning: bool = False


def _state(conditions: Sequence[Condition], type_: str) -> tuple[str, str, str]:
    condition = find_condition(conditions, type_)
    if condition is None:
        return "Unknown", "", ""
    return condition.status, condition.reason, condition.message


def lifecycle_events(tenant: str, before: Sequence[Condition], after: Sequence[Condition]) -> list[LifecycleEvent]:
    """The Events of the change from the ``before`` conditions to the ``after`` ones."""
    events: list[LifecycleEvent] = []
    paired_before, paired_reason_before, _ = _state(before, ConditionType.PAIRED)
    paired_after, _, paired_message = _state(after, ConditionType.PAIRED)
    connected_before, connected_reason_before, _ = _state(before, ConditionType.CONNECTED)
    connected_after, connected_reason_after, connected_message = _state(after, ConditionType.CONNECTED)
    _, healthy_reason_before, _ = _state(before, ConditionType.DEVICE_HEALTHY)
    _, healthy_reason_after, healthy_message = _state(after, ConditionType.DEVICE_HEALTHY)

    def add(reason: EventReason, message: str, warning: bool = False) -> None:
        events.append(LifecycleEvent(reason, f"tenant {tenant}: {message}", warning))

    if paired_after == "True" and paired_before != "True":
        again = paired_reason_before == Reason.LOGGED_OUT
        add(EventReason.RE_PAIRED if again else EventReason.PAIRED, paired_message)
    if connected_reason_after == Reason.LOGGED_OUT and connected_reason_before != Reason.LOGGED_OUT:
        add(EventReason.LOGGED_OUT, connected_message, warning=True)
    if connected_reason_after == Reason.BANNED and connected_reason_before != Reason.BANNED:
        add(EventReason.BANNED, connected_message, warning=True)
    if connected_reason_before == Reason.BANNED and connected_reason_after != Reason.BANNED:
        add(EventReason.BAN_LIFTED, connected_message)
    elif connected_after == "True" and connected_before == "False" and paired_before == "True":
        add(EventReason.RECONNECTED, connected_message)
    if healthy_reason_after == Reason.IDENTITY_MISMATCH and healthy_reason_before != Reason.IDENTITY_MISMATCH:
        add(EventReason.IDENTITY_MISMATCH, healthy_message, warning=True)
    _, ready_reason_before, _ = _state(before, ConditionType.READY)
    _, ready_reason_after, ready_message = _state(after, ConditionType.READY)
    if ready_reason_after != ready_reason_before:
        if ready_reason_after == Reason.REPAIRING:
            add(EventReason.REPAIR_STARTED, ready_message, warning=True)
        elif ready_reason_before == Reason.REPAIRING:
            add(EventReason.REPAIRED, "the repair or rollback of the credential store is done")
        if ready_reason_after == Reason.REPAIR_LOOP:
            add(EventReason.REPAIR_LOOP, ready_message, warning=True)
    return events


@dataclass(frozen=True)
class Decision:
    """A changed admission decision of one session, to be told by an Event."""

    namespace: str
    name: str
    reason: str
    message: str
    warning: bool


@dataclass(frozen=True)
class TenantEvent:
    """One Event for many sessions of a tenant that got the same decision in one pass."""

    namespace: str
    reason: str
    message: str
    warning: bool
    count: int


BURST_REASONS = frozenset({Reason.ADMITTED, Reason.CAPACITY_EXCEEDED, Reason.QUOTA_EXCEEDED})
"""Decisions that come in bursts (a migration, a restore): told once per tenant and pass, not per session."""
NAMES_SHOWN = 10


def decision_events(decisions: Sequence[Decision]) -> tuple[list[Decision], list[TenantEvent]]:
    """The Events of one pass's decisions: per session, except where one tenant had several of a burst reason.

    Evictions, resumptions and refusals of another kind stay per session: they are rare, and
    ``kubectl describe`` of that session is where people look for them."""
    groups: dict[tuple[str, str], list[Decision]] = {}
    for decision in decisions:
        groups.setdefault((decision.namespace, decision.reason), []).append(decision)
    single: list[Decision] = []
    bursts: list[TenantEvent] = []
    for (namespace, reason), group in groups.items():
        if len(group) == 1 or reason not in BURST_REASONS:
            single.extend(group)
            continue
        names = sorted(d.name for d in group)
        shown = ", ".join(names[:NAMES_SHOWN]) + (
            f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
        )
        first = next(d for d in group if d.name == names[0])
        message = (
            f"tenant {namespace}: {reason} for {len(group)} sessions at once: {shown} ({first.name}: {first.message})"
        )
        bursts.append(TenantEvent(namespace, reason, message, first.warning, len(group)))
    return single, bursts
