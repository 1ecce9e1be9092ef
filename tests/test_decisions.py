"""Pure decisions of the operator, over plain data: no cluster."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waso.api.conditions import find_condition
from waso.api.jid import parse_jid
from waso.api.quota import TenantQuotaSpec
from waso.api.session import RuntimeState, RuntimeStatus, WhatsAppSessionStatus
from waso.api.tenancy import heartbeat
from waso.operator.admission import ADMITTED, plan_admission
from waso.operator.config import OperatorConfig
from waso.operator.health import device_health
from waso.operator.placement import assign_shards, replicas_needed
from waso.operator.resources import RUNTIME_RULES, statefulset, tenant_objects
from waso.operator.status import desired_status, next_silence, silent_shards
from waso.operator.world import SessionFacts, pod_facts

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def facts(
    uid: str,
    namespace: str = "acme",
    phone: str | None = None,
    *,
    age: int = 0,
    priority: int = 0,
    suspend: bool = False,
    deleting: bool = False,
    shard: int | None = None,
    runtime: RuntimeStatus | None = None,
) -> SessionFacts:
    return SessionFacts(
        uid=uid,
        namespace=namespace,
        name=uid,
        phone_number=phone or f"+49151{abs(hash(uid)) % 10**8:08d}",
        priority=priority,
        suspend=suspend,
        created=T0 + timedelta(seconds=age),
        generation=1,
        resource_version=1,
        deleting=deleting,
        deleting_since=T0 if deleting else None,
        has_finalizer=shard is not None,
        shard=shard,
        admitted=False,
        status=WhatsAppSessionStatus(runtime=runtime),
    )


# -- admission ------------------------------------------------------------------------------


def test_cap_admits_in_priority_then_age_order() -> None:
    sessions = [facts("old", age=0), facts("new", age=5), facts("vip", age=9, priority=10)]
    verdicts = plan_admission(sessions, {}, {"acme": 10}, global_cap=2)
    assert verdicts["vip"] == ADMITTED
    assert verdicts["old"] == ADMITTED
    assert verdicts["new"].reason == "CapacityExceeded"
    assert "2 of at most 2" in verdicts["new"].message


def test_admission_is_sticky_when_the_cap_is_lowered() -> None:
    sessions = [facts(f"s{i}", age=i) for i in range(3)]
    verdicts = plan_admission(sessions, {"s0": True, "s1": True, "s2": True}, {"acme": 10}, global_cap=1)
    assert all(v.admitted for v in verdicts.values())


def test_a_full_tenant_does_not_block_others_behind_it() -> None:
    sessions = [facts("a1", "a", age=0), facts("a2", "a", age=1), facts("b1", "b", age=2)]
    verdicts = plan_admission(sessions, {}, {"a": 1, "b": 1}, global_cap=10)
    assert verdicts["a1"].admitted
    assert verdicts["a2"].reason == "QuotaExceeded"
    assert verdicts["b1"].admitted


def test_oldest_claim_on_a_phone_number_wins_and_other_tenants_are_not_named() -> None:
    sessions = [facts("theirs", "globex", "+4915100000001", age=5), facts("mine", "acme", "+4915100000001", age=0)]
    verdicts = plan_admission(sessions, {"theirs": True}, {"acme": 5, "globex": 5}, global_cap=5)
    assert verdicts["mine"].admitted
    assert verdicts["theirs"].reason == "PhoneNumberConflict"
    assert "acme" not in verdicts["theirs"].message
    same_tenant = plan_admission(
        [facts("x", "acme", "+4915100000002", age=0), facts("y", "acme", "+4915100000002", age=1)], {}, {"acme": 5}, 5
    )
    assert "(x)" in same_tenant["y"].message


def test_suspended_and_deleting_sessions_hold_no_slot() -> None:
    sessions = [facts("s", suspend=True), facts("d", deleting=True), facts("w", age=1)]
    verdicts = plan_admission(sessions, {"s": True, "d": True}, {"acme": 5}, global_cap=1)
    assert verdicts["s"].reason == "Suspended"
    assert "d" not in verdicts
    assert verdicts["w"].admitted


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(0, 5), st.booleans(), st.booleans()),
        max_size=40,
    ),
    st.integers(0, 15),
    st.lists(st.integers(0, 6), min_size=5, max_size=5),
)
def test_admission_never_exceeds_cap_or_quota_for_new_admissions(
    rows: list[tuple[int, int, int, bool, bool]], cap: int, quotas: list[int]
) -> None:
    sessions = [
        facts(f"s{i}", f"t{tenant}", f"+4915100{phone:06d}", age=i, priority=priority, suspend=suspend)
        for i, (tenant, priority, phone, suspend, _held) in enumerate(rows)
    ]
    held = {f"s{i}": row[4] for i, row in enumerate(rows)}
    limits = {f"t{i}": q for i, q in enumerate(quotas)}
    verdicts = plan_admission(sessions, held, limits, cap)

    admitted = [s for s in sessions if verdicts[s.uid].admitted]
    newly = [s for s in admitted if not held[s.uid]]
    if newly:  # a new admission only ever happens with room under both limits
        assert len(admitted) <= cap
        for tenant, count in Counter(s.namespace for s in admitted).items():
            if any(s.namespace == tenant for s in newly):
                assert count <= limits[tenant]
    assert len({s.phone_number for s in admitted}) == len(admitted)  # one socket per number
    for session in sessions:  # never evicts: a held, unsuspended, conflict-free slot is kept
        if held[session.uid] and verdicts[session.uid].reason not in ("Suspended", "PhoneNumberConflict"):
            assert verdicts[session.uid].admitted
    waiting = [s for s in sessions if verdicts[s.uid].reason in ("CapacityExceeded", "QuotaExceeded")]
    for session in waiting:  # nobody waits while both limits have room for them
        tenant_used = sum(1 for s in admitted if s.namespace == session.namespace)
        assert len(admitted) >= cap or tenant_used >= limits[session.namespace]


# -- placement ------------------------------------------------------------------------------


def test_new_sessions_fill_the_lowest_shard_with_room_and_keep_their_shard() -> None:
    sessions = [facts("a", shard=1), facts("b", age=1), facts("c", age=2), facts("d", age=3)]
    running = {s.uid: True for s in sessions}
    shards = assign_shards(sessions, running, sessions_per_pod=2)
    assert shards == {"a": 1, "b": 0, "c": 0, "d": 1}
    assert replicas_needed(shards, running) == 2


def test_parked_sessions_keep_their_shard_and_empty_top_shards_scale_away() -> None:
    sessions = [facts("a", shard=0), facts("b", shard=1), facts("c", age=5)]
    running = {"a": True, "b": False, "c": True}
    shards = assign_shards(sessions, running, sessions_per_pod=1)
    assert shards == {"a": 0, "b": 1, "c": 2}
    assert replicas_needed(shards, running) == 3
    assert replicas_needed(shards, {"a": True}) == 1
    assert replicas_needed({}, {}) == 0  # no sessions, no pods


# -- health and status -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jid", "stored", "state", "policy", "healthy", "reason"),
    [
        ("4915112345678:53@s.whatsapp.net", "4915112345678:53@s.whatsapp.net", "Connected", None, True, "Healthy"),
        ("4915112345678:53@s.whatsapp.net", None, "Connected", 10, False, "DeviceIdAbovePolicy"),
        (
            "4915112345678:7@s.whatsapp.net",
            "4915112345678:8@s.whatsapp.net",
            "Connected",
            None,
            False,
            "IdentityMismatch",
        ),
        ("4915112345678@s.whatsapp.net", None, "Connected", None, False, "MalformedJid"),
        ("not-a-jid", None, "Connected", None, False, "MalformedJid"),
        (None, None, "Connected", None, False, "MissingIdentity"),
        (None, None, "AwaitingPairing", None, None, "NotPaired"),
    ],
)
def test_device_health(
    jid: str | None, stored: str | None, state: str, policy: int | None, healthy: bool | None, reason: str
) -> None:
    runtime = RuntimeStatus(state=RuntimeState(state), jid=jid, stored_jid=stored)
    health = device_health(runtime, policy)
    assert (health.healthy, health.reason) == (healthy, reason)


def test_parse_jid_accepts_high_device_numbers() -> None:
    assert parse_jid("4915112345678:53@s.whatsapp.net") is not None
    assert str(parse_jid("4915112345678:53@s.whatsapp.net")) == "4915112345678:53@s.whatsapp.net"
    assert parse_jid("4915112345678@g.us") is None


def test_status_is_unknown_until_the_runtime_reports_then_ready_when_connected_and_healthy() -> None:
    session = facts("s", shard=0)
    first = desired_status(session, ADMITTED, 0, T0)
    assert first.phase == "Starting"
    assert find_condition(first.conditions, "Paired").status == "Unknown"
    assert find_condition(first.conditions, "Reconciling").status == "True"

    jid = "4915112345678:53@s.whatsapp.net"
    connected = facts("s", shard=0, runtime=RuntimeStatus(state=RuntimeState.CONNECTED, jid=jid, stored_jid=jid))
    connected = replace(connected, status=connected.status.model_copy(update={"conditions": first.conditions}))
    later = desired_status(connected, ADMITTED, 0, T0 + timedelta(minutes=1))
    ready = find_condition(later.conditions, "Ready")
    assert ready is not None
    assert (ready.status, later.phase) == ("True", "Connected")
    assert find_condition(later.conditions, "Reconciling") is None
    admitted = find_condition(later.conditions, "Admitted")
    assert admitted is not None
    assert admitted.last_transition_time == T0  # unchanged status keeps its transition time


def test_an_unchanged_world_yields_an_identical_status() -> None:
    session = facts("s", shard=0)
    first = desired_status(session, ADMITTED, 0, T0)
    status = WhatsAppSessionStatus(conditions=first.conditions, admitted_at=first.admitted_at)
    stored = replace(session, admitted=True, status=status)
    assert desired_status(stored, ADMITTED, 0, T0 + timedelta(hours=1)).to_wire() == first.to_wire()


def _session_pod(*, ready: bool, last_reason: str | None, state: dict[str, Any] | None = None) -> dict[str, Any]:
    last = {"terminated": {"reason": last_reason, "exitCode": 137}} if last_reason else {}
    return {
        "metadata": {"name": "waso-sessions-1", "namespace": "acme"},
        "spec": {"containers": [{"name": "runtime", "resources": {"limits": {"memory": "16Mi"}}}]},
        "status": {
            "containerStatuses": [
                {"name": "runtime", "ready": ready, "restartCount": 3, "lastState": last, "state": state or {}}
            ]
        },
    }


def test_an_oom_killed_session_pod_is_named_in_connected_and_stalls_the_session() -> None:
    waiting = {"waiting": {"reason": "CrashLoopBackOff"}}
    pod = pod_facts(_session_pod(ready=False, last_reason="OOMKilled", state=waiting))
    assert pod is not None
    assert (pod.shard, pod.out_of_memory, pod.memory_limit, pod.restarts) == (1, True, "16Mi", 3)
    jid = "4915112345678:53@s.whatsapp.net"
    stale = RuntimeStatus(state=RuntimeState.CONNECTED, jid=jid, stored_jid=jid)  # written before the kill
    status = desired_status(facts("s", shard=1, runtime=stale), ADMITTED, 1, T0, pod=pod)
    connected = find_condition(status.conditions, "Connected")
    assert connected is not None
    assert (connected.status, connected.reason) == ("False", "OutOfMemory")
    assert "16Mi" in connected.message
    assert "TenantQuota" in connected.message
    stalled = find_condition(status.conditions, "Stalled")
    assert stalled is not None
    assert (stalled.status, stalled.reason, status.phase) == ("True", "OutOfMemory", "Failed")


def test_a_session_pod_that_recovered_from_an_oom_kill_is_not_reported() -> None:
    recovered = pod_facts(_session_pod(ready=True, last_reason="OOMKilled", state={"running": {}}))
    other_crash = pod_facts(_session_pod(ready=False, last_reason="Error"))
    assert recovered is not None
    assert other_crash is not None
    assert not recovered.out_of_memory
    assert not other_crash.out_of_memory
    assert pod_facts({"metadata": {"name": "not-a-statefulset-pod", "namespace": "acme"}}) is None


def _heartbeat_lease(
    shard: str, renewed: str, *, memory: str | None = None, name: str = "waso-runtime-p"
) -> dict[str, Any]:
    annotations = {"waso.dev/memory": memory} if memory else {}
    return {
        "metadata": {
            "name": name,
            "namespace": "acme",
            "labels": {"waso.dev/shard": shard},
            "annotations": annotations,
        },
        "spec": {"holderIdentity": "p", "renewTime": renewed, "leaseDurationSeconds": 15},
    }


def test_a_heartbeat_lease_says_until_when_its_runtime_counts_as_alive() -> None:
    beat = heartbeat(_heartbeat_lease("1", "2026-11-28T12:00:00.000000Z", memory="100/400"))
    assert beat is not None
    # alive for two Lease durations: one late renewal is not a lost runtime
    assert (beat.namespace, beat.shard, beat.renewed, beat.expires) == ("acme", 1, T0, T0 + timedelta(seconds=30))
    assert beat.memory is not None
    assert beat.memory.fraction == 0.25
    assert heartbeat(_heartbeat_lease("1", "2026-11-28T12:00:00Z")).memory is None
    assert heartbeat(_heartbeat_lease("x", "2026-11-28T12:00:00Z")) is None  # no shard
    assert heartbeat({"metadata": {"namespace": "acme", "labels": {"waso.dev/shard": "0"}}, "spec": {}}) is None


def test_a_shard_is_silent_once_its_freshest_heartbeat_expired() -> None:
    beats = [
        heartbeat(_heartbeat_lease("0", "2026-11-28T11:59:00Z", name="waso-runtime-a")),
        heartbeat(_heartbeat_lease("0", "2026-11-28T12:00:00Z", name="waso-runtime-b")),
        heartbeat(_heartbeat_lease("1", "2026-11-28T11:59:00Z")),
    ]
    old, fresh, other = (beat for beat in beats if beat is not None)
    assert silent_shards([old, fresh, other], T0 + timedelta(seconds=29)) == {("acme", 1): other}
    assert silent_shards([old, fresh, other], T0 + timedelta(seconds=31)) == {("acme", 0): fresh, ("acme", 1): other}
    assert silent_shards([], T0) == {}  # no heartbeat at all: nothing is known to be lost
    # The operator wakes when the next shard falls silent: shard 0's freshest heartbeat runs out at T0 + 30 s.
    assert next_silence([old, fresh, other], T0 + timedelta(seconds=29)) == fresh.expires
    assert fresh.expires == T0 + timedelta(seconds=30)
    assert next_silence([old, fresh, other], T0 + timedelta(seconds=31)) is None  # all silent already
    assert next_silence([], T0) is None


def test_a_connected_session_whose_runtime_went_silent_is_not_reported_connected() -> None:
    jid = "4915112345678:53@s.whatsapp.net"
    stale = RuntimeStatus(state=RuntimeState.CONNECTED, jid=jid, stored_jid=jid)  # written before the node was lost
    beat = heartbeat(_heartbeat_lease("0", "2026-11-28T11:59:00Z"))  # expired at 11:59:30
    lost = desired_status(facts("s", shard=0, runtime=stale), ADMITTED, 0, T0, silent=beat)
    connected = find_condition(lost.conditions, "Connected")
    assert connected is not None
    assert (connected.status, connected.reason) == ("Unknown", "HeartbeatLost")
    assert "2026-11-28T11:59:00Z" in connected.message
    ready = find_condition(lost.conditions, "Ready")
    assert ready is not None
    assert (ready.status, ready.reason, lost.phase) == ("False", "HeartbeatLost", "Disconnected")
    assert find_condition(lost.conditions, "Reconciling") is not None  # it comes back with its pod or node
    assert find_condition(lost.conditions, "Stalled") is None
    # A runtime that said it stopped, and a session nobody reported on, are not lost.
    stopped = RuntimeStatus(state=RuntimeState.STOPPED, stored_jid=jid)
    quiet = desired_status(facts("s", shard=0, runtime=stopped), ADMITTED, 0, T0, silent=beat)
    assert find_condition(quiet.conditions, "Connected").reason == "Disconnected"
    fresh = desired_status(facts("s", shard=0, runtime=stale), ADMITTED, 0, T0)
    assert find_condition(fresh.conditions, "Ready").status == "True"


# -- tenant workload -------------------------------------------------------------------------


def test_pod_template_meets_pod_security_restricted_and_takes_quota_resources() -> None:
    quota = TenantQuotaSpec.model_validate({"podResources": {"limits": {"memory": "1Gi"}}})
    sts = statefulset("acme", quota, OperatorConfig(), replicas=3)
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert sts["spec"]["replicas"] == 3
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"] == {"limits": {"memory": "1Gi"}}
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenScaled": "Retain", "whenDeleted": "Retain"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WASO_EXECUTOR_THREADS"] == str(quota.sessions_per_pod + 16)


def test_runtime_reads_the_operators_default_quota_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from waso.session_runtime.config import RuntimeConfig

    operator = OperatorConfig(
        default_quota=TenantQuotaSpec(messages_per_minute=7, max_sessions=3, max_pairing_streams=1)
    )
    container = statefulset("acme", TenantQuotaSpec(), operator, replicas=1)["spec"]["template"]["spec"]["containers"][
        0
    ]
    for variable in container["env"]:
        if "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])
    monkeypatch.setenv("WASO_NAMESPACE", "acme")
    monkeypatch.setenv("WASO_POD_NAME", "waso-sessions-2")
    monkeypatch.delenv("WASO_SHARD", raising=False)
    runtime = RuntimeConfig()
    assert runtime.default_quota == operator.default_quota
    assert runtime.shard == 2


def test_runtime_role_is_namespaced_and_cannot_change_specs() -> None:
    kinds = [o["kind"] for o in tenant_objects("acme", TenantQuotaSpec(), OperatorConfig(), 1)]
    assert kinds == [
        "ServiceAccount", "Role", "RoleBinding", "Service", "NetworkPolicy", "PodDisruptionBudget", "StatefulSet"
    ]  # fmt: skip
    session_rules = [r for r in RUNTIME_RULES if "whatsappsessions" in r["resources"]]
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in session_rules)
    webhook_rules = [r for r in RUNTIME_RULES if "webhooks" in r["resources"]]
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in webhook_rules)
    # No Secret at all: the tenant grants the one signing key by name (docs/events.md).
    assert not [r for r in RUNTIME_RULES if "secrets" in r["resources"]]
    status_rules = [r for r in RUNTIME_RULES if any(x.endswith("/status") for x in r["resources"])]
    assert {x for r in status_rules for x in r["resources"]} == {"whatsappsessions/status", "webhooks/status"}


# -- configuration ---------------------------------------------------------------------------


def test_invalid_configuration_stops_the_operator_with_the_setting_named() -> None:
    env = {"PATH": "/usr/bin:/bin", "WASO_MAX_SESSIONS": "-1", "WASO_TRANSPORT": "carrier-pigeon"}
    result = subprocess.run(
        [sys.executable, "-m", "waso.cli.main", "operator"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "max_sessions: Input should be greater than or equal to 0" in result.stderr
    assert "variable WASO_MAX_SESSIONS" in result.stderr
    assert "transport: Input should be 'neonize' or 'simulator'" in result.stderr


def test_simulator_transport_needs_its_url() -> None:
    with pytest.raises(ValueError, match="simulator_url"):
        OperatorConfig(transport="simulator")


# -- deletion --------------------------------------------------------------------------------


def test_the_credentials_finalizer_is_released_only_when_nothing_is_left_or_time_is_up() -> None:
    from waso.operator.cleanup import release_finalizer, wants_finalizer

    timeout = timedelta(minutes=5)
    assert wants_finalizer(facts("s"), shard=0)
    assert not wants_finalizer(facts("s", shard=0), shard=0)  # already on it
    assert not wants_finalizer(facts("s"), shard=None)  # no shard, no credentials anywhere

    never_served = facts("s", shard=0, deleting=True)
    assert release_finalizer(never_served, T0, timeout) == release_finalizer(never_served, T0, timeout)
    assert release_finalizer(never_served, T0, timeout).warning is False

    served = facts("s", shard=0, deleting=True, runtime=RuntimeStatus(state=RuntimeState.CONNECTED))
    assert release_finalizer(served, T0 + timedelta(minutes=1), timeout) is None  # the runtime is erasing
    late = release_finalizer(served, T0 + timeout, timeout)
    assert late is not None
    assert late.warning
    assert "may remain" in late.reason

    erased = facts("s", shard=0, deleting=True, runtime=RuntimeStatus(state=RuntimeState.REMOVED))
    released = release_finalizer(erased, T0, timeout)
    assert released is not None
    assert not released.warning
    assert release_finalizer(facts("s", shard=0), T0, timeout) is None  # not being deleted


def test_runtime_api_is_reachable_only_from_the_tenant_and_labelled_namespaces() -> None:
    from waso.operator.resources import network_policy

    policy = network_policy("acme")
    assert policy["spec"]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "waso-sessions", "app.kubernetes.io/instance": "waso-sessions"}
    }
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {"podSelector": {}},
        {"namespaceSelector": {"matchLabels": {"waso.dev/runtime-access": "true"}}},
    ]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]


async def test_every_later_pass_is_scheduled_not_only_the_first() -> None:
    """A retry timer that fired must not swallow the next retries (they fell back to the resync)."""
    from typing import cast

    from waso.kube import KubeClient
    from waso.operator.controller import Controller

    controller = Controller(OperatorConfig(), cast(KubeClient, None))  # no pass runs: the API is never reached
    for _ in range(3):
        controller.poke_later(0.01)
        controller.poke_later(60)  # a later wish does not postpone the earlier pass
        await asyncio.wait_for(controller._wake.wait(), timeout=10)
        controller._wake.clear()
