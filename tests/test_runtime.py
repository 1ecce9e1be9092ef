"""The session runtime as a real process, against the real API server and a real simulator process."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from kopf.testing import KopfRunner
from kubernetes import client

from tests.conftest import ControlPlane, RedisServer
from tests.operator_support import Tenants, api_token, condition, create_quota, create_session, get, metrics_token
from tests.runtime_support import Process, Reply, SseStream, http_json, simulator_process, start_runtime
from tests.support import kubectl, run_waso, wait_for
from tests.test_legacy_import import baileys_creds, write_creds
from waso.api.base import GROUP, VERSION
from waso.legacy.importer import STORE_FILE, public_key, read_row

PHONE = "+4915112345601"


@pytest.fixture
def simulator(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Process]:
    marker = request.node.get_closest_marker("simulator_args")
    with simulator_process(tmp_path, "--qr-interval", "3", *(marker.args if marker else ())) as process:
        yield process


@pytest.fixture
def operator(
    control_plane: ControlPlane,
    tenants: Tenants,
    simulator: Process,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[KopfRunner]:
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    monkeypatch.setenv("WASO_METRICS_PORT", "0")
    monkeypatch.setenv("WASO_TRANSPORT", "simulator")
    # These tests run the shards' runtimes as processes; the node must not start a second one from the image.
    monkeypatch.setenv("WASO_RUNTIME_IMAGE", "waso:not-on-the-node")
    monkeypatch.setenv("WASO_IMAGE_PULL_POLICY", "Never")
    monkeypatch.setenv("WASO_SIMULATOR_URL", simulator.url)
    marker = request.node.get_closest_marker("operator_env")
    for name, value in (marker.kwargs if marker else {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WASO_NAMESPACES", tenants.pattern)
    with KopfRunner(["run", "--standalone", "--all-namespaces", "-m", "waso.operator.handlers"], timeout=60) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output


class World:
    """One tenant namespace with its runtimes, as a test drives it."""

    def __init__(
        self, control_plane: ControlPlane, tenants: Tenants, simulator: Process, tmp_path: Path, tenant: str = "acme"
    ) -> None:
        self.api = control_plane.api
        self.kubeconfig = control_plane.kubeconfig
        self.simulator = simulator
        self.tmp = tmp_path
        self.namespace = tenants.namespace(tenant)
        self.token = api_token(self.api, self.namespace)
        """An application's token with every permission of the runtime's API."""
        self.metrics_token = metrics_token(self.api, self.namespace)
        self.runtimes: list[Process] = []

    def runtime(self, shard: int = 0, data: str = "data", **env: str) -> Process:
        process = start_runtime(
            self.kubeconfig, self.namespace, shard, self.tmp / data, self.simulator.url, self.tmp, **env
        )
        self.runtimes.append(process)
        return process

    def session(self, name: str = "s1", phone: str = PHONE, **spec: Any) -> None:
        create_session(self.api, self.namespace, name, phone, **spec)

    def runtime_status(self, name: str = "s1") -> dict[str, Any]:
        runtime: dict[str, Any] = get(self.api, self.namespace, name).get("status", {}).get("runtime", {})
        return runtime

    def wait_state(self, state: str, name: str = "s1", timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: (r := self.runtime_status(name)).get("state") == state and r,
            timeout=timeout,
            what=f"{name} runtime state {state} (runtime logs: {[p.log.name for p in self.runtimes]})",
        )

    def stats(self) -> dict[str, Any]:
        body: dict[str, Any] = http_json("GET", self.simulator.url + "/v1/stats").body
        return body

    def pair_by_qr(self, runtime: Process, name: str = "s1", phone: str = PHONE) -> dict[str, Any]:
        stream = SseStream(runtime.port, f"/v1/sessions/{name}/qr", token=self.token)
        assert stream.status == 200
        scanned = stream.scan(self.simulator.url, phone)
        assert stream.until("paired") == {"jid": scanned["jid"]}
        stream.close()
        return scanned

    def stop(self) -> None:
        for process in self.runtimes:
            process.stop(kill=True)


@pytest.fixture
def world(
    control_plane: ControlPlane, tenants: Tenants, simulator: Process, operator: KopfRunner, tmp_path: Path
) -> Iterator[World]:
    found = World(control_plane, tenants, simulator, tmp_path)
    try:
        yield found
    finally:
        found.stop()


def test_qr_pairing_connects_with_the_right_identity(world: World) -> None:
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    scanned = world.pair_by_qr(runtime)
    status = world.wait_state("Connected")
    assert status["jid"] == scanned["jid"] == "4915112345601:1@s.whatsapp.net"
    assert status["deviceId"] == scanned["deviceId"] == 1
    assert status["storedJid"] == scanned["jid"]
    waited = kubectl(
        world.kubeconfig, "wait", "--for=condition=Ready", "was/s1", "-n", world.namespace, "--timeout=30s"
    )
    assert "condition met" in waited.stdout
    ready = condition(get(world.api, world.namespace, "s1"), "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("True", "Ready")


def test_pair_code_pairing(world: World) -> None:
    runtime = world.runtime()
    world.session(pairing={"method": "PhoneCode"})
    world.wait_state("AwaitingPairing")
    reply = http_json("POST", f"{runtime.url}/v1/sessions/s1/pair-code", token=world.token)
    assert reply.status == 200, reply.body
    code = reply.body["code"]
    assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}", code)
    wrong = http_json("POST", f"{world.simulator.url}/v1/phones/{PHONE}/pair-code", {"code": "AAAA-AAAA"})
    assert wrong.status == 422
    confirmed = http_json("POST", f"{world.simulator.url}/v1/phones/{PHONE}/pair-code", {"code": code})
    assert confirmed.status == 200, confirmed.body
    assert world.wait_state("Connected")["jid"] == confirmed.body["jid"]


def test_restarted_runtime_reconnects_from_stored_credentials(world: World) -> None:
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    scanned = world.pair_by_qr(runtime)
    connected_at = world.wait_state("Connected")["connectedAt"]
    before = world.stats()["counters"]

    runtime.stop(kill=True)  # its last word stays until the next holder of the lease speaks
    world.runtime()  # same data directory: the shard's volume
    status = wait_for(
        lambda: (r := world.runtime_status()).get("state") == "Connected" and r["connectedAt"] != connected_at and r,
        timeout=60, what="Connected from the new runtime",
    )  # fmt: skip
    assert status["jid"] == scanned["jid"]
    after = world.stats()["counters"]
    assert after["links"] == before["links"] == 1  # no new device linked
    assert after["qr_codes"] == before["qr_codes"]  # and no new QR code offered
    assert after["logins"] == before["logins"] + 1


@pytest.mark.operator_env(WASO_RESYNC_SECONDS="2")
def test_a_killed_runtime_is_reported_lost_once_its_heartbeat_expires_and_ready_again_with_its_successor(
    world: World,
) -> None:
    runtime = world.runtime()  # heartbeat every 2 s, leases of 3 s (runtime_support)
    world.session()
    world.wait_state("AwaitingPairing")
    world.pair_by_qr(runtime)
    world.wait_state("Connected")
    wait_for(lambda: (c := condition(get(world.api, world.namespace, "s1"), "Ready")) and c["status"] == "True",
             timeout=30, what="s1 Ready")  # fmt: skip

    runtime.stop(kill=True)  # as a lost node does: no last word

    def lost() -> dict[str, Any] | None:
        session = get(world.api, world.namespace, "s1")
        found = condition(session, "Connected")
        return session if found and found["reason"] == "HeartbeatLost" else None

    session = wait_for(lost, timeout=60, what="Connected=Unknown (HeartbeatLost)", interval=0.2)
    connected, ready = condition(session, "Connected"), condition(session, "Ready")
    assert connected is not None
    assert ready is not None
    assert connected["status"] == "Unknown"
    assert "last renewed its heartbeat at" in connected["message"]
    assert (ready["status"], ready["reason"], session["status"]["phase"]) == ("False", "HeartbeatLost", "Disconnected")
    assert session["status"]["runtime"]["state"] == "Connected"  # the runtime's own last word is kept as it was

    world.runtime()  # the pod's successor, on the same volume
    wait_for(lambda: (c := condition(get(world.api, world.namespace, "s1"), "Ready")) and c["status"] == "True",
             timeout=60, what="s1 Ready again with the new runtime")  # fmt: skip


def test_two_runtimes_on_one_shard_never_hold_two_sockets(world: World) -> None:
    first = world.runtime()
    second = world.runtime(WASO_POD_NAME="waso-sessions-0-twin")  # same shard, same volume, another pod
    world.session()
    world.wait_state("AwaitingPairing")
    holder = first if _holds(world, first) else second
    other = second if holder is first else first
    jid = world.pair_by_qr(holder)["jid"]
    world.wait_state("Connected")

    # The standby keeps trying for the lease all along; it never writes its view of the session.
    seen = []
    for _ in range(150):  # 30 s, every 200 ms
        status = world.runtime_status()
        seen.append((status.get("state"), status.get("jid")))
        assert world.stats()["live"].get(jid) == 1
        time.sleep(0.2)
    assert set(seen) == {("Connected", jid)}, Counter(seen)

    holder.stop(kill=True)  # SIGKILL: the other takes over once the lease expires
    killed = time.monotonic()
    # The killed holder's last status stays until the new holder writes: the new socket is what counts.
    wait_for(
        lambda: _holds(world, other)
        and world.stats()["live"].get(jid) == 1
        and world.runtime_status().get("state") == "Connected",
        timeout=60, what="takeover: the other runtime connected and shown in status.runtime",
    )  # fmt: skip
    takeover = time.monotonic() - killed
    assert takeover < 3 + 5, f"Connected again {takeover:.1f} s after the holder died (lease 3 s)"
    assert world.stats()["live"].get(jid) == 1
    other.stop()  # graceful: releases the lease
    restarted = world.runtime()
    wait_for(lambda: world.stats()["live"].get(jid) == 1 and _holds(world, restarted), timeout=60, what="restart")

    stats = world.stats()
    assert stats["maxLive"][jid] == 1, stats
    assert stats["counters"].get("stream_replaced", 0) == 0, stats


def _holds(world: World, runtime: Process) -> bool:
    lease = client.CoordinationV1Api(world.api).read_namespaced_lease("waso-session-s1", world.namespace)
    holder = lease.spec.holder_identity or ""
    return "/" in holder and _instance_of(runtime) == holder.split("/", 1)[1]


def _instance_of(runtime: Process) -> str | None:
    for line in runtime.log.read_text().splitlines():
        if "instance " in line:
            return line.rsplit("instance ", 1)[1].strip()
    return None


def _connected_session(world: World, runtime: Process, name: str = "s1", phone: str = PHONE) -> dict[str, Any]:
    """A session paired by QR and connected; the simulator's answer to the scan (jid, deviceId)."""
    world.session(name, phone)
    world.wait_state("AwaitingPairing", name)
    scanned = world.pair_by_qr(runtime, name, phone)
    world.wait_state("Connected", name)
    return scanned


