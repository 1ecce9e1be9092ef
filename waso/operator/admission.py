"""Admission: who holds a session slot, decided for the whole cluster at once.

A pure function of the world (every session, each tenant's limit, the global cap).
The controller calls it under one lock with the sessions' *effective* admission state
(its own decisions not yet seen through the watch included), which is what makes 200
simultaneous creates against a cap of 35 admit exactly 35.

Rules, in order:

1. A session being deleted, with ``suspend: true`` or evicted by a person holds no slot.
2. Per phone number, the oldest session (creationTimestamp, then namespace/name) wins;
   the others wait with ``PhoneNumberConflict``.
3. Admission is sticky: a session admitted before keeps its slot, even if the cap or
   its quota was lowered since (evicting is a separate decision: ``waso.operator.eviction``).
4. Waiting sessions are admitted in queue order (priority, then age) while both the
   global cap and their tenant's ``maxSessions`` have room; a tenant at its quota does
   not block other tenants behind it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from waso.api.conditions import Reason
from waso.operator.world import SessionFacts


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    reason: Reason
    message: str


# One constant message: a message that counted slots would rewrite every holder's status on each admission.
ADMITTED = Verdict(True, Reason.ADMITTED, "holds an admission slot")


def plan_admission(
    sessions: Iterable[SessionFacts],
    admitted_now: Mapping[str, bool],
    tenant_limits: Mapping[str, int],
    global_cap: int,
    held_out: Collection[str] = (),
) -> dict[str, Verdict]:
    """Verdict per session uid.

    ``admitted_now`` is the effective current state by uid (observed or already decided);
    ``tenant_limits`` gives each namespace's maxSessions; ``held_out`` are sessions a person
    evicted, which hold no slot and do not queue (``waso.operator.eviction``).
    """
    live = [s for s in sessions if not s.deleting]
    verdicts: dict[str, Verdict] = {}

    # Only numbers claimed more than once need an owner picked (one sort of them, not of every session).
    claims = Counter(s.phone_number for s in live)
    owners: dict[str, SessionFacts] = {}
    for session in sorted((s for s in live if claims[s.phone_number] > 1), key=lambda s: s.age_order):
        owners.setdefault(session.phone_number, session)

    contenders: list[SessionFacts] = []
    for session in live:
        owner = owners.get(session.phone_number, session)
        if owner.uid != session.uid:
            where = owner.name if owner.namespace == session.namespace else "another tenant"
            verdicts[session.uid] = Verdict(
                False,
                Reason.PHONE_NUMBER_CONFLICT,
                f"phone number {session.phone_number} is already claimed by an older session ({where}); "
                "delete one of them",
            )
        elif session.suspend:
            verdicts[session.uid] = Verdict(
                False, Reason.SUSPENDED, "spec.suspend is true: stopped, credentials kept, no slot held"
            )
        elif session.uid in held_out:
            verdicts[session.uid] = Verdict(False, Reason.EVICTED, "evicted on request; `waso resume` brings it back")
        else:
            contenders.append(session)

    holders = [s for s in contenders if admitted_now.get(s.uid, False)]
    used_total = len(holders)
    used_by_tenant = Counter(s.namespace for s in holders)
    for session in holders:
        verdicts[session.uid] = ADMITTED

    for session in sorted((s for s in contenders if s.uid not in verdicts), key=lambda s: s.queue_order):
        limit = tenant_limits.get(session.namespace, 0)
        if used_by_tenant[session.namespace] >= limit:
            verdicts[session.uid] = Verdict(
                False,
                Reason.QUOTA_EXCEEDED,
                f"tenant {session.namespace} uses {used_by_tenant[session.namespace]} of its {limit} sessions "
                "(TenantQuota maxSessions); waiting for a free slot",
            )
        elif used_total >= global_cap:
            verdicts[session.uid] = Verdict(
                False,
                Reason.CAPACITY_EXCEEDED,
                f"the cluster runs {used_total} of at most {global_cap} sessions; waiting for a free slot",
            )
        else:
            used_total += 1
            used_by_tenant[session.namespace] += 1
            verdicts[session.uid] = ADMITTED
    return verdicts
