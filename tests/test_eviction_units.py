"""Eviction decisions (waso.operator.eviction) over plain data: examples, then properties."""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from waso.api.conditions import Condition, ConditionType, Reason, find_condition, set_condition
from waso.api.session import EvictionReason, EvictionStatus, RuntimeState, RuntimeStatus, WhatsAppSessionStatus
from waso.api.tenancy import MemoryReport
from waso.operator.admission import ADMITTED, plan_admission
from waso.operator.eviction import Admission, EvictionPolicy, admit, admit_new, after_admitting, idle_since, slots_left
from waso.operator.status import desired_status
from waso.operator.world import SessionFacts

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
T0 = NOW - timedelta(days=1)
POLICY = EvictionPolicy(min_idle=timedelta(minutes=15))
UNLIMITED = 1000


def session(
    name: str,
    namespace: str = "acme",
    *,
    admitted: bool = True,
    idle_minutes: float | None = 60,
    priority: int = 0,
    age: int = 0,
    evicted: EvictionReason | None = None,
    evict: str | None = None,
    resume: str | None = None,
    handled: EvictionStatus | None = None,
) -> SessionFacts:
    """A session; admitted ones are connected and last active ``idle_minutes`` ago (None: never connected)."""
    conditions: tuple[Condition, ...] = ()
    eviction = handled
    if admitted:
        conditions = set_condition(
            (), ConditionType.ADMITTED, "True", Reason.ADMITTED, "", observed_generation=1, now=T0
        )
    elif evicted is not None:
        conditions = set_condition(
            (), ConditionType.ADMITTED, "False", Reason.EVICTED, "", observed_generation=1, now=T0
        )
        eviction = (handled or EvictionStatus()).model_copy(update={"count": 1, "last_reason": evicted})
    runtime = None
    if admitted and idle_minutes is not None:
        last = NOW - timedelta(minutes=idle_minutes)
        runtime = RuntimeStatus(
            state=RuntimeState.CONNECTED, connected_at=last - timedelta(hours=1), last_activity_at=last
        )
    return SessionFacts(
        uid=f"{namespace}/{name}", namespace=namespace, name=name,
        phone_number=f"+49151{zlib.crc32(f'{namespace}/{name}'.encode()) % 10**8:08d}",
        priority=priority, suspend=False, created=T0 - timedelta(days=1) + timedelta(seconds=age), generation=1,
        resource_version=1, deleting=False, deleting_since=None, has_finalizer=admitted, shard=0 if admitted else None,
        admitted=admitted, status=WhatsAppSessionStatus(
            conditions=conditions, eviction=eviction, admitted_at=T0, runtime=runtime
        ),
        evict_request=evict, resume_request=resume,
    )  # fmt: skip


def run(
    sessions: list[SessionFacts], cap: int, limits: dict[str, int] | None = None, policy: EvictionPolicy = POLICY
) -> Admission:
    namespaces = {s.namespace for s in sessions}
    tenant_limits = {ns: UNLIMITED for ns in namespaces} | (limits or {})
    return admit(sessions, {s.uid: s.admitted for s in sessions}, tenant_limits, cap, policy, NOW)


def evicted(result: Admission) -> list[str]:
    return [e.victim.name for e in result.evictions]


def admitted(result: Admission) -> set[str]:
    return {uid.split("/")[1] for uid, verdict in result.verdicts.items() if verdict.admitted}


# Examples that read as documentation.


def test_a_full_cluster_evicts_exactly_as_many_idle_sessions_as_arrive_least_recent_first() -> None:
    active = [session(f"active-{i:02d}", "busy", idle_minutes=1) for i in range(25)]
    idle = [session(f"idle-{i}", "quiet", idle_minutes=60 + i) for i in range(10)]  # idle-9 least recent
    new = [session(f"new-{i}", "growing", admitted=False, age=i) for i in range(5)]
    result = run([*active, *idle, *new], cap=35)

    assert evicted(result) == ["idle-9", "idle-8", "idle-7", "idle-6", "idle-5"]
    assert admitted(result) == {s.name for s in [*active, *idle[:5], *new]}
    assert {e.beneficiary.name for e in result.evictions} == {s.name for s in new}
    assert {e.reason for e in result.evictions} == {EvictionReason.CAPACITY_PRESSURE}
    verdict = result.verdicts["quiet/idle-9"]
    assert verdict.reason == Reason.EVICTED
    assert "for growing/new-0" in verdict.message
    assert "idle since 2026-11-28T10:52:00Z" in verdict.message
    assert result.records["quiet/idle-9"].at == NOW
    assert result.records["quiet/idle-9"].status.slot_taken_by == "growing/new-0"