def _send(world: World, runtime: Process, name: str, text: str) -> Any:
    body = {"to": "+4915199999999", "text": text}
    return http_json("POST", f"{runtime.url}/v1/sessions/{name}/messages", body, token=world.token)


def test_messages_arrive_and_the_tenant_limit_answers_429_in_memory(world: World) -> None:
    create_quota(world.api, world.namespace, messagesPerMinute=3, maxSessions=5, maxPairingStreams=2)
    runtime = world.runtime()
    _connected_session(world, runtime, "s1", PHONE)
    replies = [_send(world, runtime, "s1", f"hello {i}") for i in range(4)]
    assert [r.status for r in replies] == [202, 202, 202, 429]
    assert int(replies[3].headers["Retry-After"]) >= 1
    assert "3 messages per minute" in replies[3].body["error"]
    log = http_json("GET", f"{world.simulator.url}/v1/messages?from={quote(PHONE)}").body
    assert [m["text"] for m in log] == ["hello 0", "hello 1", "hello 2"]
    assert {m["jid"] for m in log} == {"4915112345601:1@s.whatsapp.net"}


def test_the_tenant_limit_is_shared_across_shards_through_redis(world: World, redis_server: RedisServer) -> None:
    create_quota(world.api, world.namespace, messagesPerMinute=3, maxSessions=5, maxPairingStreams=2, sessionsPerPod=1)
    shard0 = world.runtime(0, "data0", WASO_REDIS_URL=redis_server.url)
    shard1 = world.runtime(1, "data1", WASO_REDIS_URL=redis_server.url)
    _connected_session(world, shard0, "s1", PHONE)
    assert get(world.api, world.namespace, "s1")["status"]["shard"] == 0
    _connected_session(world, shard1, "s2", "+4915112345602")
    assert get(world.api, world.namespace, "s2")["status"]["shard"] == 1
    statuses = [
        _send(world, shard0, "s1", "a").status,
        _send(world, shard1, "s2", "b").status,
        _send(world, shard0, "s1", "c").status,
    ]
    refused = _send(world, shard1, "s2", "d")
    assert statuses == [202, 202, 202]
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert len(http_json("GET", f"{world.simulator.url}/v1/messages").body) == 3


