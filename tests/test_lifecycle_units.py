"""The session state machine, the lifecycle Events and the kstatus of bans: pure functions on a fake clock."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import cast

from tests.test_decisions import facts
from waso.api.conditions import ConditionType, Reason, find_condition, set_condition
from waso.api.session import ACTIVITY_GRANULARITY, Phase, RuntimeState, RuntimeStatus, WhatsAppSessionStatus
from waso.kube import KubeClient
from waso.operator.admission import ADMITTED, Verdict
from waso.operator.config import OperatorConfig
from waso.operator.controller import Controller, retry_after
from waso.operator.events import Decision, EventReason, decision_events, lifecycle_events
from waso.operator.status import SettledStatuses, StatusInputs, desired_status
from waso.operator.world import SessionFacts
from waso.session_runtime.lifecycle import (
    Activity,
    Connecting,
    Notify,
    Reconnect,
    SessionView,
    Stopped,
    runtime_status,
    step,
)
from waso.session_runtime.transport import (
    Connected,
    Disconnected,
    IncomingMessage,
    LoggedOut,
    Paired,
    QrCode,
    StreamReplaced,
    TemporaryBan,
)

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
JID = "4915112345601:53@s.whatsapp.net"


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def test_pairing_then_connecting_reports_the_identity() -> None:
    view, actions = step(SessionView(), Connecting(None), T0)
    assert view.state == RuntimeState.CONNECTING
    assert actions == []
    qr = QrCode("2@abc", seconds(20))
    view, actions = step(view, qr, seconds(1))
    assert view.state == RuntimeState.AWAITING_PAIRING
    assert actions == [Notify("qr", {"code": "2@abc", "expiresAt": "2026-11-29T12:00:20Z"})]
    assert runtime_status(view).qr_expires_at == seconds(20)
    view, actions = step(view, Paired(JID), seconds(5))
    assert view.stored_jid == JID
    assert view.qr is None
    assert actions == [Notify("paired", {"jid": JID})]
    view, _ = step(view, Connected(JID, "Acme"), seconds(6))
    status = runtime_status(view)
    assert status.state == RuntimeState.CONNECTED
    assert status.device_id == 53
    assert status.connected_at == seconds(6)


def test_a_second_paired_never_replaces_stored_credentials() -> None:
    view = SessionView(state=RuntimeState.CONNECTED, stored_jid=JID, jid=JID)
    after, actions = step(view, Paired("4915112345601:54@s.whatsapp.net"), T0)
    assert after == view
    assert actions == []


def test_activity_is_reported_at_coarse_granularity_on_a_fake_clock() -> None:
    view = SessionView(state=RuntimeState.CONNECTED, jid=JID)
    view, _ = step(view, IncomingMessage("+15550001", "hi", "3EB01", "15550001@s.whatsapp.net", T0), T0)
    assert runtime_status(view).last_activity_at == T0
    for later in (1, 30, 59):  # within the granularity: the reported time does not move
        view, _ = step(view, Activity(), seconds(later))
        assert runtime_status(view).last_activity_at == T0
        assert view.last_activity == seconds(later)
    view, _ = step(
        view, IncomingMessage("+15550001", "again", "3EB02", "15550001@s.whatsapp.net", T0), T0 + ACTIVITY_GRANULARITY
    )
    assert runtime_status(view).last_activity_at == T0 + ACTIVITY_GRANULARITY


def test_endings_ask_for_a_reconnect_with_the_right_minimum() -> None:
    connected = SessionView(state=RuntimeState.CONNECTED, jid=JID, stored_jid=JID, connected_at=T0)
    view, actions = step(connected, Disconnected("socket closed"), T0)
    assert view.state == RuntimeState.DISCONNECTED
    assert view.connected_at is None
    assert actions == [Reconnect()]
    view, actions = step(connected, StreamReplaced(), T0)
    assert actions == [Reconnect(60.0)]
    view, actions = step(connected, LoggedOut("401"), T0)
    assert view.state == RuntimeState.LOGGED_OUT
    assert view.stored_jid is None
    assert actions == [Reconnect()]
    view, actions = step(connected, TemporaryBan(seconds(600), "banned"), T0)
    assert view.state == RuntimeState.BANNED
    assert actions == [Reconnect(600.0)]
    assert runtime_status(view).banned_until == seconds(600)
    assert view.last_error == "banned until 2026-11-29T12:10:00Z"
    view, _ = step(view, Connected(JID, None), seconds(601))
    assert view.banned_until is None
    assert view.last_error is None
    view, actions = step(view, Stopped(), seconds(700))
    assert view.state == RuntimeState.STOPPED
    assert actions == []
    assert runtime_status(view).jid is None


def _conditions(runtime: RuntimeStatus | None, now: datetime = T0) -> tuple[object, ...]:
    return desired_status(facts("s1", shard=0, runtime=runtime), ADMITTED, 0, now).conditions


def test_a_ban_with_an_expiry_is_reconciling_and_one_without_is_stalled() -> None:
    banned = RuntimeStatus(state=RuntimeState.BANNED, stored_jid=JID, banned_until=seconds(600), last_error="x")
    status = desired_status(facts("s1", shard=0, runtime=banned), ADMITTED, 0, T0)
    assert status.phase == Phase.BANNED
    reconciling = find_condition(status.conditions, ConditionType.RECONCILING)
    assert reconciling is not None
    assert reconciling.reason == Reason.BANNED
    assert "until 2026-11-29T12:10:00Z" in reconciling.message
    assert find_condition(status.conditions, ConditionType.STALLED) is None
    unknown = RuntimeStatus(state=RuntimeState.BANNED, stored_jid=JID, last_error="banned")
    status = desired_status(facts("s1", shard=0, runtime=unknown), ADMITTED, 0, T0)
    stalled = find_condition(status.conditions, ConditionType.STALLED)
    assert stalled is not None
    assert stalled.reason == Reason.BANNED
    assert status.phase == Phase.FAILED


def _events(before: RuntimeStatus | None, after: RuntimeStatus | None) -> list[EventReason]:
    start = desired_status(facts("s1", shard=0, runtime=before), ADMITTED, 0, T0)
    end = desired_status(facts("s1", shard=0, runtime=after), ADMITTED, 0, seconds(5))
    found = lifecycle_events("acme", start.conditions, end.conditions)
    assert all(e.message.startswith("tenant acme: ") for e in found)
    return [e.reason for e in found]


CONNECTED = RuntimeStatus(state=RuntimeState.CONNECTED, jid=JID, device_id=53, stored_jid=JID)
PAIRING = RuntimeStatus(state=RuntimeState.AWAITING_PAIRING)
DISCONNECTED = RuntimeStatus(state=RuntimeState.DISCONNECTED, stored_jid=JID, last_error="socket closed")
LOGGED_OUT = RuntimeStatus(state=RuntimeState.LOGGED_OUT, last_error="logged out: 401")
BANNED = RuntimeStatus(state=RuntimeState.BANNED, stored_jid=JID, banned_until=seconds(600))
MISMATCH = RuntimeStatus(
    state=RuntimeState.CONNECTED, jid="4915112345601:54@s.whatsapp.net", device_id=54, stored_jid=JID
)


def test_every_lifecycle_change_has_its_event_and_nothing_else_does() -> None:
    assert _events(PAIRING, CONNECTED) == [EventReason.PAIRED]
    assert _events(CONNECTED, DISCONNECTED) == []
    assert _events(DISCONNECTED, CONNECTED) == [EventReason.RECONNECTED]
    assert _events(CONNECTED, LOGGED_OUT) == [EventReason.LOGGED_OUT]
    assert _events(LOGGED_OUT, CONNECTED) == [EventReason.RE_PAIRED]
    assert _events(CONNECTED, BANNED) == [EventReason.BANNED]
    assert _events(BANNED, CONNECTED) == [EventReason.BAN_LIFTED]
    assert _events(CONNECTED, MISMATCH) == [EventReason.IDENTITY_MISMATCH]
    for same in (CONNECTED, PAIRING, DISCONNECTED, LOGGED_OUT, BANNED, MISMATCH, None):
        assert _events(same, same) == []


def test_events_are_judged_on_conditions_not_on_timestamps() -> None:
    before = set_condition(
        (), ConditionType.CONNECTED, "True", Reason.CONNECTED, "connected", observed_generation=1, now=T0
    )
    assert lifecycle_events("acme", before, before) == []


def test_refused_tenant_workloads_back_off_to_a_minute() -> None:
    retry = None
    delays = []
    for _ in range(9):
        retry = retry_after(retry, T0)
        delays.append((retry.at - T0).total_seconds())
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_a_workload_that_went_out_of_date_is_applied_again_once_done_and_wakes_no_pass() -> None:
    async def scenario() -> tuple[list[int], bool]:
        controller = Controller(OperatorConfig(), cast(KubeClient, None))  # the writes below reach no API
        applied: list[int] = []
        first_may_finish = asyncio.Event()

        async def apply(version: int) -> None:
            if version == 1:
                await first_may_finish.wait()
            applied.append(version)

        controller._start_tenant_work("acme", 1, partial(apply, 1))
        await asyncio.sleep(0)  # one turn of the loop (no clock): the first is in flight, waiting to finish
        for version in (2, 3):  # decided while the first is in flight: only the latest is applied after it
            controller._start_tenant_work("acme", version, partial(apply, version))
        first_may_finish.set()
        for _ in range(100):  # a few turns of the loop, bounded
            if not controller._tenant_work:
                break
            await asyncio.sleep(0)  # one turn of the loop (no clock)
        return applied, controller._wake.is_set()

    applied, woken = asyncio.run(scenario())
    assert applied == [1, 3]
    assert not woken


def _story(*runtimes: RuntimeStatus) -> list[EventReason]:
    """Events along a sequence of runtime reports, each pass starting from the status the last one wrote."""
    status = desired_status(facts("s1", shard=0, runtime=runtimes[0]), ADMITTED, 0, T0)
    reasons: list[EventReason] = []
    for i, runtime in enumerate(runtimes[1:], start=1):
        seen = replace(facts("s1", shard=0), status=status.model_copy(update={"runtime": runtime}))
        after = desired_status(seen, ADMITTED, 0, seconds(i))
        reasons += [e.reason for e in lifecycle_events("acme", status.conditions, after.conditions)]
        status = after
    return reasons


def test_a_logout_then_a_new_pairing_is_re_paired_even_through_intermediate_states() -> None:
    connecting = RuntimeStatus(state=RuntimeState.CONNECTING)
    story = _story(CONNECTED, LOGGED_OUT, connecting, PAIRING, CONNECTED)
    assert story == [EventReason.LOGGED_OUT, EventReason.RE_PAIRED]
    assert _story(PAIRING, connecting, PAIRING, CONNECTED, DISCONNECTED, CONNECTED) == [
        EventReason.PAIRED,
        EventReason.RECONNECTED,
    ]


def test_health_and_device_number_gauges_follow_each_pass() -> None:
    from collections import Counter

    from prometheus_client import REGISTRY

    from waso.operator import metrics

    def sample(name: str, labels: dict[str, str]) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert [metrics.device_range(d) for d in (1, 10, 11, 47, 53, 101)] == [
        "1-10", "1-10", "11-20", "21-50", "51-100", "101-9999",
    ]  # fmt: skip
    metrics.publish(metrics.HEALTH_FAILURES, Counter({("acme", "IdentityMismatch"): 2, ("globex", "MalformedJid"): 1}))
    assert sample("waso_sessions_unhealthy", {"tenant": "acme", "reason": "IdentityMismatch"}) == 2
    metrics.publish(metrics.HEALTH_FAILURES, Counter({("acme", "IdentityMismatch"): 1}))
    assert sample("waso_sessions_unhealthy", {"tenant": "acme", "reason": "IdentityMismatch"}) == 1
    assert sample("waso_sessions_unhealthy", {"tenant": "globex", "reason": "MalformedJid"}) is None  # gone
    metrics.publish(metrics.DEVICE_NUMBERS, Counter({("21-50",): 3}))
    assert sample("waso_sessions_by_device_number", {"range": "21-50"}) == 3


def _decision(namespace: str, name: str, reason: Reason, warning: bool = False) -> Decision:
    return Decision(namespace, name, reason.value, f"{reason.value} because", warning)


def test_a_burst_of_admissions_is_one_event_per_tenant_and_reason() -> None:
    burst = [_decision("acme", f"s{i:02d}", Reason.ADMITTED) for i in range(12)]
    waiting = [_decision("acme", f"w{i}", Reason.CAPACITY_EXCEEDED, warning=True) for i in range(2)]
    lone = _decision("globex", "only", Reason.ADMITTED)
    single, bursts = decision_events([*burst, *waiting, lone])
    assert single == [lone]
    by_reason = {b.reason: b for b in bursts}
    assert set(by_reason) == {"Admitted", "CapacityExceeded"}
    admitted = by_reason["Admitted"]
    assert (admitted.namespace, admitted.count, admitted.warning) == ("acme", 12, False)
    assert admitted.message == (
        "tenant acme: Admitted for 12 sessions at once: s00, s01, s02, s03, s04, s05, s06, s07, s08, s09 "
        "and 2 more (s00: Admitted because)"
    )
    assert by_reason["CapacityExceeded"].warning
    assert by_reason["CapacityExceeded"].count == 2


def test_evictions_stay_one_event_per_session_even_in_a_burst() -> None:
    evicted = [_decision("acme", f"s{i}", Reason.EVICTED, warning=True) for i in range(5)]
    single, bursts = decision_events(evicted)
    assert single == evicted
    assert bursts == []


def _stored(session: SessionFacts, desired: WhatsAppSessionStatus) -> SessionFacts:
    """The session as the watch delivers it once ``desired`` is written."""
    return replace(session, status=desired.model_copy(update={"runtime": session.runtime}), resource_version=2)


def test_a_settled_status_is_reused_until_the_session_or_its_inputs_change() -> None:
    settled = SettledStatuses(timedelta(days=14))
    inputs = StatusInputs(ADMITTED, 0)
    session = _stored(facts("s1"), desired_status(facts("s1"), ADMITTED, 0, T0))
    desired = desired_status(session, ADMITTED, 0, T0)
    settled.put(session, inputs, desired, T0)
    found = settled.get(session, inputs, T0 + timedelta(days=365))
    assert found is not None
    assert (found.phase, found.unhealthy, found.parked_since) == ("Starting", None, None)
    assert settled.get(session, StatusInputs(ADMITTED, 1), T0) is None  # other inputs: computed again
    settled.put(session, inputs, desired, T0)
    assert settled.get(replace(session, resource_version=3), inputs, T0) is None  # the informer's new facts
    assert len(settled) == 0


def test_a_parked_or_banned_status_is_computed_again_when_the_clock_would_change_it() -> None:
    flag_after = timedelta(days=14)
    settled = SettledStatuses(flag_after)
    suspended = Verdict(False, Reason.SUSPENDED, "spec.suspend is true")
    session = _stored(facts("s1"), desired_status(facts("s1"), suspended, 0, T0))
    inputs = StatusInputs(suspended, 0)
    settled.put(session, inputs, desired_status(session, suspended, 0, T0), T0)
    assert settled.get(session, inputs, T0 + flag_after - timedelta(seconds=1)) is not None
    assert settled.get(session, inputs, T0 + flag_after) is None  # now ParkedTooLong: not the same status
    flagged = desired_status(session, suspended, 0, T0 + flag_after)
    assert find_condition(flagged.conditions, ConditionType.PARKED).reason == Reason.PARKED_TOO_LONG

    banned = RuntimeStatus(state=RuntimeState.BANNED, stored_jid=JID, banned_until=T0 + timedelta(minutes=10))
    session = _stored(facts("s2", runtime=banned), desired_status(facts("s2", runtime=banned), ADMITTED, 0, T0))
    inputs = StatusInputs(ADMITTED, 0)
    settled.put(session, inputs, desired_status(session, ADMITTED, 0, T0), T0)
    assert settled.get(session, inputs, T0 + timedelta(minutes=9)) is not None
    assert settled.get(session, inputs, T0 + timedelta(minutes=10)) is None  # "the ban ended": a new message