def test_lower_priority_goes_first_and_never_a_higher_priority_than_the_waiting_one() -> None:
    sessions = [
        session("important", idle_minutes=600, priority=10),
        session("normal", idle_minutes=30, priority=0),
        session("new", admitted=False, priority=0),
        session("background", admitted=False, priority=-5, age=1),
    ]
    result = run(sessions, cap=2)
    assert evicted(result) == ["normal"]  # the least recently active one has priority 10
    assert result.verdicts["acme/background"].reason == Reason.CAPACITY_EXCEEDED  # nothing it may evict

    by_recency = run(sessions, cap=2, policy=EvictionPolicy(order="LeastRecentlyActive"))
    assert evicted(by_recency) == ["normal"]  # "important" is idler, but above the waiting priority


def test_a_session_active_a_moment_ago_is_never_evicted() -> None:
    # a message 13 minutes ago may have been followed by more for a minute (lastActivityAt is coarse)
    sessions = [session("a", idle_minutes=13.5), session("b", idle_minutes=0.1), session("new", admitted=False)]
    result = run(sessions, cap=2)
    assert result.evictions == ()
    assert result.verdicts["acme/new"].reason == Reason.CAPACITY_EXCEEDED
    assert run(sessions, cap=2, policy=EvictionPolicy(min_idle=timedelta(minutes=10))).evictions[0].victim.name == "a"


def test_idle_since_counts_connections_and_admissions_not_only_messages() -> None:
    fresh = session("fresh", idle_minutes=None)
    assert idle_since(fresh) == T0  # admitted at T0, never connected
    reconnected = session("r", idle_minutes=600)
    runtime = reconnected.status.runtime
    assert runtime is not None
    moved = runtime.model_copy(update={"connected_at": NOW - timedelta(minutes=2)})
    status = reconnected.status.model_copy(update={"runtime": moved})
    assert idle_since(replace(reconnected, status=status)) == NOW - timedelta(minutes=2)


def test_quota_pressure_evicts_within_the_tenant_only() -> None:
    sessions = [
        session("theirs", "other", idle_minutes=900),
        session("ours", "acme", idle_minutes=60),
        session("new", "acme", admitted=False),
    ]
    result = run(sessions, cap=UNLIMITED, limits={"acme": 1})
    assert evicted(result) == ["ours"]
    assert result.evictions[0].reason == EvictionReason.QUOTA_PRESSURE


def test_no_eviction_while_there_is_room_or_when_a_limit_was_lowered_below_its_use() -> None:
    assert run([session("a"), session("new", admitted=False)], cap=2).evictions == ()
    over_cap = [session("a"), session("b"), session("c"), session("new", admitted=False)]
    assert run(over_cap, cap=2).evictions == ()  # evicting one would still leave the cap exceeded
    assert run(over_cap, cap=UNLIMITED, limits={"acme": 2}).evictions == ()


def test_evicted_sessions_wait_without_evicting_and_resume_in_queue_order_when_room_returns() -> None:
    parked = [session(f"parked-{i}", admitted=False, evicted=EvictionReason.CAPACITY_PRESSURE, age=i) for i in range(2)]
    idle = [session("idle", idle_minutes=600)]
    full = run([*idle, *parked], cap=1)
    assert full.evictions == ()  # an idle session does not push out another idle one
    assert {full.verdicts[s.uid].reason for s in parked} == {Reason.EVICTED}
    assert "resumes in queue order" in full.verdicts["acme/parked-0"].message

    room = run([*idle, *parked], cap=2)  # the cap was raised: the oldest parked session comes back first
    assert admitted(room) == {"idle", "parked-0"}
    assert room.verdicts["acme/parked-1"].reason == Reason.EVICTED


