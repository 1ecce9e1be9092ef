"""The operator against the real control plane: admission, placement, quotas, conflicts, RBAC."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from kopf.testing import KopfRunner
from kubernetes import client

from tests.conftest import ControlPlane
from tests.operator_support import (
    PLURAL,
    Tenants,
    admitted,
    condition,
    create_many,
    create_quota,
    create_session,
    get,
    list_sessions,
    observed_peak,
    operator_process,
    wait_admission,
)
from tests.support import free_port, wait_for
from waso.api.base import GROUP, VERSION
from waso.kube import KubeClient, load_api_client
from waso.operator.config import OperatorConfig
from waso.operator.controller import Controller
from waso.operator.world import session_facts


@pytest.fixture
def operator_env(control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    monkeypatch.setenv("WASO_METRICS_PORT", "0")
    # The node never has this image: these tests decide, runtimes play no part (kubelet does not pull).
    monkeypatch.setenv("WASO_RUNTIME_IMAGE", "waso:test")
    monkeypatch.setenv("WASO_IMAGE_PULL_POLICY", "Never")
    monkeypatch.delenv("WASO_CONFIG", raising=False)
    return monkeypatch


def run_operator(tenants: Tenants, env: pytest.MonkeyPatch) -> KopfRunner:
    """The operator in this process, as `waso operator -n <pattern>` runs it: cluster-wide watches, filtered."""
    env.setenv("WASO_NAMESPACES", tenants.pattern)
    return KopfRunner(["run", "--standalone", "--all-namespaces", "-m", "waso.operator.handlers"], timeout=60)


def phone(i: int) -> str:
    return f"+4915100{i:06d}"


def test_ten_tenants_are_admitted_and_placed_in_their_own_pods(
    control_plane: ControlPlane, tenants: Tenants, operator_env: pytest.MonkeyPatch
) -> None:
    api = control_plane.api
    names = [tenants.namespace(f"t{i}") for i in range(10)]
    with run_operator(tenants, operator_env) as runner:
        create_many(api, [(ns, f"s{j}", phone(i * 10 + j)) for i, ns in enumerate(names) for j in range(2)])
        for ns in names:
            for j in range(2):
                obj = wait_admission(api, ns, f"s{j}", expected=True, reason="Admitted")
                assert obj["status"]["shard"] == 0
                # No admission policy outside the chart: the operator sets the finalizer itself, before the shard.
                assert obj["metadata"]["finalizers"] == ["waso.dev/credentials"]
                assert obj["status"]["observedGeneration"] == 1
                assert obj["status"]["endpoint"].startswith(f"http://waso-sessions-0.waso-sessions.{ns}.svc:8080/")
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)

        def one_replica(ns: str) -> client.V1StatefulSet | None:
            try:  # statuses are written first, the tenant's workload beside them: it may not exist yet
                found = apps.read_namespaced_stateful_set("waso-sessions", ns)
            except client.ApiException as error:
                if error.status == 404:
                    return None
                raise
            return found if found.spec.replicas == 1 else None

        for ns in names:
            sts = wait_for(lambda ns=ns: one_replica(ns), timeout=30, what=f"StatefulSet in {ns}")  # type: ignore[misc]
            env = {e.name: e for e in sts.spec.template.spec.containers[0].env}
            # The runtime learns its tenant from its own pod's namespace: it cannot serve another tenant.
            assert env["WASO_NAMESPACE"].value_from.field_ref.field_path == "metadata.namespace"
            assert sts.spec.template.spec.service_account_name == "waso-runtime"
            policy = client.NetworkingV1Api(api).read_namespaced_network_policy("waso-sessions", ns)
            assert policy.spec.policy_types == ["Ingress"]
            pods = wait_for(lambda ns=ns: core.list_namespaced_pod(ns).items, timeout=30, what=f"pods in {ns}")  # type: ignore[misc]
            assert [p.metadata.name for p in pods] == ["waso-sessions-0"]  # PodSecurity restricted admitted it
            assert {s["metadata"]["namespace"] for s in list_sessions(api, ns)} == {ns}
    assert runner.exit_code == 0, runner.output


def test_global_cap_refuses_the_36th_and_admits_it_when_a_slot_frees(
    control_plane: ControlPlane, tenants: Tenants, operator_env: pytest.MonkeyPatch
) -> None:
    operator_env.setenv("WASO_MAX_SESSIONS", "35")
    operator_env.setenv("WASO_DEFAULT_QUOTA__MAX_SESSIONS", "100")
    operator_env.setenv("WASO_DEFAULT_QUOTA__SESSIONS_PER_POD", "10")
    api = control_plane.api
    namespaces = [tenants.namespace(f"t{i}") for i in range(5)]
    with run_operator(tenants, operator_env) as runner:
        create_many(api, [(namespaces[i % 5], f"s{i}", phone(i)) for i in range(35)])
        first = {
            f"s{i}": wait_admission(api, namespaces[i % 5], f"s{i}", expected=True, reason="Admitted")
            for i in range(35)
        }

        create_session(api, namespaces[0], "late", phone(99))
        late = wait_admission(api, namespaces[0], "late", expected=False, reason="CapacityExceeded")
        message = condition(late, "Admitted")["message"]
        assert "35 of at most 35 sessions" in message
        assert late["status"]["phase"] == "Waiting"
        assert condition(late, "Reconciling")["status"] == "True"
        # The Event is written after the status: wait for it rather than reading once.
        wait_for(
            lambda: (
                client.CoreV1Api(api)
                .list_namespaced_event(namespaces[0], field_selector="involvedObject.name=late,reason=CapacityExceeded")
                .items
            ),
            timeout=30,
            what="a CapacityExceeded event for the refused session",
        )

        for i in range(35):  # the admitted ones were not touched by the refusal
            now = get(api, namespaces[i % 5], f"s{i}")
            assert condition(now, "Admitted") == condition(first[f"s{i}"], "Admitted")

        client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespaces[3], PLURAL, "s3")
        wait_admission(api, namespaces[0], "late", expected=True, reason="Admitted")
        # Never served by a runtime, s3 has no credentials to erase: its finalizer goes at once.
        wait_for(
            lambda: "s3" not in {s["metadata"]["name"] for s in list_sessions(api, namespaces[3])} or None,
            timeout=30,
            what="s3 to be gone",
        )
        total = sum(1 for ns in namespaces for s in list_sessions(api, ns) if admitted(s))
        assert total == 35
    assert runner.exit_code == 0, runner.output


def test_tenant_quota_refuses_only_that_tenants_sessions(
    control_plane: ControlPlane, tenants: Tenants, operator_env: pytest.MonkeyPatch
) -> None:
    port = free_port()
    operator_env.setenv("WASO_METRICS_PORT", str(port))
    api = control_plane.api
    small, other = tenants.namespace("small"), tenants.namespace("other")
    create_quota(api, small, maxSessions=2, maxPairingStreams=1)
    with run_operator(tenants, operator_env) as runner:
        create_many(
            api, [(small, f"s{i}", phone(i)) for i in range(3)] + [(other, f"o{i}", phone(10 + i)) for i in range(3)]
        )
        refused = wait_for(
            lambda: [s for s in list_sessions(api, small) if admitted(s) is False] or None,
            timeout=60,
            what="one refused session in the small tenant",
        )
        assert len(refused) == 1
        reason = condition(refused[0], "Admitted")
        assert reason is not None
        assert reason["reason"] == "QuotaExceeded"
        assert "uses 2 of its 2 sessions" in reason["message"]
        for i in range(3):
            wait_admission(api, other, f"o{i}", expected=True, reason="Admitted")
        quota = wait_for(
            lambda: (q := get(api, small, "default", "tenantquotas")).get("status", {}).get("used") and q,
            timeout=30,
            what="quota status",
        )
        assert quota["status"]["used"] == {"sessions": 2}
        assert quota["status"]["hard"] == {"sessions": 2}

        import urllib.request

        expected = [
            f'waso_admission_refusals_total{{reason="QuotaExceeded",tenant="{small}"}} 1.0',
            f'waso_sessions{{phase="Waiting",tenant="{small}"}} 1.0',
        ]

        def scraped() -> str | None:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return text if all(line in text for line in expected) else None

        wait_for(scraped, timeout=30, what=f"metrics {expected}")

        # Raising the quota admits the waiting session.
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP, VERSION, small, "tenantquotas", "default", {"spec": {"maxSessions": 3}}
        )
        wait_admission(api, small, refused[0]["metadata"]["name"], expected=True, reason="Admitted")
    assert runner.exit_code == 0, runner.output


def test_a_new_session_with_room_is_decided_alone_and_one_without_by_a_pass_over_the_whole_cluster(
    control_plane: ControlPlane, tenants: Tenants, operator_env: pytest.MonkeyPatch
) -> None:
    port = free_port()
    operator_env.setenv("WASO_METRICS_PORT", str(port))
    api = control_plane.api
    ns = tenants.namespace("alone")
    create_quota(api, ns, maxSessions=3)

    def passes() -> dict[str, float]:
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        prefix = "waso_reconcile_passes_total{scope="
        return {
            line[len(prefix) + 1 : line.index('"}')]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(prefix)
        }

    def used() -> int | None:
        return cast(
            int | None, get(api, ns, "default", "tenantquotas").get("status", {}).get("used", {}).get("sessions")
        )

    with run_operator(tenants, operator_env) as runner:
        create_many(api, [(ns, f"s{i}", phone(40 + i)) for i in range(2)])
        for i in range(2):
            wait_admission(api, ns, f"s{i}", expected=True, reason="Admitted")
        wait_for(lambda: used() == 2, timeout=30, what="quota status: 2 used")
        before = wait_for(passes, timeout=30, what="the operator's metrics")

        create_session(api, ns, "s2", phone(42))
        alone = wait_admission(api, ns, "s2", expected=True, reason="Admitted")
        assert alone["status"]["shard"] == 0
        assert alone["metadata"]["finalizers"] == ["waso.dev/credentials"]
        assert alone["status"]["endpoint"].startswith(f"http://waso-sessions-0.waso-sessions.{ns}.svc:8080/")
        wait_for(lambda: used() == 3, timeout=30, what="quota status: 3 used")
        after = passes()
        assert after["new"] > before.get("new", 0)  # decided without a pass over the whole cluster

        # No room left in the tenant: the refusal (and whom it would evict) is the whole cluster's decision.
        create_session(api, ns, "s3", phone(43))
        refused = wait_admission(api, ns, "s3", expected=False, reason="QuotaExceeded")
        assert "uses 3 of its 3 sessions" in condition(refused, "Admitted")["message"]
        assert passes()["cluster"] > after["cluster"]
    assert runner.exit_code == 0, runner.output


def test_a_namespace_created_as_the_operator_starts_is_served(
    control_plane: ControlPlane, tenants: Tenants, operator_env: pytest.MonkeyPatch
) -> None:
    """kopf's per-namespace mode once missed such a namespace about one start in five."""
    api = control_plane.api
    for attempt in range(3):
        with run_operator(tenants, operator_env) as runner:
            namespace = tenants.namespace(f"late{attempt}")  # while kopf begins its watches
            create_session(api, namespace, "s1", phone(900 + attempt))
            wait_admission(api, namespace, "s1", expected=True, reason="Admitted")
        assert runner.exit_code == 0, runner.output


