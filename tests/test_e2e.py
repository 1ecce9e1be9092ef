"""waso as it ships, on the real node: the image built by `make image`, installed by Helm.

The operator and the simulator run as Pods of the chart (in-cluster config through the
Service IP that kube-proxy routes), the session pods are the operator's StatefulSets,
and kubelet, containerd and runc do to them what a cluster does: PodSecurity
`restricted`, probes, memory limits, SIGTERM and grace periods, volumes. The tests reach
pods by their IPs (the machine routes the node's pod network) and through kubectl.

One release serves the whole module; its operator watches only this module's tenant
namespaces, so the other tests' operators never meet it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from kubernetes import client
from processes import http_ok

from tests.conftest import ControlPlane
from tests.operator_support import (
    Tenants,
    condition,
    create_quota,
    create_session,
    get,
    list_sessions,
    namespace_gone,
)
from tests.runtime_support import http_json
from tests.support import BIN, kubectl, wait_for
from tests.test_health_checks import argocd_health

ROOT = Path(__file__).resolve().parent.parent
IMAGE_ARCHIVE = BIN / "waso-image.tar"
SAMPLES = ROOT / "docs/samples"
SIMULATOR_PORT = 8090


@dataclass
class Release:
    control_plane: ControlPlane
    namespace: str
    tenants: Tenants

    def helm(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            [str(BIN / "helm"), f"--kubeconfig={self.control_plane.kubeconfig}", "-n", self.namespace, *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"
        return result.stdout

    def values(self, *extra: str) -> list[str]:
        return [
            "--set", f"namespaces={{{self.tenants.pattern}}}",
            "--set", "simulator.enabled=true",
            "--set", "simulator.autoPair=true",
            "--set", "simulator.autoPairSeconds=1",
            "--set", "simulator.firstDevice=11",
            "--set", "image.pullPolicy=Never",
            *extra,
        ]  # fmt: skip

    def pod(self, component: str) -> client.V1Pod:
        pods = client.CoreV1Api(self.control_plane.api).list_namespaced_pod(
            self.namespace, label_selector=f"app.kubernetes.io/component={component}"
        )
        running = [p for p in pods.items if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
        assert len(running) == 1, [(p.metadata.name, p.status.phase) for p in pods.items]
        return running[0]

    def simulator(self, path: str) -> dict[str, Any]:
        reply = http_json("GET", f"http://{self.pod('simulator').status.pod_ip}:{SIMULATOR_PORT}{path}")
        assert reply.status == 200, reply.body
        body: dict[str, Any] = reply.body
        return body


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane, crds: None) -> Iterator[Release]:
    """The image loaded into the node and the chart installed by Helm, with the simulator in auto-pair mode."""
    control_plane.local().load_image(IMAGE_ARCHIVE)
    tenants = Tenants(control_plane.api, prefix="e2e" + uuid.uuid4().hex[:6])
    found = Release(control_plane, tenants.namespace("waso-system"), tenants)
    found.helm("install", "waso", str(ROOT / "charts/waso"), *found.values(), "--wait", "--timeout", "4m")
    try:
        yield found
    finally:
        tenants.cleanup()
        subprocess.run(
            [str(BIN / "helm"), f"--kubeconfig={control_plane.kubeconfig}", "-n", found.namespace, "uninstall", "waso"],
            capture_output=True, check=False,
        )  # fmt: skip


def apply_samples(release: Release) -> dict[str, str]:
    """docs/samples as they are, each tenant in a namespace of this module (PodSecurity restricted)."""
    placed: dict[str, str] = {}
    documents = []
    for path in sorted(SAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == "Namespace":
                assert doc["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
                continue
            tenant = doc["metadata"]["namespace"]
            placed[tenant] = release.tenants.namespace(tenant)
            doc["metadata"]["namespace"] = placed[tenant]
            for subject in doc.get("subjects", []):  # a RoleBinding names its ServiceAccount's namespace
                subject["namespace"] = placed[subject["namespace"]]
            documents.append(doc)
    kubectl(release.control_plane.kubeconfig, "apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(documents))
    return placed


def wait_ready(release: Release, namespace: str, timeout: float = 180) -> list[dict[str, Any]]:
    api = release.control_plane.api

    def all_ready() -> list[dict[str, Any]] | None:
        sessions = list_sessions(api, namespace)
        ready = [s for s in sessions if (c := condition(s, "Ready")) and c["status"] == "True"]
        return sessions if sessions and len(ready) == len(sessions) else None

    return wait_for(all_ready, timeout=timeout, what=f"every session of {namespace} Ready", interval=0.5)


def runtime(session: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = session.get("status", {}).get("runtime", {})
    return found


def test_samples_installed_by_helm_become_ready_under_pod_security_restricted(release: Release) -> None:
    placed = apply_samples(release)
    core = client.CoreV1Api(release.control_plane.api)
    for tenant, namespace in placed.items():
        sessions = wait_ready(release, namespace)
        live = [s for s in sessions if not s["spec"].get("suspend")]
        assert live, tenant
        assert {runtime(s).get("state") for s in live} == {"Connected"}, tenant
        assert {s["status"]["phase"] for s in sessions if s not in live} <= {"Suspended"}
        labels = core.read_namespace(namespace).metadata.labels
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        pods = core.list_namespaced_pod(namespace).items
        assert pods
        assert all(p.spec.security_context.run_as_user == 65532 for p in pods)
    # The endpoint in status is a *.svc name that pods resolve through the cluster DNS.
    acme = placed["acme"]
    session = next(s for s in list_sessions(release.control_plane.api, acme) if runtime(s).get("state") == "Connected")
    host = session["status"]["endpoint"].split("//")[1].split(":")[0]
    assert host.endswith(f".waso-sessions.{acme}.svc")
    resolved = kubectl(
        release.control_plane.kubeconfig, "exec", "-n", acme, "waso-sessions-0", "--",
        "/opt/waso/bin/python", "-c", f"import socket; print(socket.gethostbyname({host!r}))",
    )  # fmt: skip
    pod_ip = core.read_namespaced_pod(host.split(".")[0], acme).status.pod_ip
    assert resolved.stdout.strip() == pod_ip
    assert "waso operator started" in _operator_logs(release)
    # kubectl port-forward reaches the runtime's API through the API server and kubelet.
    forward = subprocess.Popen(
        [str(BIN / "kubectl"), f"--kubeconfig={release.control_plane.kubeconfig}", "port-forward", "-n", acme,
         "pod/waso-sessions-0", ":8080"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert forward.stdout is not None
        first = forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"
        assert "Forwarding from 127.0.0.1:" in first, first
        port = int(first.split("127.0.0.1:")[1].split()[0])
        assert http_ok(f"http://127.0.0.1:{port}/readyz")
        # The runtime in its pod checks an application's token with the API server (the sample's ServiceAccount).
        token = kubectl(
            release.control_plane.kubeconfig, "create", "token", "app", "-n", acme, "--audience", "waso"
        ).stdout.strip()
        served = next(s for s in list_sessions(release.control_plane.api, acme) if s["status"].get("shard") == 0)
        url = f"http://127.0.0.1:{port}/v1/sessions/{served['metadata']['name']}/messages"
        message = {"to": "+4915100000000", "text": "hello from the e2e test"}
        anonymous = http_json("POST", url, message)
        assert anonymous.status == 401, anonymous.body
        sent = http_json("POST", url, message, token=token)
        assert sent.status == 202, sent.body
    finally:
        forward.kill()
        forward.wait()
    # kubectl waso pair gets there by itself (a port-forward and a token of the sample's ServiceAccount): the
    # runtime's 409 for a session already connected shows that it was reached and accepted the caller.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    pair = subprocess.run(
        [str(BIN / "kubectl"), "waso", "pair", f"{acme}/{served['metadata']['name']}",
         f"--kubeconfig={release.control_plane.kubeconfig}"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert pair.returncode == 1, pair.stdout + pair.stderr
    assert pair.stderr.strip() == (
        "kubectl waso pair: the runtime answered 409: the session is already paired and connected"
    )


def test_a_deleted_session_pod_stops_cleanly_and_its_successor_reconnects_without_a_new_qr(release: Release) -> None:
    api = release.control_plane.api
    namespace = release.tenants.namespace("restart")
    create_session(api, namespace, "s1", "+4915112349901")
    wait_ready(release, namespace)
    connected = runtime(get(api, namespace, "s1"))
    before = release.simulator("/v1/stats")["counters"]
    coordination = client.CoordinationV1Api(api)
    holder = coordination.read_namespaced_lease("waso-session-s1", namespace).spec.holder_identity
    assert holder
    pod = client.CoreV1Api(api).read_namespaced_pod("waso-sessions-0", namespace)
    grace = pod.spec.termination_grace_period_seconds or 30

    started = time.monotonic()
    kubectl(release.control_plane.kubeconfig, "delete", "pod", "-n", namespace, "waso-sessions-0", "--wait=true")
    stopped_after = time.monotonic() - started
    assert stopped_after < grace, f"the runtime took {stopped_after:.1f}s to stop: SIGTERM was not handled in time"
    # The StatefulSet creates the successor only now, so what is stored is the old pod's last word.
    assert not coordination.read_namespaced_lease("waso-session-s1", namespace).spec.holder_identity
    assert runtime(get(api, namespace, "s1"))["state"] == "Stopped"

    def reconnected() -> dict[str, Any] | None:
        now = runtime(get(api, namespace, "s1"))
        return now if now.get("state") == "Connected" and now.get("connectedAt") != connected["connectedAt"] else None

    again = wait_for(reconnected, timeout=120, what="s1 Connected from the new pod", interval=0.5)
    assert again["jid"] == connected["jid"]
    after = release.simulator("/v1/stats")["counters"]
    assert after["links"] == before["links"]  # no new device linked
    assert after["qr_codes"] == before["qr_codes"]  # and no QR code offered
    assert after["logins"] > before["logins"]
    taken = coordination.read_namespaced_lease("waso-session-s1", namespace).spec.holder_identity
    assert taken
    assert taken != holder
    assert wait_ready(release, namespace)


def test_an_out_of_memory_session_pod_is_explained_and_recovers_when_the_limit_is_raised(release: Release) -> None:
    api = release.control_plane.api
    namespace = release.tenants.namespace("oom")
    tiny = {"requests": {"cpu": "50m", "memory": "16Mi"}, "limits": {"memory": "16Mi"}}
    create_quota(api, namespace, maxSessions=2, sessionsPerPod=2, podResources=tiny)
    create_session(api, namespace, "s1", "+4915112349902")

    def explained() -> dict[str, Any] | None:
        found = condition(get(api, namespace, "s1"), "Connected")
        return found if found and found["reason"] == "OutOfMemory" else None

    said = wait_for(explained, timeout=180, what="Connected=False reason OutOfMemory", interval=0.5)
    assert said["status"] == "False"
    assert "16Mi" in said["message"]
    assert "memory" in said["message"]
    stalled = condition(get(api, namespace, "s1"), "Ready")
    assert stalled is not None
    assert stalled["status"] == "False"
    assert "memory" in stalled["message"]

    roomy = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        "waso.dev", "v1alpha1", namespace, "tenantquotas", "default", {"spec": {"podResources": roomy}}
    )
    wait_ready(release, namespace, timeout=240)


def _devices(release: Release, phone: str) -> dict[str, Any]:
    return release.simulator(f"/v1/phones/{quote(phone)}/devices")


def _events(release: Release, namespace: str, name: str) -> list[str]:
    found = client.CoreV1Api(release.control_plane.api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return [str(e.reason) for e in found.items]


def test_deleting_a_tenant_namespace_unlinks_every_device_within_a_minute(release: Release) -> None:
    api = release.control_plane.api
    namespace = release.tenants.namespace("leaving")
    phones = {f"s{i}": f"+491511234980{i}" for i in range(1, 4)}
    for name, phone in phones.items():
        create_session(api, namespace, name, phone)
    wait_ready(release, namespace)
    linked = {phone: [d["jid"] for d in _devices(release, phone)["linked"]] for phone in phones.values()}
    assert all(len(jids) == 1 for jids in linked.values()), linked
    since = datetime.now(UTC)

    kubectl(release.control_plane.kubeconfig, "delete", "namespace", namespace, "--wait=false")
    started = time.monotonic()

    wait_for(lambda: namespace_gone(api, namespace), timeout=60, what=f"namespace {namespace} deleted", interval=0.5)
    took = time.monotonic() - started
    for phone, jids in linked.items():
        devices = _devices(release, phone)
        assert devices["linked"] == [], devices
        assert [u["jid"] for u in devices["unlinked"]] == jids, devices
    about_tenant = [line for line in _operator_logs(release, since).splitlines() if namespace in line]
    assert len(about_tenant) < 10 * max(took, 1.0), about_tenant[-20:]


def test_deleting_a_suspended_session_without_a_pod_unlinks_its_device(release: Release) -> None:
    api = release.control_plane.api
    namespace = release.tenants.namespace("parked")
    phone = "+4915112349811"
    create_session(api, namespace, "s1", phone)
    wait_ready(release, namespace)
    jid = runtime(get(api, namespace, "s1"))["jid"]
    custom = client.CustomObjectsApi(api)
    custom.patch_namespaced_custom_object("waso.dev", "v1alpha1", namespace, "whatsappsessions", "s1",
                                          {"spec": {"suspend": True}})  # fmt: skip
    core = client.CoreV1Api(api)
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, timeout=120, what="no session pod left")
    assert get(api, namespace, "s1")["status"]["phase"] == "Suspended"

    custom.delete_namespaced_custom_object("waso.dev", "v1alpha1", namespace, "whatsappsessions", "s1")
    wait_for(lambda: not list_sessions(api, namespace), timeout=60, what="the suspended session deleted", interval=0.5)
    devices = _devices(release, phone)
    assert devices["linked"] == [], devices
    assert [u["jid"] for u in devices["unlinked"]] == [jid], devices


def test_a_ban_with_an_expiry_reconciles_and_heals_and_lifecycle_changes_are_events(release: Release) -> None:
    api = release.control_plane.api
    namespace = release.tenants.namespace("banned")
    phone = "+4915112349821"
    create_session(api, namespace, "s1", phone)
    wait_ready(release, namespace)
    simulator = f"http://{release.pod('simulator').status.pod_ip}:{SIMULATOR_PORT}"
    banned = http_json("POST", f"{simulator}/v1/phones/{quote(phone)}/faults", {"kind": "ban", "seconds": 20})
    assert banned.status == 200, banned.body

    def reconciling() -> dict[str, Any] | None:
        found = condition(get(api, namespace, "s1"), "Reconciling")
        return found if found and found["reason"] == "Banned" else None

    said = wait_for(reconciling, timeout=60, what="Reconciling=True reason Banned", interval=0.5)
    until = datetime.fromisoformat(banned.body["expiresAt"]).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert until in said["message"]
    session = get(api, namespace, "s1")
    assert session["status"]["phase"] == "Banned"
    assert condition(session, "Stalled") is None
    assert argocd_health(session)["status"] == "Progressing"
    wait_ready(release, namespace, timeout=120)  # without intervention once the ban ends
    assert argocd_health(get(api, namespace, "s1"))["status"] == "Healthy"

    logged_out = http_json("POST", f"{simulator}/v1/phones/{quote(phone)}/faults", {"kind": "logout"})
    assert logged_out.status == 200, logged_out.body
    wait_for(lambda: "RePaired" in _events(release, namespace, "s1"), timeout=120, what="RePaired event")
    wait_ready(release, namespace)
    reasons = _events(release, namespace, "s1")
    for expected in ("Admitted", "Paired", "Banned", "BanLifted", "LoggedOut", "RePaired"):
        assert reasons.count(expected) == 1, (expected, reasons)


def test_kubectl_get_says_why_a_session_waits(release: Release) -> None:
    api = release.control_plane.api
    namespace = release.tenants.namespace("queue")
    create_quota(api, namespace, maxSessions=1)
    create_session(api, namespace, "first", "+4915112349831")
    wait_ready(release, namespace)
    create_session(api, namespace, "second", "+4915112349832")
    wait_for(lambda: (c := condition(get(api, namespace, "second"), "Ready")) and c["reason"] == "QuotaExceeded",
             timeout=60, what="second waits for quota")  # fmt: skip
    table = kubectl(release.control_plane.kubeconfig, "get", "was", "-n", namespace).stdout.splitlines()
    assert "REASON" in table[0].split()
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert "QuotaExceeded" in rows["second"]
    assert "Ready" in rows["first"]
    wide = kubectl(release.control_plane.kubeconfig, "get", "was", "-n", namespace, "-o", "wide").stdout.splitlines()
    for column in ("DEVICE", "ENDPOINT", "LAST ERROR"):
        assert column in wide[0], wide[0]
    assert any(line.startswith("first ") and "http://waso-sessions-0." in line for line in wide), wide


def test_helm_upgrade_keeps_sessions_connected_and_uninstall_keeps_crds_and_sessions(release: Release) -> None:
    api = release.control_plane.api
    namespace = release.tenants.namespace("upgrade")
    create_session(api, namespace, "s1", "+4915112349903")
    wait_ready(release, namespace)
    session = get(api, namespace, "s1")
    connected, connected_uid = runtime(session), session["metadata"]["uid"]
    core = client.CoreV1Api(api)
    session_pod = core.read_namespaced_pod("waso-sessions-0", namespace).metadata.uid
    operator_pod = release.pod("operator").metadata.uid
    logins = release.simulator("/v1/stats")["counters"]["logins"]

    release.helm("upgrade", "waso", str(ROOT / "charts/waso"), *release.values("--set", "config.resyncSeconds=20"),
                 "--wait", "--timeout", "4m")  # fmt: skip
    wait_for(
        lambda: release.pod("operator").metadata.uid != operator_pod,
        timeout=120, what="the operator pod replaced by the upgrade", interval=0.5,
    )  # fmt: skip
    config_map = core.read_namespaced_config_map("waso-operator", release.namespace)
    assert "resyncSeconds: 20" in config_map.data["config.yaml"]
    wait_for(lambda: "waso operator started" in _operator_logs(release), timeout=120, what="the new operator started")
    assert core.read_namespaced_pod("waso-sessions-0", namespace).metadata.uid == session_pod
    assert runtime(get(api, namespace, "s1"))["connectedAt"] == connected["connectedAt"]
    assert release.simulator("/v1/stats")["counters"]["logins"] == logins
    assert wait_ready(release, namespace)

    release.helm("uninstall", "waso", "--wait", "--timeout", "2m")
    kubectl(release.control_plane.kubeconfig, "get", "crd", "whatsappsessions.waso.dev", "tenantquotas.waso.dev")
    # The users' sessions and their pods outlive the operator: nothing of theirs is owned by the release.
    kept = get(api, namespace, "s1")
    assert kept["metadata"]["uid"] == connected_uid
    assert runtime(kept)["connectedAt"] == connected["connectedAt"]
    assert core.read_namespaced_pod("waso-sessions-0", namespace).metadata.uid == session_pod


def _operator_logs(release: Release, since: datetime | None = None) -> str:
    pod = str(release.pod("operator").metadata.name)
    window = [f"--since-time={since.strftime('%Y-%m-%dT%H:%M:%SZ')}"] if since else []
    result = kubectl(release.control_plane.kubeconfig, "logs", "-n", release.namespace, pod, *window, check=False)
    return result.stdout + result.stderr