def test_a_person_evicts_and_only_a_person_resumes() -> None:
    asked = session("s", idle_minutes=0, evict="2026-11-28T11:59:00Z")  # active: a person may still evict it
    result = run([asked], cap=10)
    assert result.verdicts["acme/s"].reason == Reason.EVICTED
    record = result.records["acme/s"]
    assert (record.at, record.status.last_reason, record.status.handled_evict) == (
        NOW, EvictionReason.MANUAL, "2026-11-28T11:59:00Z"
    )  # fmt: skip

    handled = EvictionStatus(handled_evict="2026-11-28T11:59:00Z")
    parked = session("s", admitted=False, evicted=EvictionReason.MANUAL, evict="2026-11-28T11:59:00Z", handled=handled)
    assert run([parked], cap=10).verdicts["acme/s"].reason == Reason.EVICTED  # room, but it stays parked
    assert "`waso resume`" in run([parked], cap=10).verdicts["acme/s"].message

    resumed = replace(parked, resume_request="2026-11-28T12:00:00Z")
    back = run([resumed], cap=10)
    assert back.verdicts["acme/s"] == ADMITTED
    assert back.records["acme/s"].status.handled_resume == "2026-11-28T12:00:00Z"


def test_a_resumed_session_claims_a_slot_like_a_new_one() -> None:
    parked = session("parked", admitted=False, evicted=EvictionReason.CAPACITY_PRESSURE, resume="now")
    result = run([session("idle", idle_minutes=600), parked], cap=1)
    assert evicted(result) == ["idle"]
    assert result.verdicts["acme/parked"] == ADMITTED


def test_a_parked_session_is_flagged_after_the_configured_age() -> None:
    parked = session("s", admitted=False, evicted=EvictionReason.CAPACITY_PRESSURE)  # parked since T0
    verdict = run([parked, session("busy", idle_minutes=0)], cap=1).verdicts["acme/s"]

    def parked_condition(now: datetime) -> tuple[str, str] | None:
        status = desired_status(parked, verdict, None, now, flag_parked_after=timedelta(days=14))
        found = find_condition(status.conditions, ConditionType.PARKED)
        return (found.reason, found.message) if found else None

    recent = parked_condition(T0 + timedelta(days=13))
    assert recent == ("Evicted", "parked since 2026-11-27T12:00:00Z; credentials kept")
    late = parked_condition(T0 + timedelta(days=14))
    assert late is not None
    assert late[0] == "ParkedTooLong"
    assert "unlinks one offline for 30 days" in late[1]
    running = desired_status(parked, ADMITTED, 0, NOW)
    assert find_condition(running.conditions, ConditionType.PARKED) is None


def test_eviction_switched_off_evicts_nothing_automatically() -> None:
    sessions = [session("idle", idle_minutes=600), session("new", admitted=False)]
    assert run(sessions, cap=1, policy=EvictionPolicy(enabled=False)).evictions == ()


# Properties over random clusters.


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[SessionFacts], int, dict[str, int]]:
    tenants = ["a", "b", "c"]
    count = draw(st.integers(1, 30))
    sessions = [
        session(
            f"s{i}", draw(st.sampled_from(tenants)), admitted=draw(st.booleans()),
            idle_minutes=draw(st.sampled_from([0, 5, 14.9, 15, 60, 600, None])),
            priority=draw(st.integers(-2, 2)), age=i,
            evicted=draw(st.sampled_from([None, None, EvictionReason.CAPACITY_PRESSURE])),
        )
        for i in range(count)
    ]  # fmt: skip
    holders = Counter(s.namespace for s in sessions if s.admitted)
    cap = draw(st.integers(sum(holders.values()), sum(holders.values()) + 3))  # start within the limits
    limits = {t: draw(st.integers(holders[t], holders[t] + 3)) for t in tenants}
    return sessions, cap, limits


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_evictions_keep_every_rule(cluster: tuple[list[SessionFacts], int, dict[str, int]]) -> None:
    sessions, cap, limits = cluster
    result = run(sessions, cap, limits)
    plain = {s.uid: s for s in sessions}
    running = [plain[uid] for uid, verdict in result.verdicts.items() if verdict.admitted]

    # Never over capacity, nor over a quota.
    assert len(running) <= cap
    assert all(n <= limits[t] for t, n in Counter(s.namespace for s in running).items())
    for eviction in result.evictions:
        victim, beneficiary = eviction.victim, eviction.beneficiary
        assert victim.priority <= beneficiary.priority  # never above the waiting priority
        assert NOW - idle_since(victim) >= POLICY.min_idle  # never one active within the minimum idle time
        assert result.verdicts[victim.uid].reason == Reason.EVICTED
        assert result.verdicts[beneficiary.uid].admitted
        assert not (beneficiary.status.eviction and beneficiary.status.eviction.last_reason)  # parked ones never evict
        if eviction.reason == EvictionReason.QUOTA_PRESSURE:
            assert victim.namespace == beneficiary.namespace

    # The fewest: an eviction only where admission alone left no room, one per session let in,
    # so as many sessions run as admission alone would run.
    assert len({e.beneficiary.uid for e in result.evictions}) == len(result.evictions)
    alone = plan_admission(sessions, {s.uid: s.admitted for s in sessions}, limits, cap)
    alone_running = Counter(plain[uid].namespace for uid, verdict in alone.items() if verdict.admitted)
    assert len(running) == sum(alone_running.values())
    for eviction in result.evictions:
        tenant = eviction.beneficiary.namespace
        assert sum(alone_running.values()) >= cap or alone_running[tenant] >= limits[tenant]
    # A waiting session left out had nobody it was allowed to evict.
    used = Counter(s.namespace for s in running)
    for uid, verdict in result.verdicts.items():
        if verdict.reason in (Reason.CAPACITY_EXCEEDED, Reason.QUOTA_EXCEEDED):
            waiting = plain[uid]
            quota_full = used[waiting.namespace] >= limits[waiting.namespace]
            assert not [
                s
                for s in running
                if s.admitted  # held its slot before this pass
                and s.priority <= waiting.priority
                and NOW - idle_since(s) >= POLICY.min_idle
                and (not quota_full or s.namespace == waiting.namespace)
            ], (uid, verdict)


