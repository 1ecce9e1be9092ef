"""Eviction under pressure: idle sessions make room for waiting ones, credentials kept.

Pure functions over the admission verdicts of one pass (``plan_admission``). When a session
waits because its tenant's ``maxSessions`` or the global cap is reached, ``plan_evictions``
picks, for each waiting session in queue order, one admitted session to stop in its place:

- for quota pressure, one of the same tenant; for capacity pressure, one of any tenant;
- never one of higher priority than the waiting session;
- never one active within ``min_idle`` (its last activity, connection or admission);
- lowest priority first, then least recently active (``order``), then namespace/name;
- one per waiting session, and only when no slot is free: a swap keeps the number of
  sessions running, so neither the cap nor a quota is ever exceeded, and a cap or quota
  lowered below its use is left to shrink as sessions end rather than evicting several.

Evicted sessions keep their credentials and their shard, and wait in the admission queue
like refused ones; they resume (in queue order) when room returns, but never evict another
session themselves: an idle session pushing out another idle one is churn. A session a
person evicted (``waso evict``) stays parked until a person resumes it (``waso resume``);
a resumed session is a claimant like a new one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from waso.api.base import format_timestamp
from waso.api.conditions import Reason
from waso.api.session import ACTIVITY_GRANULARITY, EvictionReason, EvictionStatus
from waso.api.tenancy import MemoryReport
from waso.operator.admission import ADMITTED, Verdict, plan_admission
from waso.operator.status import Evicted
from waso.operator.world import SessionFacts

Order = Literal["PriorityThenLeastRecentlyActive", "LeastRecentlyActive"]
PRESSURE = (Reason.CAPACITY_EXCEEDED, Reason.QUOTA_EXCEEDED)


@dataclass(frozen=True)
class EvictionPolicy:
    enabled: bool = True
    min_idle: timedelta = timedelta(minutes=15)
    order: Order = "PriorityThenLeastRecentlyActive"
    flag_parked_after: timedelta = timedelta(days=14)
    memory_fraction: float = 0.9
    memory_resume_fraction: float = 0.75
    memory_settle: timedelta = timedelta(seconds=60)


@dataclass(frozen=True)
class Eviction:
    victim: SessionFacts
    beneficiary: SessionFacts | None
    """The waiting session let in; None for memory pressure."""
    reason: EvictionReason
    idle_since: datetime


@dataclass(frozen=True)
class Requests:
    """What people asked through the annotations, not yet acted on (uids)."""

    evict: Mapping[str, str] = field(default_factory=dict)
    """uid -> token of waso.dev/evict."""
    resume: Mapping[str, str] = field(default_factory=dict)
    """uid -> token of waso.dev/resume."""


def idle_since(session: SessionFacts) -> datetime:
    """The session's last sign of use: its last activity, connection or admission (else its creation).

    ``lastActivityAt`` is reported coarsely: the session may have been active until a granularity
    later, so that is when it counts as last active (never evicted a moment after a message).
    """
    runtime = session.runtime
    moments = [session.created, session.status.admitted_at]
    if runtime is not None:
        active = runtime.last_activity_at + ACTIVITY_GRANULARITY if runtime.last_activity_at else None
        moments += [active, runtime.connected_at]
    return max(moment for moment in moments if moment is not None)


def is_evicted(session: SessionFacts) -> bool:
    """Parked by an eviction (its Admitted condition says Evicted)."""
    admitted = session.admitted_condition
    return admitted is not None and admitted.reason == Reason.EVICTED


def pending(annotation: str | None, handled: str | None) -> str | None:
    """The annotation's token when a person set it and the operator has not acted on it yet."""
    return annotation if annotation and annotation != handled else None


def requests(sessions: Iterable[SessionFacts]) -> Requests:
    evict: dict[str, str] = {}
    resume: dict[str, str] = {}
    for session in sessions:
        if session.evict_request is None and session.resume_request is None:
            continue  # nothing asked (most sessions)
        handled = session.status.eviction or EvictionStatus()
        if token := pending(session.evict_request, handled.handled_evict):
            evict[session.uid] = token
        if token := pending(session.resume_request, handled.handled_resume):
            resume[session.uid] = token
    return Requests(evict, resume)


def held_by_people(sessions: Iterable[SessionFacts], asked: Requests) -> set[str]:
    """Sessions parked by a person: evicted now on request, or evicted on request before and not resumed.

    A resume asked together with an eviction wins: bringing a session back is the safer reading.
    """
    held = set(asked.evict)
    for session in sessions:
        last = session.status.eviction.last_reason if session.status.eviction else None
        if is_evicted(session) and last == EvictionReason.MANUAL:
            held.add(session.uid)
    return held - set(asked.resume)