def test_qr_streams_are_capped_time_out_and_free_their_slot(world: World) -> None:
    create_quota(world.api, world.namespace, maxPairingStreams=1, maxSessions=5)
    runtime = world.runtime(WASO_QR_STREAM_TIMEOUT="3", WASO_KEEPALIVE_SECONDS="0.5")
    world.session()
    world.wait_state("AwaitingPairing")
    time.sleep(2)  # the runtime re-reads the TenantQuota every second here

    first = SseStream(runtime.port, "/v1/sessions/s1/qr", token=world.token)
    assert first.status == 200
    assert first.until("qr")["code"].startswith("2@")
    second = http_json("GET", f"{runtime.url}/v1/sessions/s1/qr", token=world.token)
    assert second.status == 429
    assert "maxPairingStreams" in second.body["error"]
    assert second.headers["Retry-After"]

    assert first.until("timeout") == {"after": 3.0}
    assert first.next_event() is None  # the server closed the stream
    assert first.comments >= 1  # keep-alive pings were sent

    dropped = SseStream(runtime.port, "/v1/sessions/s1/qr", token=world.token)
    assert dropped.status == 200
    dropped.close()  # the client goes away without a word

    def slot_free() -> SseStream | None:
        stream = SseStream(runtime.port, "/v1/sessions/s1/qr", token=world.token)
        if stream.status == 200:
            return stream
        stream.close()
        return None

    wait_for(slot_free, timeout=10, what="the dropped client's slot to be freed").close()


