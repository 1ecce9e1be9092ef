"""Eviction under capacity pressure end to end (issue 11): the real API server, runtime processes, simulator.

The rules themselves are proven over plain data (test_eviction_units); this shows the operator,
the runtimes and the API server together: a full cluster makes room for new sessions by
evicting exactly as many idle ones, least recently active first, without touching active
ones; lower priorities and recent activity protect a session; evicted sessions resume from
their stored credentials (no QR code, no new link) when room returns; people evict and resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client
from prometheus_client import REGISTRY

from tests import test_runtime
from tests.conftest import ControlPlane
from tests.operator_support import Tenants, condition, create_session, get, list_sessions
from tests.runtime_support import Process, http_json, start_runtime
from tests.support import run_waso, wait_for
from waso.api.session import ACTIVITY_GRANULARITY

simulator = test_runtime.simulator
operator = test_runtime.operator

CAP = 35
NORMAL = 1
"""The priority of every session but the low one (priorities start at 0)."""
MIN_IDLE = 60
"""Seconds; as long as the runtime's activity granularity, so the test's own steps stay far inside it."""


def _phone(group: int, index: int) -> str:
    return f"+491517{group}{index:06d}"


def _time(text: str | None) -> datetime | None:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) if text else None


def _idle_since(obj: dict[str, Any]) -> datetime:
    """As the operator counts it (waso.operator.eviction.idle_since)."""
    status = obj.get("status", {})
    runtime = status.get("runtime", {})
    active = _time(runtime.get("lastActivityAt"))
    moments = [
        _time(obj["metadata"]["creationTimestamp"]),
        _time(status.get("admittedAt")),
        _time(runtime.get("connectedAt")),
        active + ACTIVITY_GRANULARITY if active else None,
    ]
    return max(m for m in moments if m is not None)


def _admission(obj: dict[str, Any]) -> tuple[str, str] | None:
    found = condition(obj, "Admitted")
    return (found["status"], found["reason"]) if found else None


def _running(obj: dict[str, Any]) -> bool:
    return (
        _admission(obj) == ("True", "Admitted") and obj.get("status", {}).get("runtime", {}).get("state") == "Connected"
    )


def _by_name(api: client.ApiClient, namespace: str) -> dict[str, dict[str, Any]]:
    return {item["metadata"]["name"]: item for item in list_sessions(api, namespace)}


def _wait_all(api: client.ApiClient, namespace: str, names: list[str], check: Any, what: str, timeout: float) -> None:
    def probe() -> bool:
        found = _by_name(api, namespace)
        return all(name in found and check(found[name]) for name in names)

    wait_for(probe, timeout=timeout, what=f"{namespace}: {what}", interval=0.5)


def _events(api: client.ApiClient, namespace: str, reason: str) -> list[str]:
    items = client.CoreV1Api(api).list_namespaced_event(namespace).items
    return [str(e.message) for e in items if e.reason == reason]


def _message(simulator: Process, phone: str) -> None:
    reply = http_json("POST", f"{simulator.url}/v1/phones/{phone}/inbound", {"from": "+15550001", "text": "hi"})
    assert reply.body["delivered"] == 1, (phone, reply.body)


def _metric(name: str, **labels: str) -> float:
    # The operator runs in this process (KopfRunner): its counters are in the default registry.
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def runtimes(control_plane: ControlPlane, tenants: Tenants, simulator: Process, tmp_path: Path) -> Iterator[list[str]]:
    """Three tenants, each with one runtime process: quiet (10 idle), busy (25 active), growing (newcomers)."""
    namespaces = [tenants.namespace(name) for name in ("quiet", "busy", "growing")]
    started: list[Process] = []
    try:
        for namespace in namespaces:
            data = tmp_path / namespace
            started.append(start_runtime(control_plane.kubeconfig, namespace, 0, data, simulator.url, tmp_path))
        yield namespaces
    finally:
        for process in started:
            process.stop(kill=True)


@pytest.mark.simulator_args("--auto-pair", "0.2")
@pytest.mark.operator_env(
    WASO_MAX_SESSIONS=str(CAP),
    WASO_EVICTION__MIN_IDLE_SECONDS=str(MIN_IDLE),
    WASO_DEFAULT_QUOTA__MAX_SESSIONS="50",
    WASO_DEFAULT_QUOTA__SESSIONS_PER_POD="50",
)
def test_a_full_cluster_evicts_idle_sessions_for_new_ones_and_resumes_them_without_a_new_scan(
    control_plane: ControlPlane, simulator: Process, operator: KopfRunner, runtimes: list[str]
) -> None:
    api = control_plane.api
    quiet, busy, growing = runtimes
    idle = [f"idle-{i}" for i in range(10)]
    active = [f"active-{i:02d}" for i in range(25)]
    new = [f"new-{i}" for i in range(5)]

    for index, name in enumerate(idle):
        create_session(api, quiet, name, _phone(0, index), priority=NORMAL)
    _wait_all(api, quiet, idle, _running, "10 sessions connected", timeout=120)
    for index, name in enumerate(active):
        create_session(api, busy, name, _phone(1, index), priority=NORMAL)
    _wait_all(api, busy, active, _running, "25 sessions connected", timeout=180)

    # The ten of quiet: idle past the minimum (waiting on the clock is the point here, bounded).
    def idle_long_enough(obj: dict[str, Any]) -> bool:
        return datetime.now(UTC) - _idle_since(obj) >= timedelta(seconds=MIN_IDLE + 2)

    _wait_all(api, quiet, idle, idle_long_enough, "idle past the minimum", timeout=MIN_IDLE + 120)
    # The 25 of busy: a message each, seen by the operator in their status.
    for index in range(len(active)):
        _message(simulator, _phone(1, index))
    _wait_all(api, busy, active, lambda o: "lastActivityAt" in o["status"]["runtime"], "activity", timeout=60)

    quiet_before = _by_name(api, quiet)
    busy_before = _by_name(api, busy)
    least_recent = sorted(idle, key=lambda name: (_idle_since(quiet_before[name]), name))[:5]
    stats_before = http_json("GET", simulator.url + "/v1/stats").body

    for index, name in enumerate(new):
        create_session(api, growing, name, _phone(2, index), priority=NORMAL)
    _wait_all(api, growing, new, _running, "the 5 newcomers connected", timeout=120)

    quiet_now = _by_name(api, quiet)
    evicted = sorted(name for name, obj in quiet_now.items() if _admission(obj) == ("False", "Evicted"))
    assert evicted == sorted(least_recent)
    for name in evicted:
        obj = quiet_now[name]
        assert obj["status"]["phase"] == "Evicted"
        assert obj["status"]["eviction"]["lastReason"] == "CapacityPressure"
        assert obj["status"]["eviction"]["slotTakenBy"].startswith(f"{growing}/new-")
        parked = condition(obj, "Parked")
        assert parked is not None
        assert (parked["status"], parked["reason"]) == ("True", "Evicted")
    _wait_all(api, quiet, evicted, lambda o: o["status"]["runtime"]["state"] == "Stopped", "stopped", timeout=60)
    assert all(_running(quiet_now[name]) for name in idle if name not in evicted)

    # The active ones never disconnected: same connection, one socket each all along.
    busy_now = _by_name(api, busy)
    stats = http_json("GET", simulator.url + "/v1/stats").body
    for name in active:
        assert _running(busy_now[name]), busy_now[name]["status"]
        assert (
            busy_now[name]["status"]["runtime"]["connectedAt"] == busy_before[name]["status"]["runtime"]["connectedAt"]
        )
        jid = busy_now[name]["status"]["runtime"]["jid"]
        assert (stats["live"][jid], stats["maxLive"][jid]) == (1, 1)
    assert stats["counters"]["logins"] - stats_before["counters"]["logins"] == len(new)  # the newcomers' first logins

    # Metrics and Events say so, by tenant and reason.
    assert _metric("waso_evictions_total", tenant=quiet, reason="CapacityPressure") == 5
    assert _metric("waso_evictions_total", tenant=busy, reason="CapacityPressure") == 0
    assert _metric("waso_sessions_parked", tenant=quiet, reason="Evicted") == 5
    messages = wait_for(lambda: _events(api, quiet, "Evicted") if len(_events(api, quiet, "Evicted")) == 5 else None,
                        timeout=30, what="five Evicted events")  # fmt: skip
    assert all(f"for {growing}/new-" in message for message in messages), messages

    # Recent activity and higher priorities protect a session: the remaining idle ones and the
    # newcomers get a message; then a low-priority and a normal newcomer find nothing to evict.
    for index, name in enumerate(idle):
        if name not in evicted:
            _message(simulator, _phone(0, index))
    for index in range(len(new)):
        _message(simulator, _phone(2, index))
    _wait_all(api, quiet, [n for n in idle if n not in evicted], lambda o: "lastActivityAt" in o["status"]["runtime"],
              "activity", timeout=60)  # fmt: skip
    _wait_all(api, growing, new, lambda o: "lastActivityAt" in o["status"]["runtime"], "activity", timeout=60)
    create_session(api, growing, "low", _phone(3, 0), priority=NORMAL - 1)
    create_session(api, growing, "late", _phone(3, 1), priority=NORMAL)
    waiting = ("False", "CapacityExceeded")
    _wait_all(api, growing, ["low", "late"], lambda o: _admission(o) == waiting, "both waiting", timeout=60)
    # Whoever would have been evicted for them would have let them in in the same decision.
    assert _metric("waso_evictions_total", tenant=quiet, reason="CapacityPressure") == 5
    assert _metric("waso_evictions_total", tenant=busy, reason="CapacityPressure") == 0
    assert _metric("waso_evictions_total", tenant=growing, reason="CapacityPressure") == 0
    custom = client.CustomObjectsApi(api)
    for name in ["low", "late", *new]:  # room returns
        custom.delete_namespaced_custom_object("waso.dev", "v1alpha1", growing, "whatsappsessions", name)

    # The evicted ones resume from their stored credentials: the same device, no QR code, no new link.
    _wait_all(api, quiet, evicted, _running, "the evicted sessions connected again", timeout=120)
    resumed = _by_name(api, quiet)
    after = http_json("GET", simulator.url + "/v1/stats").body
    for name in evicted:
        assert resumed[name]["status"]["runtime"]["jid"] == quiet_before[name]["status"]["runtime"]["jid"]
        assert condition(resumed[name], "Parked") is None
    assert after["counters"]["links"] == stats["counters"]["links"]
    assert after["counters"]["qr_codes"] == stats["counters"]["qr_codes"]
    assert _metric("waso_resumptions_total", tenant=quiet, reason="CapacityPressure") == 5

    # A person parks a session, with room to spare: it stays parked until a person resumes it.
    target = f"{quiet}/{evicted[0]}"
    done = run_waso("evict", target, kubeconfig=control_plane.kubeconfig)
    assert done.returncode == 0, done.stderr

    def parked_on_request(obj: dict[str, Any]) -> bool:
        return _admission(obj) == ("False", "Evicted") and obj["status"]["runtime"]["state"] == "Stopped"

    _wait_all(api, quiet, [evicted[0]], parked_on_request, "parked on request", timeout=60)
    assert get(api, quiet, evicted[0])["status"]["eviction"]["lastReason"] == "Manual"
    again = run_waso("evict", target, kubeconfig=control_plane.kubeconfig)
    assert again.returncode == 1
    assert "already evicted on request" in again.stderr
    done = run_waso("resume", target, kubeconfig=control_plane.kubeconfig)
    assert done.returncode == 0, done.stderr
    _wait_all(api, quiet, [evicted[0]], _running, "resumed on request", timeout=60)
    assert (
        get(api, quiet, evicted[0])["status"]["runtime"]["jid"] == quiet_before[evicted[0]]["status"]["runtime"]["jid"]
    )
    refused = run_waso("resume", target, kubeconfig=control_plane.kubeconfig)
    assert refused.returncode == 1
    assert "is not evicted" in refused.stderr


@pytest.mark.simulator_args("--auto-pair", "0.2")
@pytest.mark.operator_env(
    WASO_EVICTION__MIN_IDLE_SECONDS="0", WASO_EVICTION__MEMORY_SETTLE_SECONDS="60", WASO_RESYNC_SECONDS="2"
)
def test_a_pod_near_its_memory_limit_parks_its_least_recently_used_session_until_memory_is_back(
    control_plane: ControlPlane, tenants: Tenants, simulator: Process, operator: KopfRunner, tmp_path: Path
) -> None:
    """The runtime reads its cgroup's memory.current and memory.max (here files the test writes)."""
    api = control_plane.api
    namespace = tenants.namespace("tight")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    limit = 1_000_000_000
    (cgroup / "memory.max").write_text(f"{limit}\n")
    (cgroup / "memory.current").write_text(f"{limit // 2}\n")
    runtime = start_runtime(control_plane.kubeconfig, namespace, 0, tmp_path / "data", simulator.url, tmp_path,
                            WASO_CGROUP_DIR=str(cgroup))  # fmt: skip
    try:
        names = [f"s{i}" for i in range(4)]
        for index, name in enumerate(names):
            create_session(api, namespace, name, _phone(4, index))
        _wait_all(api, namespace, names, _running, "4 sessions connected", timeout=120)
        before = _by_name(api, namespace)
        least_recent = min(names, key=lambda name: (_idle_since(before[name]), name))
        stats = http_json("GET", simulator.url + "/v1/stats").body

        # 95 % of the limit: about a quarter of the use per session, 20 % above the resume fraction: one
        (cgroup / "memory.current").write_text(f"{limit * 95 // 100}\n")

        def parked() -> list[str]:
            found = _by_name(api, namespace)
            return [name for name, obj in found.items() if _admission(obj) == ("False", "Evicted")]

        assert wait_for(parked, timeout=60, what="a session parked for memory") == [least_recent]
        obj = get(api, namespace, least_recent)
        assert obj["status"]["eviction"]["lastReason"] == "MemoryPressure"
        assert "neared its memory limit" in condition(obj, "Admitted")["message"]
        assert _metric("waso_evictions_total", tenant=namespace, reason="MemoryPressure") == 1
        _wait_all(api, namespace, [least_recent], lambda o: o["status"]["runtime"]["state"] == "Stopped",
                  "stopped", timeout=60)  # fmt: skip

        # Back below the resume fraction: it resumes from its stored credentials.
        (cgroup / "memory.current").write_text(f"{limit // 2}\n")
        _wait_all(api, namespace, names, _running, "all 4 running again", timeout=60)
        assert parked() == []
        after = http_json("GET", simulator.url + "/v1/stats").body
        assert after["counters"]["links"] == stats["counters"]["links"]
        assert after["counters"]["qr_codes"] == stats["counters"]["qr_codes"]
        assert (
            get(api, namespace, least_recent)["status"]["runtime"]["jid"]
            == before[least_recent]["status"]["runtime"]["jid"]
        )
    finally:
        runtime.stop(kill=True)