# New sessions decided without the others.


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[SessionFacts], list[SessionFacts], int, dict[str, int]]:
    sessions, cap, limits = draw(clusters())
    if draw(st.booleans()):  # often a cluster where nobody waits: what new sessions can be decided alone in
        sessions = [s for s in sessions if s.admitted]
    new = [
        session(f"n{i}", draw(st.sampled_from(["a", "b", "c", "d"])), admitted=False, age=draw(st.integers(-5, 40)))
        for i in range(draw(st.integers(1, 4)))
    ]  # fmt: skip
    everyone = sessions + new
    for index, found in enumerate(new):  # now and then a number somebody claims already
        if draw(st.integers(0, 5)) == 0:
            new[index] = replace(found, phone_number=draw(st.sampled_from(everyone)).phone_number)
    cap = draw(st.integers(cap, cap + 4))
    return sessions, new, cap, limits | {"d": draw(st.integers(0, 3))}


@settings(max_examples=400, deadline=None)
@given(arrivals())
def test_new_sessions_decided_alone_get_what_the_whole_cluster_would_give_them(
    arrival: tuple[list[SessionFacts], list[SessionFacts], int, dict[str, int]],
) -> None:
    before, new, cap, limits = arrival
    first = admit(before, {s.uid: s.admitted for s in before}, limits, cap, POLICY, NOW)
    slots = slots_left(before, first, [], POLICY)
    alone = admit_new(new, slots, limits, cap)
    everyone = before + new
    whole = admit(everyone, {s.uid: s.admitted for s in everyone}, limits, cap, POLICY, NOW)
    if alone is None:
        return
    assert alone == {s.uid: whole.verdicts[s.uid] for s in new}
    assert {s.uid: whole.verdicts[s.uid] for s in before} == first.verdicts  # nobody else's verdict changes
    assert not whole.evictions
    assert not whole.records
    assert slots_left(everyone, whole, [], POLICY) == after_admitting(slots, new)


def test_new_sessions_need_the_whole_cluster_when_someone_waits_or_room_is_short() -> None:
    holders = [session(f"s{i}", "a") for i in range(3)]
    first = run(holders, cap=4)
    slots = slots_left(holders, first, [], POLICY)
    assert admit_new([session("n0", "b", admitted=False)], slots, {"a": 5, "b": 5}, 4) == {"b/n0": ADMITTED}
    assert admit_new([session(f"n{i}", "b", admitted=False) for i in range(2)], slots, {"a": 5, "b": 5}, 4) is None
    assert admit_new([session("n0", "a", admitted=False)], slots, {"a": 3, "b": 5}, 4) is None  # the tenant is full
    taken = replace(session("n0", "b", admitted=False), phone_number=holders[0].phone_number)
    assert admit_new([taken], slots, {"a": 5, "b": 5}, 4) is None  # the older claim decides: a conflict
    waiting = run([*holders, session("w", "a", admitted=False)], cap=3)
    queued = slots_left([*holders, session("w", "a", admitted=False)], waiting, [], POLICY)
    assert queued.queue
    assert admit_new([session("n0", "b", admitted=False)], queued, {"a": 5, "b": 5}, 9) is None
    pressed = slots_left(holders, first, [report(POLICY.memory_resume_fraction)], POLICY)
    assert admit_new([session("n0", "b", admitted=False)], pressed, {"a": 5, "b": 5}, 4) is None
    asked = session("n0", "b", admitted=False, evict="now")
    assert admit_new([asked], slots, {"a": 5, "b": 5}, 4) is None