def test_bad_requests_get_clear_4xx(world: World) -> None:
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    url = f"{runtime.url}/v1/sessions"
    message = {"to": "+4915199999999", "text": "x"}

    def call(method: str, path: str, body: Any = None, raw: bytes | None = None) -> Reply:
        return http_json(method, f"{url}{path}", body, raw, token=world.token)

    cases = [
        (call("POST", "/s1/messages", raw=b"{not json"), 400, "must be JSON"),
        (call("POST", "/s1/messages", {"to": "0151", "text": ""}), 422, "to: String should match"),
        (call("POST", "/s1/messages", {**message, "cc": 1}), 422, "cc"),
        (call("POST", "/s1/messages", message), 409, "not connected"),
        (call("POST", "/ghost/messages", message), 404, "not served"),
        (call("POST", "/ghost/pair-code"), 404, "not served"),
        (call("GET", "/s1/nothing"), 404, "Not Found"),
        (call("POST", "/s1/messages", raw=b"x" * 70000), 413, "Too Large"),
        (call("POST", "/s1/messages", raw=b"[" * 50000), 400, "nested too deeply"),
        (
            http_json("POST", f"{url}/s1/messages", message, token=world.token, content_type="text/plain"),
            415,
            "text/plain",
        ),
    ]
    for reply, status, text in cases:
        assert reply.status == status, (reply.status, reply.body)
        assert text in reply.body["error"], reply.body


def test_runtime_writes_status_only_on_change_and_stops_cleanly(world: World) -> None:
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    world.pair_by_qr(runtime)
    world.wait_state("Connected")
    writes = _metric(world, runtime, "waso_runtime_status_writes_total")
    time.sleep(5)  # lease renewals and keep-alives happen; nothing about the session changes
    assert _metric(world, runtime, "waso_runtime_status_writes_total") == writes

    runtime.stop()  # SIGTERM
    assert runtime.proc.returncode == 0, runtime.tail()
    assert world.runtime_status()["state"] == "Stopped"
    lease = client.CoordinationV1Api(world.api).read_namespaced_lease("waso-session-s1", world.namespace)
    assert lease.spec.holder_identity is None
    assert world.stats()["live"] == {}


def _metric(world: World, runtime: Process, name: str) -> float:
    reply = http_json("GET", f"{runtime.url}/metrics", token=world.metrics_token)
    assert reply.status == 200, reply.body
    text = str(reply.body)
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


__all__ = ["GROUP", "VERSION"]