def claimants(sessions: Iterable[SessionFacts], asked: Requests) -> set[str]:
    """Sessions that may evict another: all but those parked by an eviction (unless a person resumed them)."""
    return {s.uid for s in sessions if not is_evicted(s) or s.uid in asked.resume}


def plan_evictions(
    sessions: Iterable[SessionFacts],
    verdicts: Mapping[str, Verdict],
    tenant_limits: Mapping[str, int],
    global_cap: int,
    policy: EvictionPolicy,
    now: datetime,
    may_claim: Collection[str],
) -> tuple[Eviction, ...]:
    """The evictions that let waiting sessions in, in queue order; see the module's rules."""
    if not policy.enabled:
        return ()
    live = [s for s in sessions if not s.deleting and s.uid in verdicts]
    waiting = sorted(
        (s for s in live if verdicts[s.uid].reason in PRESSURE and s.uid in may_claim), key=lambda s: s.queue_order
    )
    if not waiting:
        return ()  # nobody waits for a slot (the usual pass): no victims to rank
    holders = [s for s in live if verdicts[s.uid].admitted]
    used_total = len(holders)
    used_by_tenant = Counter(s.namespace for s in holders)
    idle = {s.uid: idle_since(s) for s in holders}
    evictable = sorted(  # a session admitted in this very pass is not idle: it has not even started
        (s for s in holders if s.admitted and now - idle[s.uid] >= policy.min_idle),
        key=lambda s: _victim_order(s, idle[s.uid], policy.order),
    )
    taken: set[str] = set()
    evictions: list[Eviction] = []
    for claimant in waiting:
        if used_total > global_cap:
            break  # the cap was lowered below its use: let it shrink, a swap would keep it exceeded
        limit = tenant_limits.get(claimant.namespace, 0)
        quota_full = used_by_tenant[claimant.namespace] >= limit
        if used_by_tenant[claimant.namespace] > limit:
            continue  # the same for a quota lowered below its use
        if not quota_full and used_total < global_cap:
            continue  # room without evicting: admission's business (never the case right after it)
        victim = next(
            (
                s
                for s in evictable
                if s.uid not in taken
                and s.priority <= claimant.priority
                and (not quota_full or s.namespace == claimant.namespace)
            ),
            None,
        )
        if victim is None:
            continue
        taken.add(victim.uid)
        used_by_tenant[victim.namespace] -= 1
        used_by_tenant[claimant.namespace] += 1
        reason = EvictionReason.QUOTA_PRESSURE if quota_full else EvictionReason.CAPACITY_PRESSURE
        evictions.append(Eviction(victim, claimant, reason, idle[victim.uid]))
    return tuple(evictions)


def memory_evictions(
    sessions: Iterable[SessionFacts],
    verdicts: Mapping[str, Verdict],
    reports: Iterable[MemoryReport],
    policy: EvictionPolicy,
    now: datetime,
    spared: Collection[str] = (),
) -> tuple[Eviction, ...]:
    """Sessions to park on pods near their memory limit, least recently used idle ones first.

    As many as should bring the pod down to the resume fraction, estimating a session's share as
    the pod's use over its running sessions (an overestimate: the runtime's own memory is in it, so
    this parks too few rather than too many). After parking, a pod waits for a report taken
    ``memory_settle`` later before parking more: freed memory reaches the kernel's count late.
    """
    pressed = [r for r in reports if r.fraction >= policy.memory_fraction]
    if not policy.enabled or not pressed:
        return ()
    by_shard: dict[tuple[str, int], list[SessionFacts]] = {}
    for session in sessions:
        if session.shard is not None and not session.deleting:
            by_shard.setdefault((session.namespace, session.shard), []).append(session)
    evictions: list[Eviction] = []
    for report in sorted(pressed, key=lambda r: (r.namespace, r.shard)):
        on_shard = by_shard.get((report.namespace, report.shard), [])
        if not on_shard:
            continue
        parked_at = [s.status.evicted_at for s in on_shard if _parked_for_memory(s) and s.status.evicted_at]
        if parked_at and report.at < max(parked_at) + policy.memory_settle:
            continue
        running = [s for s in on_shard if s.admitted and verdicts.get(s.uid, ADMITTED).admitted]
        if not running:
            continue
        excess = report.used - policy.memory_resume_fraction * report.limit
        count = math.ceil(excess / (report.used / len(running)))
        idle = {s.uid: idle_since(s) for s in running}
        candidates = sorted(
            (s for s in running if s.uid not in spared and now - idle[s.uid] >= policy.min_idle),
            key=lambda s: _victim_order(s, idle[s.uid], policy.order),
        )
        evictions += [Eviction(s, None, EvictionReason.MEMORY_PRESSURE, idle[s.uid]) for s in candidates[:count]]
    return tuple(evictions)


