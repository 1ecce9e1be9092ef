"""Repair: which sessions get their credential store backed up, reset and re-paired now.

The old gateway cleared every session whose device number was above 10, all at once:
device numbers above 10 are normal, and clearing many sessions together caused backup
storms and took healthy tenants down with the broken one. So a repair here is rare,
throttled and explainable. A pure function of plain records decides it for the whole
cluster at once; the controller executes the starts and reports the rest.

Rules:

1. Only a broken identity is repaired automatically: ``MissingIdentity``, ``MalformedJid``,
   ``IdentityMismatch`` and the opt-in ``DeviceIdAbovePolicy``. A healthy or unknown
   session never is, and neither is ``LoggedOut`` (the runtime re-pairs it by itself).
2. Automatic repair can be switched off globally and per tenant; the session then waits
   with a message saying so.
3. A per-session cooldown (since its last repair started) spaces repairs out.
4. Loop protection: more than ``loop_limit`` repairs started within ``loop_window`` means
   the repair does not fix the cause. The session is ``Stalled`` and stays so until a
   person acts (a manual repair); waiting does not forgive a loop.
5. A manual request (``waso repair`` or the annotation) bypasses rules 1-4: a person asked.
6. Nothing bypasses the cluster-wide limit of repairs in flight: repairs already in flight
   count against it and are never started twice.
7. Fairness: when slots are scarce they are shared between tenants like a round-robin:
   the tenant with the fewest repairs in flight (those already running included) goes
   next, ties by its oldest pending need, then namespace; within a tenant the oldest need
   goes first, ties by namespace/name. One tenant with many broken sessions cannot take
   every slot, neither in one pass nor over many passes.

The output is the same for the same input, in any order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from waso.api.conditions import Reason
from waso.api.session import RepairBackup, RepairRequest, RepairStatus, RuntimeStatus

REPAIRABLE: frozenset[Reason] = frozenset(
    {Reason.MISSING_IDENTITY, Reason.MALFORMED_JID, Reason.IDENTITY_MISMATCH, Reason.DEVICE_ID_ABOVE_POLICY}
)
"""Health reasons that a new pairing fixes. LoggedOut is absent: the runtime re-pairs it by itself."""

MANUAL = "Manual"
"""The reason of a repair a person asked for."""


@dataclass(frozen=True)
class RepairPolicy:
    """The operator's throttles; the defaults are safe for a cluster of many tenants."""

    enabled: bool = True
    """Automatic repair at all (manual requests are honoured either way)."""
    max_in_flight: int = 3
    """Repairs running at once across the cluster: backups are heavy, ten at once is a storm."""
    cooldown: timedelta = timedelta(minutes=10)
    """Least time between two automatic repairs of one session, from the start of the last."""
    loop_limit: int = 3
    """More repairs than this within loop_window: the repair does not help, stop and ask a person."""
    loop_window: timedelta = timedelta(hours=1)
    keep_backups: int = 3
    """Credential-store backups kept per session (see backups_to_drop)."""