def _fault(world: World, kind: str, **extra: Any) -> None:
    reply = http_json("POST", f"{world.simulator.url}/v1/phones/{PHONE}/faults", {"kind": kind, **extra})
    assert reply.status == 200, reply.body


def _condition_is(world: World, type_: str, status: str, reason: str) -> dict[str, Any]:
    def matches() -> dict[str, Any] | None:
        found = condition(get(world.api, world.namespace, "s1"), type_)
        return found if found is not None and (found["status"], found["reason"]) == (status, reason) else None

    return wait_for(matches, timeout=60, what=f"{type_}={status} ({reason})")


@pytest.mark.operator_env(WASO_REPAIR__ENABLED="false")  # the broken identity is shown, not repaired
def test_injected_faults_show_in_runtime_status_and_conditions(world: World) -> None:
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    first = world.pair_by_qr(runtime)["jid"]
    world.wait_state("Connected")
    _condition_is(world, "DeviceHealthy", "True", "Healthy")

    _fault(world, "identity_mismatch")
    _fault(world, "drop")  # the next login reports another device number than the one stored
    mismatch = _condition_is(world, "DeviceHealthy", "False", "IdentityMismatch")
    assert first in mismatch["message"]
    _condition_is(world, "Stalled", "True", "IdentityMismatch")

    _fault(world, "drop")  # an honest reconnect heals it
    _condition_is(world, "DeviceHealthy", "True", "Healthy")
    assert world.wait_state("Connected")["jid"] == first

    _fault(world, "ban", seconds=3)
    banned = world.wait_state("Banned")
    assert "banned" in banned["lastError"]
    assert banned["bannedUntil"] in banned["lastError"]
    _condition_is(world, "Reconciling", "True", "Banned")  # it ends by itself: not Stalled
    assert world.wait_state("Connected", timeout=30)["jid"] == first  # back once the ban expired

    _fault(world, "logout")
    world.wait_state("AwaitingPairing")  # credentials gone: a new QR code is offered
    assert "storedJid" not in world.runtime_status()
    _condition_is(world, "Paired", "False", "LoggedOut")  # until paired again, that is why

    second = world.pair_by_qr(runtime)
    assert second["deviceId"] == 2  # a new link gets the account's next device number
    world.wait_state("Connected")
    _fault(world, "stream_replaced")
    assert "stream replaced" in world.wait_state("Disconnected")["lastError"]


def test_deleting_a_session_unlinks_its_device_and_erases_its_credentials(world: World) -> None:
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    world.pair_by_qr(runtime)
    world.wait_state("Connected")
    store = world.tmp / "data" / "sessions" / "s1"
    assert (store / "simulator-credentials.json").exists()
    assert world.stats()["accounts"][PHONE]["devices"] == [1]

    client.CustomObjectsApi(world.api).delete_namespaced_custom_object(
        GROUP, VERSION, world.namespace, "whatsappsessions", "s1"
    )

    def gone() -> bool:
        try:
            get(world.api, world.namespace, "s1")
        except client.exceptions.ApiException as error:
            return error.status == 404
        return False

    wait_for(gone, timeout=60, what="the session to be deleted once its credentials are erased")
    assert world.stats()["accounts"][PHONE]["devices"] == []  # no longer in the phone's Linked devices
    assert world.stats()["counters"]["unlinked"] == 1
    assert not store.exists()


def test_the_pod_wide_qr_stream_cap_applies_across_sessions(world: World) -> None:
    create_quota(world.api, world.namespace, maxPairingStreams=5, maxSessions=5)
    runtime = world.runtime(WASO_MAX_QR_STREAMS="1")
    world.session("s1", PHONE)
    world.session("s2", "+4915112345602")
    world.wait_state("AwaitingPairing", "s1")
    world.wait_state("AwaitingPairing", "s2")
    time.sleep(2)  # the TenantQuota (5 streams) has been read
    first = SseStream(runtime.port, "/v1/sessions/s1/qr", token=world.token)
    assert first.status == 200
    refused = http_json("GET", f"{runtime.url}/v1/sessions/s2/qr", token=world.token)
    assert refused.status == 429
    assert "this pod already serves 1 QR streams" in refused.body["error"]
    first.close()