def held_for_memory(
    sessions: Iterable[SessionFacts], reports: Iterable[MemoryReport], policy: EvictionPolicy
) -> set[str]:
    """Sessions parked for memory whose pod is not yet back below the resume fraction."""
    pressed = {(r.namespace, r.shard) for r in reports if r.fraction >= policy.memory_resume_fraction}
    if not pressed:
        return set()
    return {s.uid for s in sessions if _parked_for_memory(s) and (s.namespace, s.shard) in pressed}


def _parked_for_memory(session: SessionFacts) -> bool:
    eviction = session.status.eviction
    return is_evicted(session) and eviction is not None and eviction.last_reason == EvictionReason.MEMORY_PRESSURE


def _victim_order(session: SessionFacts, idle: datetime, order: Order) -> tuple[int, datetime, str, str]:
    priority = session.priority if order == "PriorityThenLeastRecentlyActive" else 0
    return (priority, idle, session.namespace, session.name)


def evicted_status(before: EvictionStatus | None, eviction: Eviction) -> EvictionStatus:
    before = before or EvictionStatus()
    return before.model_copy(
        update={
            "count": before.count + 1,
            "last_reason": eviction.reason,
            "slot_taken_by": eviction.beneficiary.key if eviction.beneficiary else None,
            "idle_since": eviction.idle_since,
        }
    )


def parked_verdict(status: EvictionStatus, evicted_at: datetime | None) -> Verdict:
    """The admission verdict of an evicted session; built from its status alone, so it reads the same every pass."""
    when = f" at {format_timestamp(evicted_at)}" if evicted_at is not None else ""
    if status.last_reason == EvictionReason.MANUAL:
        message = f"evicted{when} on request; credentials kept; `waso resume` brings it back"
    elif status.last_reason == EvictionReason.MEMORY_PRESSURE:
        idle = f", idle since {format_timestamp(status.idle_since)}" if status.idle_since is not None else ""
        message = (
            f"evicted{when} (MemoryPressure{idle}): its session pod neared its memory limit; credentials kept; "
            "resumes when the pod is back below the resume fraction, or now with `waso resume`"
        )
    else:
        idle = f", idle since {format_timestamp(status.idle_since)}" if status.idle_since is not None else ""
        taker = f" for {status.slot_taken_by}" if status.slot_taken_by else ""
        message = (
            f"evicted{when} ({status.last_reason}{idle}){taker}; credentials kept; "
            "resumes in queue order when room returns, or now with `waso resume`"
        )
    return Verdict(False, Reason.EVICTED, message)


@dataclass(frozen=True)
class Admission:
    """One pass's admission with evictions: the verdicts, and the eviction records to write."""

    verdicts: dict[str, Verdict]
    records: dict[str, Evicted]
    """uid -> the eviction status (and time) to write: new evictions and handled requests."""
    evictions: tuple[Eviction, ...]


