"""The operator-owned part of a session's status, as a pure function of what is known.

Conditions are rebuilt from the observed ones on every pass, so transition times are
kept and an unchanged world yields an identical status (the controller then writes
nothing). ``status.runtime`` belongs to the session runtime and is only read here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from waso.api.base import format_timestamp
from waso.api.conditions import (
    Condition,
    ConditionStatus,
    ConditionType,
    Progress,
    Reason,
    find_condition,
    remove_condition,
    set_condition,
    set_kstatus,
)
from waso.api.quota import QuotaAmounts, TenantQuotaStatus
from waso.api.session import EvictionStatus, Phase, RepairStatus, RuntimeState, RuntimeStatus, WhatsAppSessionStatus
from waso.api.tenancy import Heartbeat, QuotaFacts
from waso.operator.admission import Verdict
from waso.operator.health import Health, device_health
from waso.operator.world import PodFacts, SessionFacts

RUNTIME_PORT = 8080
_WAITING = {Reason.QUOTA_EXCEEDED, Reason.CAPACITY_EXCEEDED}


def runtime_endpoint(namespace: str, name: str, shard: int) -> str:
    return f"http://waso-sessions-{shard}.waso-sessions.{namespace}.svc:{RUNTIME_PORT}/v1/sessions/{name}"


def _paired(runtime: RuntimeStatus | None, before: Condition | None) -> tuple[ConditionStatus, Reason, str]:
    if runtime is None or runtime.state is None:
        return "Unknown", Reason.NO_RUNTIME_REPORT, "no session runtime has reported yet"
    if runtime.stored_jid:
        return "True", Reason.PAIRED, f"credentials stored for {runtime.stored_jid}"
    logged_out = before is not None and before.status == "False" and before.reason == Reason.LOGGED_OUT
    if runtime.state == RuntimeState.LOGGED_OUT or logged_out:  # until paired again, that is why
        return "False", Reason.LOGGED_OUT, "WhatsApp logged the device out; pair it again"
    return "False", Reason.NOT_PAIRED, "no credentials stored: scan the QR code or enter the pairing code"


def out_of_memory_message(pod: PodFacts) -> str:
    limit = f" of {pod.memory_limit}" if pod.memory_limit else ""
    return (
        f"session pod {pod.name} was killed at its memory limit{limit} (OOMKilled, {pod.restarts} restarts); "
        "raise spec.podResources.limits.memory of the namespace's TenantQuota"
    )


_LIVE_STATES = frozenset({RuntimeState.CONNECTED, RuntimeState.CONNECTING, RuntimeState.AWAITING_PAIRING})


def _freshest(heartbeats: Iterable[Heartbeat]) -> dict[tuple[str, int], Heartbeat]:
    freshest: dict[tuple[str, int], Heartbeat] = {}
    for beat in heartbeats:
        key = (beat.namespace, beat.shard)
        if key not in freshest or beat.renewed > freshest[key].renewed:
            freshest[key] = beat
    return freshest


def silent_shards(heartbeats: Iterable[Heartbeat], now: datetime) -> dict[tuple[str, int], Heartbeat]:
    """The shards whose runtime stopped renewing its heartbeat, by (namespace, shard): its freshest Lease expired.

    A shard with no heartbeat at all is not here: that runtime never said it was alive (or predates heartbeats)."""
    return {key: beat for key, beat in _freshest(heartbeats).items() if beat.expires < now}


def next_silence(heartbeats: Iterable[Heartbeat], now: datetime) -> datetime | None:
    """When the next shard falls silent unless its runtime renews its heartbeat before (None: no live shard)."""
    return min((beat.expires for beat in _freshest(heartbeats).values() if beat.expires >= now), default=None)


def heartbeat_lost_message(beat: Heartbeat, runtime: RuntimeStatus) -> str:
    state = runtime.state.value if runtime.state else "unknown"
    return (
        f"the runtime of shard {beat.shard} last renewed its heartbeat at {format_timestamp(beat.renewed)}: "
        f"its pod, node or network is down, so its last report ({state}) is stale and the device is likely offline"
    )


def _lost(runtime: RuntimeStatus | None, silent: Heartbeat | None) -> bool:
    return silent is not None and runtime is not None and runtime.state in _LIVE_STATES


def _connected(
    runtime: RuntimeStatus | None, pod: PodFacts | None, silent: Heartbeat | None = None
) -> tuple[ConditionStatus, Reason, str]:
    if pod is not None and pod.out_of_memory:  # the runtime's own report is stale: its process was killed
        return "False", Reason.OUT_OF_MEMORY, out_of_memory_message(pod)
    if runtime is None or runtime.state is None:
        return "Unknown", Reason.NO_RUNTIME_REPORT, "no session runtime has reported yet"
    if silent is not None and _lost(runtime, silent):
        return "Unknown", Reason.HEARTBEAT_LOST, heartbeat_lost_message(silent, runtime)
    if runtime.state == RuntimeState.CONNECTED:
        return "True", Reason.CONNECTED, f"connected as {runtime.jid}" if runtime.jid else "connected"
    if runtime.state == RuntimeState.BANNED:
        return "False", Reason.BANNED, runtime.last_error or "WhatsApp temporarily banned the account"
    if runtime.state == RuntimeState.LOGGED_OUT:
        return "False", Reason.LOGGED_OUT, runtime.last_error or "logged out"
    detail = f": {runtime.last_error}" if runtime.last_error else ""
    return "False", Reason.DISCONNECTED, f"runtime state {runtime.state.value}{detail}"


def _banned(runtime: RuntimeStatus | None, now: datetime) -> tuple[Progress, str, str, Phase]:
    """A ban with a known end clears by itself (Reconciling); one without needs a person (Stalled)."""
    until = runtime.banned_until if runtime else None
    if until is None:
        detail = (runtime and runtime.last_error) or "temporarily banned"
        return "Stalled", Reason.BANNED, f"{detail}; WhatsApp gave no end time", Phase.FAILED
    if until > now:
        message = f"temporarily banned by WhatsApp until {format_timestamp(until)}; the runtime reconnects then"
    else:
        message = f"the ban ended at {format_timestamp(until)}; reconnecting"
    return "Reconciling", Reason.BANNED, message, Phase.BANNED


def _summary(
    verdict: Verdict,
    runtime: RuntimeStatus | None,
    health: Health,
    pod: PodFacts | None,
    now: datetime,
    repairs: RepairStatus | None,
    repair_stalled: str | None,
    repair_waiting: str | None,
    silent: Heartbeat | None = None,
) -> tuple[Progress, str, str, Phase]:
    if verdict.reason == Reason.PHONE_NUMBER_CONFLICT:
        return "Stalled", verdict.reason, verdict.message, Phase.FAILED
    if verdict.reason == Reason.SUSPENDED:
        return "Ready", Reason.SUSPENDED, "suspended as the spec asks", Phase.SUSPENDED
    if verdict.reason == Reason.DELETING:
        return "Reconciling", verdict.reason, verdict.message, Phase.DELETING
    if verdict.reason in _WAITING:
        return "Reconciling", verdict.reason, verdict.message, Phase.WAITING
    if verdict.reason == Reason.EVICTED:
        return "Reconciling", verdict.reason, verdict.message, Phase.EVICTED
    if pod is not None and pod.out_of_memory:  # does not heal by itself: a person raises the limit
        return "Stalled", Reason.OUT_OF_MEMORY, out_of_memory_message(pod), Phase.FAILED
    if repairs is not None and repairs.requested is not None:
        request = repairs.requested
        if request.backup is not None:
            message = f"{request.id}: restoring backup {request.backup}; the session reconnects without a new scan"
        else:
            message = f"repair {request.id} ({request.reason}): backing up and resetting the credential store"
        return "Reconciling", Reason.REPAIRING, message, Phase.REPAIRING
    if repair_stalled is not None:
        return "Stalled", Reason.REPAIR_LOOP, repair_stalled, Phase.FAILED
    if health.healthy is False:
        message = f"{health.message}; repair: {repair_waiting}" if repair_waiting else health.message
        return "Stalled", health.reason, message, Phase.FAILED
    if silent is not None and runtime is not None and _lost(runtime, silent):  # comes back with its pod or node
        return "Reconciling", Reason.HEARTBEAT_LOST, heartbeat_lost_message(silent, runtime), Phase.DISCONNECTED
    state = runtime.state if runtime else None
    if state is None or state in (RuntimeState.STOPPED, RuntimeState.CONNECTING):
        return "Reconciling", Reason.PROGRESSING, "admitted; waiting for the session runtime to connect", Phase.STARTING
    if state == RuntimeState.AWAITING_PAIRING:
        return (
            "Reconciling",
            Reason.NOT_PAIRED,
            "waiting for pairing: scan the QR code or enter the code",
            Phase.PAIRING,
        )
    if state == RuntimeState.BANNED:
        return _banned(runtime, now)
    if state == RuntimeState.CONNECTED and health.healthy:
        return "Ready", Reason.READY, "connected and healthy", Phase.CONNECTED
    if state == RuntimeState.LOGGED_OUT:
        return "Reconciling", Reason.LOGGED_OUT, "logged out by WhatsApp; waiting for a new pairing", Phase.DISCONNECTED
    return "Reconciling", Reason.DISCONNECTED, "reconnecting", Phase.DISCONNECTED


DELETING = Verdict(
    False, Reason.DELETING, "being deleted: the session runtime unlinks the device and erases its credentials"
)


def desired_status(
    facts: SessionFacts,
    verdict: Verdict,
    shard: int | None,
    now: datetime,
    max_device_id: int | None = None,
    pod: PodFacts | None = None,
    repairs: RepairStatus | None = None,
    repair_stalled: str | None = None,
    repair_waiting: str | None = None,
    eviction: Evicted | None = None,
    flag_parked_after: timedelta = timedelta(days=14),
    silent: Heartbeat | None = None,
) -> WhatsAppSessionStatus:
    """The operator's part of the status (all but ``runtime``); ``pod`` is the session pod of ``shard``, and
    ``silent`` its expired heartbeat, if the runtime of ``shard`` stopped renewing it."""
    generation = facts.generation
    runtime = facts.runtime
    health = device_health(runtime, max_device_id)
    conditions = facts.status.conditions

    def put(type_: str, status: ConditionStatus, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, status, reason, message, observed_generation=generation, now=now)

    put(ConditionType.ADMITTED, "True" if verdict.admitted else "False", verdict.reason, verdict.message)
    conditions = _parked(conditions, verdict, generation, now, flag_parked_after)
    put(ConditionType.PAIRED, *_paired(runtime, find_condition(conditions, ConditionType.PAIRED)))
    put(ConditionType.CONNECTED, *_connected(runtime, pod, silent))
    healthy: ConditionStatus = "Unknown" if health.healthy is None else ("True" if health.healthy else "False")
    put(ConditionType.DEVICE_HEALTHY, healthy, health.reason, health.message)
    repairs = repairs if repairs is not None else facts.status.repairs
    progress, reason, message, phase = _summary(
        verdict, runtime, health, pod, now, repairs, repair_stalled, repair_waiting, silent
    )
    conditions = set_kstatus(conditions, progress, reason, message, observed_generation=generation, now=now)

    admitted_at = facts.status.admitted_at
    if verdict.admitted and (not facts.admitted or admitted_at is None):
        admitted_at = now
    return operator_part(facts.status).model_copy(
        update={
            "phase": phase,
            "conditions": conditions,
            "observed_generation": generation,
            "shard": shard,
            "endpoint": runtime_endpoint(facts.namespace, facts.name, shard) if shard is not None else None,
            "admitted_at": admitted_at,
            "repairs": repairs,
            "eviction": eviction.status if eviction is not None else facts.status.eviction,
            "evicted_at": eviction.at if eviction is not None else facts.status.evicted_at,
        }
    )


@dataclass(frozen=True)
class Evicted:
    """The eviction record to write with this pass's status."""

    status: EvictionStatus
    at: datetime | None