def test_inbound_messages_show_as_activity(world: World) -> None:
    """The coarse granularity itself is proven on a fake clock (test_lifecycle_units)."""
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    world.pair_by_qr(runtime)
    assert "lastActivityAt" not in world.wait_state("Connected")
    delivered = http_json(
        "POST", f"{world.simulator.url}/v1/phones/{PHONE}/inbound", {"from": "+15550001", "text": "hi"}
    )
    assert delivered.body["delivered"] == 1
    wait_for(lambda: world.runtime_status().get("lastActivityAt"), timeout=30, what="lastActivityAt")


@pytest.mark.simulator_args("--first-device", "47")
def test_a_high_device_number_with_a_consistent_identity_is_healthy(world: World) -> None:
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    assert world.pair_by_qr(runtime)["deviceId"] == 47
    assert world.wait_state("Connected")["deviceId"] == 47
    _condition_is(world, "DeviceHealthy", "True", "Healthy")
    _condition_is(world, "Ready", "True", "Ready")


@pytest.mark.simulator_args("--first-device", "47")
@pytest.mark.operator_env(WASO_MAX_DEVICE_ID="10", WASO_REPAIR__ENABLED="false")  # the finding, not its repair
def test_a_high_device_number_is_unhealthy_only_under_the_opt_in_policy(world: World) -> None:
    _connected_session(world, world.runtime())
    said = _condition_is(world, "DeviceHealthy", "False", "DeviceIdAbovePolicy")
    assert "47" in said["message"]
    assert "maxDeviceId 10" in said["message"]


def test_a_broken_identity_is_backed_up_reset_and_offered_for_pairing_again(world: World) -> None:
    runtime = world.runtime()
    first = _connected_session(world, runtime)
    _fault(world, "identity_mismatch")
    _fault(world, "drop")  # the next login reports another device number than the one stored

    def repaired() -> dict[str, Any] | None:
        repairs: dict[str, Any] = get(world.api, world.namespace, "s1").get("status", {}).get("repairs", {})
        return repairs if repairs.get("count") == 1 and "requested" not in repairs else None

    repairs = wait_for(repaired, timeout=90, what="one repair done")
    assert repairs["lastReason"] == "IdentityMismatch"
    [backup] = repairs["backups"]
    status = world.wait_state("AwaitingPairing")  # credentials gone: a new QR code is offered
    assert "storedJid" not in status
    assert status["lastRepair"]["backup"] == backup["name"]
    kept = world.tmp / "data" / "backups" / "s1" / backup["name"]
    assert (kept / "manifest.json").is_file()
    assert json.loads((kept / "simulator-credentials.json").read_text())["jid"] == first["jid"]

    def event_reasons() -> list[str] | None:  # recorded beside the status write: it may come a moment later
        found = [str(e.reason) for e in client.CoreV1Api(world.api).list_namespaced_event(world.namespace).items]
        return found if "Repaired" in found else None

    reasons = wait_for(event_reasons, timeout=30, what="the Repaired Event")
    assert reasons.count("RepairStarted") == 1
    assert reasons.count("Repaired") == 1

    second = world.pair_by_qr(runtime)  # the phone scans again: a new, consistent device
    assert second["deviceId"] != first["deviceId"]
    world.wait_state("Connected")
    _condition_is(world, "DeviceHealthy", "True", "Healthy")
    _condition_is(world, "Ready", "True", "Ready")