def admit(
    sessions: Sequence[SessionFacts],
    admitted_now: Mapping[str, bool],
    tenant_limits: Mapping[str, int],
    global_cap: int,
    policy: EvictionPolicy,
    now: datetime,
    memory: Iterable[MemoryReport] = (),
) -> Admission:
    """Admission (``plan_admission``), the evictions that let waiting sessions in, those that relieve pods
    near their memory limit, and the requests of people."""
    reports = list(memory)
    asked = requests(sessions)
    held = held_by_people(sessions, asked) | (held_for_memory(sessions, reports, policy) - set(asked.resume))
    holding = {uid: admitted and uid not in held for uid, admitted in admitted_now.items()}
    verdicts = plan_admission(sessions, holding, tenant_limits, global_cap, held)
    waiting = [s for s in sessions if s.uid in verdicts and verdicts[s.uid].reason in PRESSURE]
    evictions = plan_evictions(sessions, verdicts, tenant_limits, global_cap, policy, now, claimants(waiting, asked))
    for eviction in evictions:
        if eviction.beneficiary is not None:
            verdicts[eviction.beneficiary.uid] = ADMITTED
    involved = {e.victim.uid for e in evictions} | {e.beneficiary.uid for e in evictions if e.beneficiary}
    evictions += memory_evictions(sessions, verdicts, reports, policy, now, spared=involved)

    records: dict[str, Evicted] = {}
    for eviction in evictions:
        victim = eviction.victim
        records[victim.uid] = Evicted(evicted_status(victim.status.eviction, eviction), now)
    victims = {eviction.victim.uid for eviction in evictions}
    for session in sessions:
        uid = session.uid
        if uid not in verdicts:
            continue  # being deleted
        concerned = uid in asked.evict or uid in asked.resume or uid in victims or uid in held
        if not concerned and not is_evicted(session):
            continue  # neither asked about, nor parked, nor evicted now (most sessions): nothing to record
        before = session.status.eviction or EvictionStatus()
        record = records.get(uid) or Evicted(before, session.status.evicted_at)
        if uid in asked.evict:
            handled = record.status.model_copy(update={"handled_evict": asked.evict[uid]})
            if uid in held and not (is_evicted(session) and before.last_reason == EvictionReason.MANUAL):
                manual = Eviction(session, None, EvictionReason.MANUAL, idle_since(session))
                record = Evicted(evicted_status(handled, manual), now)
            else:
                record = Evicted(handled, record.at)
        if uid in asked.resume:
            record = Evicted(record.status.model_copy(update={"handled_resume": asked.resume[uid]}), record.at)
        if uid in asked.evict or uid in asked.resume:
            records[uid] = record
        resumed = uid in asked.resume
        stays_parked = is_evicted(session) and not resumed and verdicts[uid].reason in PRESSURE
        if uid in victims or uid in held or stays_parked:
            verdicts[uid] = parked_verdict(record.status, record.at)
    return Admission(verdicts, records, evictions)


@dataclass(frozen=True)
class Slots:
    """What one whole-cluster admission left, enough to decide new sessions without the others (``admit_new``)."""

    used: int
    used_by_tenant: Mapping[str, int]
    phone_numbers: frozenset[str]
    """Claimed by the sessions that are not being deleted."""
    queue: bool
    """Whether a session waits for a slot or is parked, or a pod is near its memory limit: then a new session's
    turn depends on the others."""


def slots_left(
    sessions: Iterable[SessionFacts],
    admission: Admission,
    memory: Iterable[MemoryReport],
    policy: EvictionPolicy,
) -> Slots:
    verdicts = admission.verdicts
    holders = [s for s in sessions if s.uid in verdicts and verdicts[s.uid].admitted]
    queue = (
        bool(admission.evictions)
        or any(v.reason in PRESSURE or v.reason == Reason.EVICTED for v in verdicts.values())
        or any(report.fraction >= policy.memory_resume_fraction for report in memory)
    )
    return Slots(
        used=len(holders),
        used_by_tenant=Counter(s.namespace for s in holders),
        phone_numbers=frozenset(s.phone_number for s in sessions if not s.deleting),
        queue=queue,
    )


def admit_new(
    sessions: Sequence[SessionFacts], slots: Slots, tenant_limits: Mapping[str, int], global_cap: int
) -> dict[str, Verdict] | None:
    """The verdicts ``admit`` gives sessions created since the admission that left ``slots``, where they can be told
    without the others: nobody waits and nothing is parked, each is new (never decided, nothing asked, not
    suspended), claims a phone number nobody else does, and finds room in its tenant and the cluster. Then every
    one of them is admitted and no other verdict changes; None where the whole cluster must be decided again."""
    if slots.queue:
        return None
    numbers = Counter(s.phone_number for s in sessions)
    for session in sessions:
        fresh = not session.admitted and session.admitted_condition is None and session.status.eviction is None
        asked = session.evict_request or session.resume_request or session.repair_request or session.rollback_request
        if not fresh or asked or session.deleting or session.suspend:
            return None
        if session.phone_number in slots.phone_numbers or numbers[session.phone_number] > 1:
            return None
    new_by_tenant = Counter(s.namespace for s in sessions)
    if slots.used + len(sessions) > global_cap:
        return None
    for namespace, count in new_by_tenant.items():
        if slots.used_by_tenant.get(namespace, 0) + count > tenant_limits.get(namespace, 0):
            return None
    return {s.uid: ADMITTED for s in sessions}


def after_admitting(slots: Slots, sessions: Iterable[SessionFacts]) -> Slots:
    """The slots once ``sessions`` (verdicts of ``admit_new``) hold theirs."""
    admitted = list(sessions)
    return Slots(
        used=slots.used + len(admitted),
        used_by_tenant=Counter(slots.used_by_tenant) + Counter(s.namespace for s in admitted),
        phone_numbers=slots.phone_numbers | {s.phone_number for s in admitted},
        queue=slots.queue,
    )