@dataclass(frozen=True)
class RepairCandidate:
    """What the decision needs to know about one session."""

    uid: str
    namespace: str
    """The tenant."""
    name: str
    health: Reason | None
    """The DeviceHealthy reason; only the reasons in REPAIRABLE ask for a repair (None: healthy or unknown)."""
    tenant_auto_repair: bool = True
    """The tenant's switch for automatic repair."""
    in_flight: bool = False
    """A repair was started and has not completed: it holds a slot."""
    repair_starts: tuple[datetime, ...] = ()
    """When this session's repairs started (any order); at least the newest loop_limit + 1."""
    acted_at: datetime | None = None
    """When a person last repaired it by hand: repairs up to then no longer count towards a loop."""
    manual_request: str | None = None
    """An unhandled request token from `waso repair` or the annotation."""
    needed_since: datetime | None = None
    """When the need began (DeviceHealthy turned False, or the manual request was made): older goes first."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RepairStart:
    """A repair to start now: back up the credential store, reset it, re-pair."""

    uid: str
    namespace: str
    name: str
    reason: str
    """The health reason, or MANUAL when a person asked."""
    manual_request: str | None = None
    """The token to mark as handled once the start is recorded."""


@dataclass(frozen=True)
class RepairPlan:
    start: tuple[RepairStart, ...]
    """In the order chosen."""
    stalled: Mapping[str, str]
    """uid -> message: repaired too often, stopped until a person acts."""
    waiting: Mapping[str, str]
    """uid -> message: why a session that needs a repair is not repaired now."""
    wake_at: datetime | None = None
    """When the first cooldown of a waiting session ends: a pass must look again then."""


def plan_repairs(candidates: Iterable[RepairCandidate], policy: RepairPolicy, now: datetime) -> RepairPlan:
    """Decide the repairs to start now; every session that needs one and gets none is told why."""
    ordered = sorted(candidates, key=_need_order)
    in_flight = [c for c in ordered if c.in_flight]
    stalled: dict[str, str] = {}
    waiting: dict[str, str] = {}
    queues: dict[str, list[RepairCandidate]] = defaultdict(list)
    cooldowns: list[datetime] = []

    for candidate in ordered:
        if candidate.in_flight:
            if candidate.manual_request is not None:
                waiting[candidate.uid] = "a repair of this session is in flight; the request runs after it"
        elif candidate.manual_request is not None:
            queues[candidate.namespace].append(candidate)
        elif candidate.health in REPAIRABLE:
            why_not, loop, until = _why_not_automatic(candidate, policy, now)
            if loop:
                stalled[candidate.uid] = why_not
            elif why_not:
                waiting[candidate.uid] = why_not
                if until is not None:
                    cooldowns.append(until)
            else:
                queues[candidate.namespace].append(candidate)

    load: dict[str, int] = defaultdict(int)
    for candidate in in_flight:
        load[candidate.namespace] += 1
    free = policy.max_in_flight - len(in_flight)
    start: list[RepairStart] = []
    while free > 0 and any(queues.values()):
        tenant = min((t for t, q in queues.items() if q), key=lambda t: (load[t], _need_order(queues[t][0])))
        chosen = queues[tenant].pop(0)
        reason = MANUAL if chosen.manual_request is not None else str(chosen.health)
        start.append(RepairStart(chosen.uid, chosen.namespace, chosen.name, reason, chosen.manual_request))
        load[tenant] += 1
        free -= 1

    for queue in queues.values():
        for candidate in queue:
            # No live count in the text: it would rewrite every waiting session's status at each start and end.
            waiting[candidate.uid] = (
                f"waiting for a repair slot (at most {policy.max_in_flight} repairs in flight across the cluster)"
            )
    return RepairPlan(tuple(start), stalled, waiting, min(cooldowns, default=None))


def backups_to_drop(backups: Mapping[str, datetime], policy: RepairPolicy) -> tuple[str, ...]:
    """The backup ids to delete so that the newest keep_backups remain, oldest first.

    Bounded so that a session that is repaired again and again cannot fill its volume.
    """
    newest_first = sorted(backups, key=lambda b: (backups[b], b), reverse=True)
    return tuple(reversed(newest_first[max(policy.keep_backups, 0) :]))


def loop_count(starts: Sequence[datetime], window: timedelta) -> int:
    """The most starts within any one window (both ends included)."""
    ordered = sorted(starts)
    best = first = 0
    for last, started in enumerate(ordered):
        while started - ordered[first] > window:
            first += 1
        best = max(best, last - first + 1)
    return best


def _why_not_automatic(
    candidate: RepairCandidate, policy: RepairPolicy, now: datetime
) -> tuple[str, bool, datetime | None]:
    """Why a broken session may not be repaired automatically now ("" if it may), whether it is a loop,
    and when a cooldown ends."""
    if not policy.enabled:
        return f"automatic repair is off globally; run `waso repair {candidate.key}`", False, None
    if not candidate.tenant_auto_repair:
        message = f"automatic repair is off for tenant {candidate.namespace}; run `waso repair {candidate.key}`"
        return message, False, None
    counted = [t for t in candidate.repair_starts if candidate.acted_at is None or t > candidate.acted_at]
    repeats = loop_count(counted, policy.loop_window)
    if repeats > policy.loop_limit:
        return (
            (
                f"{repeats} repairs within {_duration(policy.loop_window)}: automatic repair stopped; "
                f"run `waso repair {candidate.key}` after fixing the cause"
            ),
            True,
            None,
        )
    if candidate.repair_starts:
        until = max(candidate.repair_starts) + policy.cooldown
        if now < until:
            return (
                (
                    f"cooldown until {_timestamp(until)}: repairs of one session start at least "
                    f"{_duration(policy.cooldown)} apart"
                ),
                False,
                until,
            )
    return "", False, None


def _need_order(candidate: RepairCandidate) -> tuple[bool, datetime, str, str]:
    """Oldest need first; a need of unknown age after every known one; then namespace/name."""
    since = candidate.needed_since
    return (since is None, since or datetime.min.replace(tzinfo=UTC), candidate.namespace, candidate.name)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(span: timedelta) -> str:
    """Like Go's durations, which operators read in kubectl: 1h0m, 10m, 45s."""
    seconds = int(span.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m" + (f"{seconds}s" if seconds else "")
    if minutes:
        return f"{minutes}m" + (f"{seconds}s" if seconds else "")
    return f"{seconds}s"


# -- the status of repairs: what the controller writes around a plan ----------------------------


def settle(repairs: RepairStatus, runtime: RuntimeStatus | None, policy: RepairPolicy) -> RepairStatus:
    """Fold a repair the runtime reports done into the status: count, last reason and time, kept backups."""
    request = repairs.requested
    done = runtime.last_repair if runtime is not None else None
    if request is None or done is None or done.id != request.id:
        return repairs
    backups = repairs.backups
    if done.backup is not None and done.error is None:
        backups = (*backups, RepairBackup(name=done.backup, taken_at=done.completed_at))
        dropped = set(backups_to_drop({b.name: b.taken_at for b in backups}, policy))
        backups = tuple(b for b in backups if b.name not in dropped)
    reason = request.reason if done.error is None else f"{request.reason}: {done.error}"
    if request.backup is not None:  # a rollback: nothing was backed up or counted
        return repairs.model_copy(update={"last_reason": reason[:1024], "requested": None})
    return repairs.model_copy(
        update={
            "count": repairs.count + (done.error is None),
            "last_reason": reason[:1024],
            "last_time": request.requested_at,
            "backups": backups,
            "requested": None,
        }
    )


def begin(repairs: RepairStatus, start: RepairStart, now: datetime) -> RepairStatus:
    """Ask the runtime for a repair: the request (its id names the backup) and its start time."""
    manual = start.manual_request is not None
    request = RepairRequest(
        id=f"repair-{repairs.count + 1}-{now.astimezone(UTC):%Y%m%dt%H%M%S}", reason=start.reason, requested_at=now
    )
    return repairs.model_copy(
        update={
            "requested": request,
            "starts": (*(repairs.starts or ()), now)[-20:],
            "handled_request": start.manual_request if manual else repairs.handled_request,
            "acted_at": now if manual else repairs.acted_at,
        }
    )


def pending_request(annotation: str | None, repairs: RepairStatus) -> str | None:
    """The manual request not yet acted on (a new value of the annotation)."""
    return annotation if annotation and annotation != repairs.handled_request else None


ROLLBACK = "Rollback"


def rollback(repairs: RepairStatus, annotation: str | None, now: datetime) -> tuple[RepairStatus, str | None]:
    """A rollback asked for by a person (``<backup id or latest>#<token>``), when nothing else is in flight.

    Returns the status with the request (or with the request marked handled and refused) and,
    when refused, why.
    """
    if not annotation or annotation == repairs.handled_rollback or repairs.requested is not None:
        return repairs, None
    wanted = annotation.partition("#")[0] or "latest"
    kept = [b.name for b in repairs.backups]
    backup = kept[-1] if wanted == "latest" and kept else wanted
    if backup not in kept:
        handled = repairs.model_copy(update={"handled_rollback": annotation})
        known = ", ".join(kept) or "none"
        return handled, f"no backup {wanted!r} is kept for this session (kept: {known})"
    request = RepairRequest(
        id=f"rollback-{now.astimezone(UTC):%Y%m%dt%H%M%S}", reason=ROLLBACK, requested_at=now, backup=backup
    )
    return repairs.model_copy(update={"requested": request, "handled_rollback": annotation, "acted_at": now}), None