def test_older_session_wins_a_phone_number_claimed_by_two_tenants(
    control_plane: ControlPlane, tenants: Tenants, operator_env: pytest.MonkeyPatch
) -> None:
    api = control_plane.api
    first, second = tenants.namespace("first"), tenants.namespace("second")
    create_session(api, first, "mine", "+4915177777777")
    time.sleep(1.1)  # creationTimestamp has one-second resolution
    create_session(api, second, "theirs", "+4915177777777")
    with run_operator(tenants, operator_env) as runner:
        wait_admission(api, first, "mine", expected=True, reason="Admitted")
        loser = wait_admission(api, second, "theirs", expected=False, reason="PhoneNumberConflict")
        assert condition(loser, "Stalled")["status"] == "True"
        assert first not in condition(loser, "Admitted")["message"]  # no tenant leaks
    assert runner.exit_code == 0, runner.output


def test_suspend_frees_the_slot_and_a_second_quota_is_a_conflict(
    control_plane: ControlPlane, tenants: Tenants, operator_env: pytest.MonkeyPatch
) -> None:
    api = control_plane.api
    ns = tenants.namespace("t")
    create_quota(api, ns, maxSessions=1, maxPairingStreams=1)
    time.sleep(1.1)
    create_quota(api, ns, name="second", maxSessions=50)
    with run_operator(tenants, operator_env) as runner:
        create_session(api, ns, "a", phone(1))
        wait_admission(api, ns, "a", expected=True, reason="Admitted")
        create_session(api, ns, "b", phone(2))
        wait_admission(api, ns, "b", expected=False, reason="QuotaExceeded")
        second = wait_for(
            lambda: condition(get(api, ns, "second", "tenantquotas"), "Conflict"), timeout=30, what="Conflict"
        )
        assert (second["status"], second["reason"]) == ("True", "OlderQuotaExists")

        report = _waso_status(control_plane, ns)
        (tenant,) = report["tenants"]
        assert tenant["quota"]["name"] == "default"
        assert tenant["quota"]["ignored"] == ["second"]
        rows = {row["name"]: row for row in tenant["sessions"]}
        assert rows["a"]["phase"] == "Starting"
        assert rows["b"]["phase"] == "Waiting"
        assert any("QuotaExceeded" in problem for problem in rows["b"]["problems"])
        text = subprocess.run(
            [sys.executable, "-m", "waso.cli.main", "status", "-n", ns], capture_output=True, text=True, check=True,
            env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)},
        ).stdout  # fmt: skip
        assert f"Tenant {ns}: " in text
        assert "ignored TenantQuotas: second" in text
        assert "b: Reconciling: QuotaExceeded" in text

        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "a", {"spec": {"suspend": True}}
        )
        suspended = wait_admission(api, ns, "a", expected=False, reason="Suspended")
        assert suspended["status"]["phase"] == "Suspended"
        assert suspended["status"]["shard"] == 0  # keeps its shard and credentials
        assert condition(suspended, "Ready")["status"] == "True"
        wait_admission(api, ns, "b", expected=True, reason="Admitted")
    assert runner.exit_code == 0, runner.output