def _waso(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return run_waso(*args, kubeconfig=world.kubeconfig)


def _repairs(world: World) -> dict[str, Any]:
    found: dict[str, Any] = get(world.api, world.namespace, "s1").get("status", {}).get("repairs", {})
    return found


def test_a_manual_repair_and_a_rollback_through_the_cli(world: World) -> None:
    runtime = world.runtime()
    first = _connected_session(world, runtime)
    target = f"{world.namespace}/s1"

    asked = _waso(world, "repair", target)  # a healthy session: only a person can ask for this
    assert asked.returncode == 0, asked.stderr
    repairs = wait_for(lambda: (r := _repairs(world)).get("count") == 1 and "requested" not in r and r,
                       timeout=60, what="the manual repair done")  # fmt: skip
    assert repairs["lastReason"] == "Manual"
    assert "storedJid" not in world.wait_state("AwaitingPairing")
    links = world.stats()["counters"]["links"]

    refused = _waso(world, "repair", "rollback", target, "--backup", "nope")
    assert refused.returncode == 0, refused.stderr  # asked; the operator says why it cannot

    def refusal() -> bool:
        events = client.CoreV1Api(world.api).list_namespaced_event(world.namespace).items
        return any(e.reason == "RollbackRefused" and "no backup 'nope'" in (e.message or "") for e in events)

    wait_for(refusal, timeout=60, what="RollbackRefused Event")
    rolled = _waso(world, "repair", "rollback", target)  # the latest backup
    assert rolled.returncode == 0, rolled.stderr
    back = wait_for(lambda: (r := world.runtime_status()).get("state") == "Connected" and r, timeout=60,
                    what="connected again from the restored store")  # fmt: skip
    assert back["jid"] == first["jid"]  # the same linked device ...
    assert world.stats()["counters"]["links"] == links  # ... without a new scan
    settled = wait_for(lambda: (r := _repairs(world)).get("lastReason") == "Rollback" and "requested" not in r and r,
                       timeout=60, what="the rollback folded into status.repairs")  # fmt: skip
    assert settled["count"] == 1  # a rollback is not a repair
    assert _waso(world, "repair", "acme").returncode == 2  # NAMESPACE/NAME, or a clear usage line


def _import_legacy_store(world: World, name: str, phone: str, registered_noise_key: bytes | None = None) -> str:
    """Baileys credentials of device 47, its keys registered with the simulator, imported into the store of ``name``.

    ``registered_noise_key``: the public noise key WhatsApp knows for the device (by default the
    imported one's). Returns the device's JID.
    """
    digits = phone.removeprefix("+")
    creds = baileys_creds(f"{digits}.0:47@s.whatsapp.net")
    keys = creds["_private"]
    registered = http_json(
        "POST",
        f"{world.simulator.url}/v1/phones/{phone}/devices",
        {
            "device": 47,
            "noiseKey": base64.b64encode(registered_noise_key or public_key(keys["noise"])).decode(),
            "identityKey": base64.b64encode(public_key(keys["identity"])).decode(),
        },
    )
    assert registered.status == 201, registered.body
    directory = write_creds(world.tmp / "baileys", creds, name=digits)
    imported = run_waso("legacy", "import", str(directory), "--store-dir", str(world.tmp / "data" / "sessions" / name))
    assert imported.returncode == 0, imported.stderr
    jid: str = registered.body["jid"]
    assert f"{jid} (device 47)" in imported.stdout
    return jid


def test_a_session_with_imported_baileys_credentials_connects_as_the_same_device(world: World) -> None:
    """`waso legacy import` before the session exists: no QR code, the simulator's key check passes as device 47."""
    other_phone = "+4915112345602"
    jid = _import_legacy_store(world, "s1", PHONE)
    refused_jid = _import_legacy_store(world, "s2", other_phone, registered_noise_key=os.urandom(32))
    world.runtime()
    world.session("s1", PHONE)

    status = world.wait_state("Connected")
    assert (status["jid"], status["deviceId"], status["storedJid"]) == (jid, 47, jid)
    assert jid == "4915112345601:47@s.whatsapp.net"
    _condition_is(world, "DeviceHealthy", "True", "Healthy")
    counters = world.stats()["counters"]
    assert counters.get("qr_codes", 0) == counters.get("links", 0) == 0  # never offered a QR code, never paired
    assert counters["logins_by_key"] == 1
    devices = http_json("GET", f"{world.simulator.url}/v1/phones/{PHONE}/devices").body
    assert [(d["deviceId"], d["jid"], d["live"]) for d in devices["linked"]] == [(47, jid, 1)]

    # Keys that are not the ones WhatsApp registered for the device: a 401 at login. As whatsmeow does
    # on a 401, the device is deleted from the store; the session is logged out and offered for pairing.
    store = world.tmp / "data" / "sessions" / "s2" / STORE_FILE
    world.session("s2", other_phone)
    status = world.wait_state("AwaitingPairing", "s2")
    assert status["lastError"].startswith("logged out: 401: the noise key presented is not the one registered")
    assert "storedJid" not in status
    assert world.stats()["counters"]["logins_refused"] == 1
    assert read_row(store) is None  # the imported device is gone from its store
    devices = http_json("GET", f"{world.simulator.url}/v1/phones/{other_phone}/devices").body
    assert [(d["jid"], d["live"]) for d in devices["linked"]] == [(refused_jid, 0)]  # never live
    assert world.wait_state("Connected")["jid"] == jid  # the other session is untouched
