"""The repair decision, over plain records: which broken sessions are backed up, reset and re-paired now."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from waso.api.conditions import ConditionType, Reason, find_condition
from waso.api.session import RuntimeState, RuntimeStatus, WhatsAppSessionStatus
from waso.operator.admission import Verdict
from waso.operator.health import device_health
from waso.operator.repair import (
    MANUAL,
    REPAIRABLE,
    RepairCandidate,
    RepairPlan,
    RepairPolicy,
    backups_to_drop,
    loop_count,
    plan_repairs,
)
from waso.operator.status import desired_status
from waso.operator.world import SessionFacts

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
POLICY = RepairPolicy()
LIMIT_MESSAGE = "waiting for a repair slot"


def minutes_ago(*minutes: int) -> tuple[datetime, ...]:
    return tuple(NOW - timedelta(minutes=m) for m in minutes)


def broken(name: str, namespace: str = "acme", **changes: Any) -> RepairCandidate:
    candidate = RepairCandidate(uid=f"{namespace}/{name}", namespace=namespace, name=name, health=Reason.MALFORMED_JID)
    return replace(candidate, **changes)


# Examples that read as documentation.


def test_ten_tenants_breaking_at_once_get_three_repairs_and_seven_wait() -> None:
    candidates = [broken("sales", f"tenant-{i}") for i in range(10)]
    plan = plan_repairs(candidates, RepairPolicy(max_in_flight=3), NOW)

    assert [s.namespace for s in plan.start] == ["tenant-0", "tenant-1", "tenant-2"]
    assert {s.reason for s in plan.start} == {"MalformedJid"}
    assert len(plan.waiting) == 7
    assert set(plan.waiting.values()) == {"waiting for a repair slot (at most 3 repairs in flight across the cluster)"}
    assert plan.wake_at is None  # a slot frees when a repair ends, which wakes the operator by itself
    assert not plan.stalled


def test_the_next_pass_serves_the_tenants_that_waited() -> None:
    running = [broken("sales", f"tenant-{i}", in_flight=True) for i in range(3)]
    others = [broken(name, f"tenant-{i}") for i in range(3) for name in ("a", "b")]
    late = [broken("sales", f"tenant-{i}") for i in range(3, 10)]
    plan = plan_repairs([*running, *others, *late], RepairPolicy(max_in_flight=5), NOW)

    # Two slots free: tenants without a repair running go first, even though others' names sort earlier.
    assert [s.namespace for s in plan.start] == ["tenant-3", "tenant-4"]


def test_a_session_repaired_four_times_in_the_last_hour_is_stalled() -> None:
    looping = broken("sales", repair_starts=minutes_ago(55, 40, 25, 12))
    plan = plan_repairs([looping], POLICY, NOW)

    assert not plan.start
    assert plan.stalled == {
        "acme/sales": "4 repairs within 1h0m: automatic repair stopped; "
        "run `waso repair acme/sales` after fixing the cause"
    }


def test_a_loop_is_not_forgiven_by_waiting_only_by_a_person() -> None:
    looping = broken("sales", repair_starts=minutes_ago(55, 40, 25, 12))
    day_later = NOW + timedelta(days=1)
    assert "acme/sales" in plan_repairs([looping], POLICY, day_later).stalled

    asked = replace(looping, manual_request="tok-1")
    plan = plan_repairs([asked], POLICY, NOW)
    assert [(s.uid, s.reason, s.manual_request) for s in plan.start] == [("acme/sales", MANUAL, "tok-1")]

    repaired_by_hand = replace(looping, repair_starts=(*looping.repair_starts, day_later), acted_at=day_later)
    later = day_later + timedelta(hours=2)
    assert [s.uid for s in plan_repairs([repaired_by_hand], POLICY, later).start] == ["acme/sales"]


def test_three_repairs_in_an_hour_still_allow_a_fourth() -> None:
    plan = plan_repairs([broken("sales", repair_starts=minutes_ago(50, 35, 20))], POLICY, NOW)
    assert [s.uid for s in plan.start] == ["acme/sales"]


def test_device_47_with_a_consistent_identity_is_not_repaired_unless_policy_says_10() -> None:
    jid = "51949376824:47@s.whatsapp.net"
    runtime = RuntimeStatus(state=RuntimeState.CONNECTED, jid=jid, device_id=47, stored_jid=jid)

    by_default = device_health(runtime)
    assert by_default.healthy
    candidate = RepairCandidate(uid="u", namespace="acme", name="sales", health=None)
    assert plan_repairs([candidate], POLICY, NOW) == RepairPlan((), {}, {})
    assert plan_repairs([replace(candidate, health=by_default.reason)], POLICY, NOW) == RepairPlan((), {}, {})

    strict = device_health(runtime, max_device_id=10)
    assert strict.reason == Reason.DEVICE_ID_ABOVE_POLICY
    plan = plan_repairs([replace(candidate, health=strict.reason)], POLICY, NOW)
    assert [(s.uid, s.reason) for s in plan.start] == [("u", "DeviceIdAbovePolicy")]


def test_logged_out_re_pairs_by_itself_and_is_not_repaired() -> None:
    logged_out = broken("sales", health=Reason.LOGGED_OUT)
    assert plan_repairs([logged_out], POLICY, NOW) == RepairPlan((), {}, {})
    assert plan_repairs([replace(logged_out, manual_request="t")], POLICY, NOW).start[0].reason == MANUAL


def test_cooldown_spaces_repairs_of_one_session() -> None:
    plan = plan_repairs([broken("sales", repair_starts=minutes_ago(4))], POLICY, NOW)
    assert plan.waiting == {
        "acme/sales": "cooldown until 2026-11-28T12:06:00Z: repairs of one session start at least 10m apart"
    }
    assert (
        "until 2026-11-28T12:01:00Z"
        in plan_repairs([broken("sales", repair_starts=minutes_ago(9))], POLICY, NOW).waiting["acme/sales"]
    )
    assert plan_repairs([broken("sales", repair_starts=minutes_ago(10))], POLICY, NOW).start


def test_the_first_cooldown_to_end_wakes_the_operator() -> None:
    candidates = [broken("a", repair_starts=minutes_ago(4)), broken("b", repair_starts=minutes_ago(9)), broken("c")]
    plan = plan_repairs(candidates, POLICY, NOW)
    assert [s.name for s in plan.start] == ["c"]
    assert plan.wake_at == NOW + timedelta(minutes=1)  # b's cooldown ends first
    assert plan_repairs([broken("c")], POLICY, NOW).wake_at is None


def test_switches_off_say_so_and_manual_requests_still_run() -> None:
    off = plan_repairs([broken("a", tenant_auto_repair=False)], POLICY, NOW)
    assert off.waiting == {"acme/a": "automatic repair is off for tenant acme; run `waso repair acme/a`"}
    globally = plan_repairs([broken("a")], RepairPolicy(enabled=False), NOW)
    assert globally.waiting == {"acme/a": "automatic repair is off globally; run `waso repair acme/a`"}
    asked = broken("a", manual_request="t", tenant_auto_repair=False)
    assert plan_repairs([asked], RepairPolicy(enabled=False), NOW).start


def test_a_request_for_a_session_under_repair_waits_for_it() -> None:
    plan = plan_repairs([broken("a", in_flight=True, manual_request="t")], POLICY, NOW)
    assert not plan.start
    assert plan.waiting == {"acme/a": "a repair of this session is in flight; the request runs after it"}


def test_within_a_tenant_the_oldest_need_goes_first() -> None:
    young = broken("a", needed_since=NOW - timedelta(minutes=1))
    old = broken("z", needed_since=NOW - timedelta(minutes=30))
    unknown = broken("b")
    plan = plan_repairs([young, unknown, old], RepairPolicy(max_in_flight=2), NOW)
    assert [s.name for s in plan.start] == ["z", "a"]
    assert LIMIT_MESSAGE in plan.waiting["acme/b"]


def test_backups_beyond_the_kept_number_are_dropped_oldest_first() -> None:
    backups = {f"b{i}": NOW - timedelta(hours=i) for i in range(5)}
    assert backups_to_drop(backups, RepairPolicy(keep_backups=3)) == ("b4", "b3")
    assert backups_to_drop(backups, RepairPolicy(keep_backups=9)) == ()


# Properties.

REASONS: list[Reason | None] = [None, *Reason]


OFFSETS = (st.integers(0, 30) | st.integers(-5, 180)).map(lambda m: NOW - timedelta(minutes=m))
CANDIDATES = st.builds(
    RepairCandidate,
    uid=st.just(""),  # numbered below
    namespace=st.sampled_from([f"t{i}" for i in range(6)]),
    name=st.sampled_from(["a", "b", "c"]),
    health=st.sampled_from(sorted(REPAIRABLE)) | st.sampled_from(REASONS),
    tenant_auto_repair=st.booleans(),
    in_flight=st.integers(0, 4).map(lambda n: n == 0),
    repair_starts=st.lists(OFFSETS, max_size=6).map(tuple),
    acted_at=st.none() | OFFSETS,
    manual_request=st.sampled_from([None, None, "tok"]),
    needed_since=st.none() | OFFSETS,
)
POLICIES = st.builds(
    RepairPolicy,
    enabled=st.booleans(),
    max_in_flight=st.integers(0, 5),
    cooldown=st.integers(0, 30).map(lambda m: timedelta(minutes=m)),
    loop_limit=st.integers(1, 4),
    loop_window=st.integers(5, 90).map(lambda m: timedelta(minutes=m)),
)


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[RepairCandidate], RepairPolicy]:
    drawn = draw(st.lists(CANDIDATES, max_size=25))
    candidates = [
        replace(c, uid=f"u{i}", name=f"{c.name}{i}", manual_request=c.manual_request and f"tok-{i}")
        for i, c in enumerate(drawn)
    ]
    return candidates, draw(POLICIES)


def slot_free_for(candidate: RepairCandidate, plan: RepairPlan) -> bool:
    """Whether the candidate competes for a slot: started now, or waiting only for the limit."""
    return any(s.uid == candidate.uid for s in plan.start) or LIMIT_MESSAGE in plan.waiting.get(candidate.uid, "")


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_never_more_than_the_limit_in_flight(world: tuple[list[RepairCandidate], RepairPolicy]) -> None:
    candidates, policy = world
    plan = plan_repairs(candidates, policy, NOW)
    running = sum(c.in_flight for c in candidates)
    assert len(plan.start) <= max(0, policy.max_in_flight - running)
    by_uid = {c.uid: c for c in candidates}
    assert not any(by_uid[s.uid].in_flight for s in plan.start)
    assert len({s.uid for s in plan.start}) == len(plan.start)
    # Each session gets at most one verdict.
    started = {s.uid for s in plan.start}
    assert not started & plan.stalled.keys()
    assert not started & plan.waiting.keys()
    assert not plan.stalled.keys() & plan.waiting.keys()


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_automatic_repairs_respect_health_switches_cooldown_and_loops(
    world: tuple[list[RepairCandidate], RepairPolicy],
) -> None:
    candidates, policy = world
    plan = plan_repairs(candidates, policy, NOW)
    by_uid = {c.uid: c for c in candidates}
    for start in plan.start:
        candidate = by_uid[start.uid]
        if candidate.manual_request is not None:
            assert (start.reason, start.manual_request) == (MANUAL, candidate.manual_request)
            continue
        # Never a healthy, unknown or logged-out session without a person asking.
        assert candidate.health in REPAIRABLE
        assert start.reason == candidate.health
        assert policy.enabled
        assert candidate.tenant_auto_repair
        assert all(t + policy.cooldown <= NOW for t in candidate.repair_starts)
        counted = [t for t in candidate.repair_starts if candidate.acted_at is None or t > candidate.acted_at]
        assert all(
            sum(first <= t <= first + policy.loop_window for t in counted) <= policy.loop_limit for first in counted
        )
    for uid, message in plan.stalled.items():
        candidate = by_uid[uid]
        assert candidate.manual_request is None
        counted = [t for t in candidate.repair_starts if candidate.acted_at is None or t > candidate.acted_at]
        repeats = loop_count(counted, policy.loop_window)
        assert repeats > policy.loop_limit
        assert message.startswith(f"{repeats} repairs within ")
    # Every broken session that is not under repair is accounted for.
    for candidate in candidates:
        if candidate.health in REPAIRABLE and not candidate.in_flight:
            assert candidate.uid in plan.waiting or candidate.uid in plan.stalled or slot_free_for(candidate, plan)
        if candidate.health not in REPAIRABLE and candidate.manual_request is None:
            assert candidate.uid not in plan.waiting
            assert candidate.uid not in plan.stalled


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_manual_requests_are_honoured_within_the_limit(world: tuple[list[RepairCandidate], RepairPolicy]) -> None:
    candidates, policy = world
    plan = plan_repairs(candidates, policy, NOW)
    busy = sum(c.in_flight for c in candidates) + len(plan.start)
    for candidate in candidates:
        if candidate.manual_request is not None and not candidate.in_flight:
            assert slot_free_for(candidate, plan)
        if LIMIT_MESSAGE in plan.waiting.get(candidate.uid, ""):
            # Nobody waits for a slot while one is free.
            assert busy >= policy.max_in_flight


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_slots_are_shared_fairly_between_tenants(world: tuple[list[RepairCandidate], RepairPolicy]) -> None:
    candidates, policy = world
    plan = plan_repairs(candidates, policy, NOW)
    load = Counter(c.namespace for c in candidates if c.in_flight)
    load.update(s.namespace for s in plan.start)
    starved = {c.namespace for c in candidates if LIMIT_MESSAGE in plan.waiting.get(c.uid, "")}
    for start in plan.start:
        for tenant in starved:
            assert load[start.namespace] <= load[tenant] + 1

    # With nothing running: k slots and at least k tenants in need give k different tenants.
    idle = [replace(c, in_flight=False) for c in candidates]
    plan = plan_repairs(idle, policy, NOW)
    needy = {c.namespace for c in idle if slot_free_for(c, plan)}
    assert len({s.namespace for s in plan.start}) == min(policy.max_in_flight, len(needy))


@settings(max_examples=200, deadline=None)
@given(worlds(), st.randoms(use_true_random=False))
def test_the_same_world_in_any_order_gives_the_same_plan(
    world: tuple[list[RepairCandidate], RepairPolicy], shuffler: random.Random
) -> None:
    candidates, policy = world
    shuffled = list(candidates)
    shuffler.shuffle(shuffled)
    assert plan_repairs(shuffled, policy, NOW) == plan_repairs(candidates, policy, NOW)


def test_a_session_that_waits_for_its_repair_says_why_in_ready() -> None:
    jid = "4915112345601:53@s.whatsapp.net"
    facts = SessionFacts(
        uid="u", namespace="acme", name="s", phone_number="+4915112345601", priority=0, suspend=False,
        created=NOW, generation=1, resource_version=1, deleting=False, deleting_since=None,
        has_finalizer=True, shard=0, admitted=True,
        status=WhatsAppSessionStatus(runtime=RuntimeStatus(
            state=RuntimeState.CONNECTED, jid=jid, stored_jid="4915112345601:52@s.whatsapp.net"
        )),
    )  # fmt: skip
    waiting = plan_repairs([broken("s", repair_starts=minutes_ago(4))], POLICY, NOW).waiting["acme/s"]
    status = desired_status(facts, Verdict(True, Reason.ADMITTED, "admitted"), 0, NOW, repair_waiting=waiting)
    ready = find_condition(status.conditions, ConditionType.READY)
    assert ready is not None
    assert ready.reason == Reason.IDENTITY_MISMATCH
    assert ready.message.endswith(
        "; repair: cooldown until 2026-11-28T12:06:00Z: repairs of one session start at least 10m apart"
    )