def _parked(
    conditions: tuple[Condition, ...], verdict: Verdict, generation: int, now: datetime, flag_after: timedelta
) -> tuple[Condition, ...]:
    """``Parked`` while evicted or suspended, since the Admitted condition turned so; flagged past ``flag_after``."""
    if verdict.reason not in (Reason.EVICTED, Reason.SUSPENDED):
        return remove_condition(conditions, ConditionType.PARKED)
    since = parked_since(conditions) or now
    reason, message = verdict.reason.value, f"parked since {format_timestamp(since)}; credentials kept"
    if now - since >= flag_after:
        reason = Reason.PARKED_TOO_LONG
        message = (
            f"parked since {format_timestamp(since)}, longer than {flag_after.days} days: WhatsApp logs out a "
            "linked device whose phone went unused for 14 days and unlinks one offline for 30 days; "
            "resume it, or expect a new scan"
        )
    return set_condition(
        conditions, ConditionType.PARKED, "True", reason, message, observed_generation=generation, now=now
    )


def operator_part(status: WhatsAppSessionStatus) -> WhatsAppSessionStatus:
    """The fields of a session's status that the operator owns: all but ``runtime``."""
    return status.model_copy(update={"runtime": None})


def desired_quota_status(
    quota: QuotaFacts, honoured: QuotaFacts | None, used_sessions: int, now: datetime
) -> TenantQuotaStatus:
    """Status of one TenantQuota: usage when it is the one in force, Conflict when an older one is."""
    conditions = quota.status.conditions
    generation = quota.generation
    if honoured is None or honoured.uid == quota.uid:
        conditions = set_condition(
            conditions,
            ConditionType.CONFLICT,
            "False",
            Reason.HONOURED,
            "this quota applies to the namespace",
            observed_generation=generation,
            now=now,
        )
        conditions = set_kstatus(
            conditions, "Ready", Reason.HONOURED, "in force", observed_generation=generation, now=now
        )
        hard: QuotaAmounts | None = QuotaAmounts(sessions=quota.spec.max_sessions)
        used: QuotaAmounts | None = QuotaAmounts(sessions=used_sessions)
    else:
        message = f"TenantQuota {honoured.name} is older and is the one in force; delete this one"
        conditions = set_condition(
            conditions,
            ConditionType.CONFLICT,
            "True",
            Reason.OLDER_QUOTA_EXISTS,
            message,
            observed_generation=generation,
            now=now,
        )
        conditions = set_kstatus(
            conditions, "Stalled", Reason.OLDER_QUOTA_EXISTS, message, observed_generation=generation, now=now
        )
        hard = used = None
    return TenantQuotaStatus(hard=hard, used=used, conditions=conditions, observed_generation=generation)