def _waso_status(control_plane: ControlPlane, namespace: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "waso.cli.main", "status", "-n", namespace, "-o", "json"],
        capture_output=True, text=True, check=True, env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)},
    )  # fmt: skip
    return cast(dict[str, Any], json.loads(result.stdout))


def test_runtime_service_account_is_confined_to_its_namespace(
    control_plane: ControlPlane, tenants: Tenants, operator_env: pytest.MonkeyPatch
) -> None:
    api = control_plane.api
    mine, theirs = tenants.namespace("mine"), tenants.namespace("theirs")
    with run_operator(tenants, operator_env) as runner:
        create_session(api, mine, "s", phone(1))
        create_session(api, theirs, "s", phone(2))
        rbac = client.RbacAuthorizationV1Api(api)
        for ns in (mine, theirs):
            wait_for(lambda ns=ns: rbac.list_namespaced_role_binding(ns).items, timeout=30, what=f"RoleBinding in {ns}")  # type: ignore[misc]
    assert runner.exit_code == 0, runner.output

    def allowed(namespace: str, verb: str, resource: str, subresource: str = "") -> bool:
        review = client.AuthorizationV1Api(api).create_subject_access_review(
            client.V1SubjectAccessReview(
                spec=client.V1SubjectAccessReviewSpec(
                    user=f"system:serviceaccount:{mine}:waso-runtime",
                    groups=["system:serviceaccounts", f"system:serviceaccounts:{mine}"],
                    resource_attributes=client.V1ResourceAttributes(
                        namespace=namespace, verb=verb, group=GROUP, resource=resource, subresource=subresource
                    ),
                )
            )
        )
        return bool(review.status.allowed)

    assert allowed(mine, "patch", "whatsappsessions", "status")
    assert allowed(mine, "watch", "whatsappsessions")
    assert not allowed(theirs, "patch", "whatsappsessions", "status")
    assert not allowed(theirs, "list", "whatsappsessions")
    assert not allowed(mine, "patch", "whatsappsessions")  # spec is the platform engineer's
    assert not allowed(mine, "patch", "tenantquotas", "status")