# Memory pressure.

MIB = 1024 * 1024


def report(fraction: float, *, at: datetime = NOW, limit: int = 1000 * MIB, shard: int = 0) -> MemoryReport:
    return MemoryReport("acme", shard, int(limit * fraction), limit, at)


def memory_run(sessions: list[SessionFacts], *reports: MemoryReport, cap: int = UNLIMITED) -> Admission:
    tenant_limits = {s.namespace: UNLIMITED for s in sessions}
    return admit(sessions, {s.uid: s.admitted for s in sessions}, tenant_limits, cap, POLICY, NOW, reports)


def test_a_pod_near_its_memory_limit_parks_its_least_recently_used_idle_sessions() -> None:
    sessions = [session(f"s{i}", idle_minutes=20 + i) for i in range(4)]  # s3 is the least recently used
    result = memory_run(sessions, report(0.95))
    # 950 MiB over 4 sessions: about 238 each; 200 MiB above the resume fraction (750): one session
    assert evicted(result) == ["s3"]
    assert result.evictions[0].reason == EvictionReason.MEMORY_PRESSURE
    verdict = result.verdicts["acme/s3"]
    assert verdict.reason == Reason.EVICTED
    assert "its session pod neared its memory limit" in verdict.message
    eight = [session(f"s{i}", idle_minutes=20 + i) for i in range(8)]
    assert evicted(memory_run(eight, report(0.99))) == ["s7", "s6"]  # 240 MiB above, about 124 each: two


def test_memory_pressure_never_parks_an_active_session_and_needs_a_limit() -> None:
    busy = [session(f"s{i}", idle_minutes=1) for i in range(4)]
    assert memory_run(busy, report(0.99)).evictions == ()
    idle = [session(f"s{i}", idle_minutes=60) for i in range(4)]
    assert memory_run(idle, report(0.8)).evictions == ()  # below the pressure fraction
    assert memory_run(idle, MemoryReport("acme", 0, 10**12, 0, NOW)).evictions == ()  # no limit, no pressure
    assert memory_run(idle, report(0.95, shard=1)).evictions == ()  # another pod's report
    off = EvictionPolicy(enabled=False)
    assert admit(idle, {s.uid: True for s in idle}, {"acme": 10}, 10, off, NOW, [report(0.99)]).evictions == ()


def parked_for_memory(name: str, at: datetime) -> SessionFacts:
    parked = session(name, admitted=False, evicted=EvictionReason.MEMORY_PRESSURE)
    status = parked.status.model_copy(update={"evicted_at": at})
    return replace(parked, status=status, shard=0)


def test_after_parking_a_pod_waits_for_a_settled_report_before_parking_more() -> None:
    sessions = [parked_for_memory("gone", NOW - timedelta(seconds=30)), *[session(f"s{i}") for i in range(3)]]
    assert memory_run(sessions, report(0.95, at=NOW)).evictions == ()  # 30 s after: still settling
    later = [parked_for_memory("gone", NOW - timedelta(seconds=61)), *sessions[1:]]
    assert len(memory_run(later, report(0.95, at=NOW)).evictions) == 1


def test_sessions_parked_for_memory_come_back_only_when_their_pod_is_below_the_resume_fraction() -> None:
    sessions = [parked_for_memory("p", NOW - timedelta(minutes=5)), session("busy", idle_minutes=0)]
    still = memory_run(sessions, report(0.8))  # below the pressure fraction, above the resume one
    assert still.verdicts["acme/p"].reason == Reason.EVICTED
    assert still.evictions == ()
    back = memory_run(sessions, report(0.5))
    assert back.verdicts["acme/p"] == ADMITTED
    gone = memory_run(sessions)  # the pod reports nothing (scaled away): nothing holds it
    assert gone.verdicts["acme/p"] == ADMITTED