def parked_since(conditions: Iterable[Condition]) -> datetime | None:
    """When the session stopped holding a slot by eviction or suspension (None while it is not parked)."""
    admitted = find_condition(conditions, ConditionType.ADMITTED)
    if admitted is None or admitted.reason not in (Reason.EVICTED, Reason.SUSPENDED):
        return None
    return admitted.last_transition_time


@dataclass(frozen=True)
class StatusInputs:
    """What the desired status of a session depends on besides its facts and the clock (see ``desired_status``)."""

    verdict: Verdict
    shard: int | None
    pod: PodFacts | None = None
    repairs: RepairStatus | None = None
    repair_stalled: str | None = None
    repair_waiting: str | None = None
    eviction: Evicted | None = None
    silent: Heartbeat | None = None


@dataclass(frozen=True)
class Summary:
    """What the pass's metrics need of a session's desired status."""

    phase: str
    unhealthy: str | None
    """The DeviceHealthy reason while it is False."""
    parked_since: datetime | None


def summary(desired: WhatsAppSessionStatus) -> Summary:
    healthy = find_condition(desired.conditions, ConditionType.DEVICE_HEALTHY)
    return Summary(
        phase=desired.phase.value if desired.phase else "",
        unhealthy=healthy.reason if healthy is not None and healthy.status == "False" else None,
        parked_since=parked_since(desired.conditions),
    )