def test_exactly_the_cap_is_admitted_from_200_concurrent_creates_across_a_restart(
    control_plane: ControlPlane, tenants: Tenants, tmp_path: Path
) -> None:
    api = control_plane.api
    namespaces = [tenants.namespace(f"t{i}") for i in range(10)]
    env = {
        "WASO_MAX_SESSIONS": "35",
        "WASO_DEFAULT_QUOTA__MAX_SESSIONS": "100",
        "WASO_RUNTIME_IMAGE": "waso:test",
        "WASO_IMAGE_PULL_POLICY": "Never",
        "WASO_LEADER_ELECTION__LEASE_SECONDS": "3",  # the restarted operator waits for the killed one's lease
    }
    log = tmp_path / "operator.log"

    # Watch every admission as the API server reports it: the count must never exceed the cap.
    specs = [(namespaces[i % 10], f"s{i}", phone(i)) for i in range(200)]

    def all_decided() -> list[dict[str, object]] | None:
        sessions = [s for ns in namespaces for s in list_sessions(api, ns)]
        return sessions if len(sessions) == 200 and all(admitted(s) is not None for s in sessions) else None

    with observed_peak(api, tenants.prefix, (namespaces[0], "s0")) as peak:
        with operator_process(control_plane.kubeconfig, tenants.pattern, env, log) as first:
            creator = threading.Thread(target=create_many, args=(api, specs))
            creator.start()
            wait_for(
                lambda: sum(1 for ns in namespaces for s in list_sessions(api, ns) if admitted(s)) >= 10,
                timeout=60,
                what="the first admissions",
            )
            first.kill()  # half-way: sessions are still being created
        creator.join()
        with operator_process(control_plane.kubeconfig, tenants.pattern, env, log):
            sessions = wait_for(all_decided, timeout=120, what="a decision for all 200 sessions")
            time.sleep(2)  # a last chance for a wrong extra admission to show up
            sessions = all_decided() or sessions
    assert sum(1 for s in sessions if admitted(s)) == 35, log.read_text()[-3000:]
    assert {condition(s, "Admitted")["reason"] for s in sessions if not admitted(s)} == {"CapacityExceeded"}
    assert peak["admitted"] == 35