class SettledStatuses:
    """Sessions whose desired status equals the stored one, by uid, not computed again while nothing it depends
    on changed.

    A pass over a cluster where nothing happened then computes no status at all (10,000 sessions: about 2 s of
    CPU each resync otherwise). An entry holds for the same facts object (the informer replaces it on every
    change of the session), equal inputs, and until the clock reaches the next moment the status would change
    by itself: a parked session turning ParkedTooLong, a ban's end. It keeps a summary, not the status: the
    facts hold that already."""

    def __init__(self, flag_parked_after: timedelta) -> None:
        self.flag_parked_after = flag_parked_after
        self._settled: dict[str, tuple[SessionFacts, StatusInputs, Summary, datetime | None]] = {}

    def get(self, facts: SessionFacts, inputs: StatusInputs, now: datetime) -> Summary | None:
        found = self._settled.get(facts.uid)
        if found is None:
            return None
        seen, seen_inputs, settled, until = found
        if seen is not facts or seen_inputs != inputs or (until is not None and now >= until):
            del self._settled[facts.uid]
            return None
        return settled

    def put(self, facts: SessionFacts, inputs: StatusInputs, desired: WhatsAppSessionStatus, now: datetime) -> None:
        """Remember that the API server holds ``desired`` already."""
        found = summary(desired)
        self._settled[facts.uid] = (facts, inputs, found, self._changes_by_itself_at(facts, found, now))

    def retain(self, uids: set[str]) -> None:
        for uid in set(self._settled) - uids:
            del self._settled[uid]

    def __len__(self) -> int:
        return len(self._settled)

    def _changes_by_itself_at(self, facts: SessionFacts, settled: Summary, now: datetime) -> datetime | None:
        moments = []
        if settled.parked_since is not None:  # until it is flagged ParkedTooLong (then again each pass: rare)
            moments.append(settled.parked_since + self.flag_parked_after)
        until = facts.runtime.banned_until if facts.runtime else None
        if until is not None and until > now:
            moments.append(until)
        return min(moments, default=None)