def test_an_event_a_terminating_tenant_namespace_refuses_is_kept_in_the_operators_namespace(
    control_plane: ControlPlane, tenants: Tenants, operator_env: pytest.MonkeyPatch
) -> None:
    """The CredentialsNotErased warning of a namespace being deleted must not be lost."""
    api, core = control_plane.api, client.CoreV1Api(control_plane.api)
    namespace = tenants.namespace("closing")
    session = session_facts(create_session(api, namespace, "s1", phone(950)))
    holder = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="holder", finalizers=["waso.dev/test"]))
    core.create_namespaced_config_map(namespace, holder)  # keeps the namespace Terminating
    core.delete_namespace(namespace)
    wait_for(lambda: core.read_namespace(namespace).status.phase == "Terminating", timeout=30, what="Terminating")

    async def record() -> None:
        kube = KubeClient(load_api_client(), threads=2)
        try:
            controller = Controller(OperatorConfig(), kube)
            await controller._event(session, "CredentialsNotErased", "no runtime confirmed", "Warning", None)
        finally:
            kube.close()

    try:
        asyncio.run(record())
        kept = core.list_namespaced_event("default", field_selector="involvedObject.name=s1").items
        mine = [e for e in kept if e.involved_object.namespace == namespace]
        assert [e.reason for e in mine] == ["CredentialsNotErased"]
        assert mine[0].type == "Warning"
        assert mine[0].action == "CredentialsNotErased"
    finally:
        core.patch_namespaced_config_map("holder", namespace, {"metadata": {"finalizers": None}})
