"""The Helm chart: its values schema refuses what the operator would refuse, every operator setting is
reachable from its values, it installs on the real API server, its pods pass PodSecurity restricted,
and its RBAC is enough for the operator to work."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from gen_chart import OPERATOR_DOC, SCHEMA, VALUES, render_operator_doc, render_schema, render_values
from kubernetes import client

from tests.conftest import ControlPlane
from tests.operator_support import Tenants, create_session, wait_admission
from tests.runtime_support import spawn_waso
from tests.support import BIN, kubectl, wait_for
from waso.api.base import GROUP, VERSION
from waso.api.quota import TenantQuotaSpec
from waso.api.session import CLEANUP_FINALIZER, WhatsAppSession
from waso.operator.config import EvictionSettings, LeaderElectionSettings, OperatorConfig, RepairSettings, load_config

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts/waso"


def helm(control_plane: ControlPlane, *args: str) -> str:
    result = subprocess.run(
        [str(BIN / "helm"), f"--kubeconfig={control_plane.kubeconfig}", *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def template(*args: str) -> subprocess.CompletedProcess[str]:
    """``helm template`` as a user runs it: no --kube-version, the chart's kubeVersion must accept helm's default."""
    return subprocess.run([str(BIN / "helm"), "template", "waso", str(CHART), *args], capture_output=True, text=True)


def rendered(*args: str) -> list[dict[str, Any]]:
    result = template(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def operator_config(docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorConfig:
    """What the operator makes of the rendered ConfigMap, without any WASO_* variable of the test run."""
    path = tmp_path / "config.yaml"
    path.write_text(find(docs, "ConfigMap", "waso-operator")["data"]["config.yaml"])
    monkeypatch.setenv("WASO_CONFIG", str(path))
    for variable in [v for v in os.environ if v.startswith("WASO_") and v != "WASO_CONFIG"]:
        monkeypatch.delenv(variable)
    return load_config()


def test_generated_chart_files_are_current() -> None:
    assert VALUES.read_text() == render_values(), "charts/waso/values.yaml is stale: run `make crds`"
    assert SCHEMA.read_text() == render_schema(), "charts/waso/values.schema.json is stale: run `make crds`"
    text = OPERATOR_DOC.read_text()
    assert text == render_operator_doc(text), "the settings table of docs/operator.md is stale: run `make crds`"


def test_chart_lints_and_renders_a_valid_operator_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for values in ([], ["--set", "simulator.enabled=true", "--set", "metrics.port=0"]):
        lint = subprocess.run(
            [str(BIN / "helm"), "lint", "--strict", str(CHART), *values], capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = rendered("--set", "config.maxSessions=50", "--set", "config.maxDeviceId=10")
    config = operator_config(docs, tmp_path, monkeypatch)
    assert (config.max_sessions, config.max_device_id, config.runtime_image) == (50, 10, "waso:dev")
    assert config.default_quota.sessions_per_pod == 20
    assert config.transport == "neonize"
    deployment = find(docs, "Deployment", "waso-operator")
    assert deployment["spec"]["replicas"] == 1
    # The new pod stands by (leader election) until the old one releases the Lease.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"], "one replica: nothing to protect"
    assert not [d for d in docs if d["metadata"]["name"].endswith("-simulator")], "the simulator is off by default"
    two = rendered("--set", "replicas=2")
    assert find(two, "Deployment", "waso-operator")["spec"]["replicas"] == 2
    assert find(two, "PodDisruptionBudget", "waso-operator")["spec"]["minAvailable"] == 1
    alone = rendered("--set", "config.leaderElection.enabled=false")
    assert find(alone, "Deployment", "waso-operator")["spec"]["strategy"] == {"type": "Recreate"}
    refused = template("--set", "replicas=2", "--set", "config.leaderElection.enabled=false")
    assert refused.returncode != 0
    assert "replicas above 1 need config.leaderElection.enabled" in refused.stderr


# (helm arguments, the field path helm's schema error must name)
REFUSED_VALUES: list[tuple[list[str], str]] = [
    (["--set", "config.maxSessions=lots"], "/config/maxSessions"),
    (["--set", "config.maxSessions=-1"], "/config/maxSessions"),
    (["--set", "config.transport=carrier-pigeon"], "/config/transport"),
    (["--set", "config.writeConcurrency=0"], "/config/writeConcurrency"),
    (["--set", "config.resyncSeconds=0"], "/config/resyncSeconds"),
    (["--set", "config.cleanupTimeoutSeconds=-5"], "/config/cleanupTimeoutSeconds"),
    (["--set", "config.defaultQuota.sessionsPerPod=-2"], "/config/defaultQuota/sessionsPerPod"),
    (["--set", "config.volumeSize=lots"], "/config/volumeSize"),
    (["--set", "config.simulatorUrl=sim:8090"], "/config/simulatorUrl"),
    (["--set", "config.maxSession=5"], "maxSession"),  # a typo is not silently ignored
    (["--set", "config.runtimeImage=other:1"], "runtimeImage"),  # the chart owns it: image.repository/tag
    (["--set", "metrics.port=-1"], "/metrics/port"),
    (["--set", "metrics.port=70000"], "/metrics/port"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "simulator.enabled=yes please"], "/simulator/enabled"),
    (["--set", "simulator.port=0"], "/simulator/port"),
    (["--set", "replica=1"], "replica"),
]


@pytest.mark.parametrize(("args", "path"), REFUSED_VALUES, ids=[" ".join(a[1:]) for a, _ in REFUSED_VALUES])
def test_values_schema_refuses_bad_values_at_install(args: list[str], path: str) -> None:
    result = template(*args)
    assert result.returncode != 0, f"{args} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert path in result.stderr, result.stderr


def test_every_operator_setting_is_reachable_from_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One value per OperatorConfig field, none of them the default: each must reach the operator."""
    values = {
        "image": {"repository": "registry.example/waso", "tag": "1.2.3", "pullPolicy": "Always"},
        "metrics": {"port": 9191},
        "config": {
            "maxSessions": 50,
            "defaultQuota": {"maxSessions": 7, "sessionsPerPod": 5},
            "transport": "simulator",
            "simulatorUrl": "http://sim.example:8090",
            "redisUrl": "redis://redis.example:6379/0",
            "maxDeviceId": 10,
            "volumeSize": "2Gi",
            "storageClass": "fast",
            "resyncSeconds": 12.5,
            "cleanupTimeoutSeconds": 60,
            "writeConcurrency": 4,
            "repair": {"maxInFlight": 5, "keepBackups": 2},
            "eviction": {"minIdleSeconds": 120, "order": "LeastRecentlyActive"},
            "mongoUrl": "mongodb://ferretdb.example:27017/waso",
            "mongoPoolSize": 4,
            "logFormat": "json",
            "leaderElection": {"leaseName": "waso-a", "leaseSeconds": 6},
        },
    }
    expected: dict[str, Any] = {
        "max_sessions": 50,
        "default_quota": TenantQuotaSpec(max_sessions=7, sessions_per_pod=5),
        "runtime_image": "registry.example/waso:1.2.3",
        "image_pull_policy": "Always",
        "transport": "simulator",
        "simulator_url": "http://sim.example:8090",
        "redis_url": "redis://redis.example:6379/0",
        "max_device_id": 10,
        "volume_size": "2Gi",
        "storage_class": "fast",
        "metrics_port": 9191,
        "resync_seconds": 12.5,
        "cleanup_timeout_seconds": 60,
        "write_concurrency": 4,
        "repair": RepairSettings(max_in_flight=5, keep_backups=2),
        "eviction": EvictionSettings(min_idle_seconds=120, order="LeastRecentlyActive"),
        "mongo_url": "mongodb://ferretdb.example:27017/waso",
        "mongo_pool_size": 4,
        "log_format": "json",
        "leader_election": LeaderElectionSettings(lease_name="waso-a", lease_seconds=6),
    }
    assert set(expected) == set(OperatorConfig.model_fields), "a new setting needs a value here"
    defaults = OperatorConfig.model_construct()
    assert not [name for name, value in expected.items() if getattr(defaults, name) == value]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    config = operator_config(rendered("-f", str(path)), tmp_path, monkeypatch)
    assert {name: getattr(config, name) for name in expected} == expected
    # --set types whole numbers only (a fraction stays a string, which the schema refuses); --set-json types all.
    config = operator_config(
        rendered("--set", "config.cleanupTimeoutSeconds=90", "--set-json", "config.resyncSeconds=2.5"),
        tmp_path, monkeypatch,
    )  # fmt: skip
    assert (config.cleanup_timeout_seconds, config.resync_seconds) == (90, 2.5)


def test_metrics_port_zero_disables_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered("--set", "metrics.port=0")
    assert not [d for d in docs if d["kind"] == "Service"]
    container = find(docs, "Deployment", "waso-operator")["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in container["ports"]] == ["health"]
    assert operator_config(docs, tmp_path, monkeypatch).metrics_port == 0
    default = find(rendered(), "Service", "waso-operator-metrics")
    assert default["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics"}]
    refused = template("--set", "metrics.port=8081")
    assert refused.returncode != 0
    assert "health port" in refused.stderr


def test_simulator_value_runs_it_in_the_cluster_and_points_the_sessions_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered("--namespace", "waso-system", "--set", "simulator.enabled=true")
    deployment = find(docs, "Deployment", "waso-simulator")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "waso:dev"
    assert container["args"] == ["simulator", "--host=0.0.0.0", "--port=8090", "--qr-interval=20", "--first-device=1"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = find(docs, "Service", "waso-simulator")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8090, "targetPort": "http"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] != find(docs, "Deployment", "waso-operator")["spec"]["selector"]["matchLabels"]
    components = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"
    }
    assert {name: labels["app.kubernetes.io/component"] for name, labels in components.items()} == {
        "waso-operator": "operator",
        "waso-simulator": "simulator",
    }
    config = operator_config(docs, tmp_path, monkeypatch)
    assert (config.transport, config.simulator_url) == ("simulator", "http://waso-simulator.waso-system.svc:8090")

    docs = rendered(
        "--set", "simulator.enabled=true", "--set", "simulator.autoPair=true", "--set", "simulator.port=9000",
        "--set", "simulator.firstDevice=11", "--set", "config.simulatorUrl=http://elsewhere:1",
    )  # fmt: skip
    args = find(docs, "Deployment", "waso-simulator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-3:] == ["--qr-interval=20", "--first-device=11", "--auto-pair=2"]
    assert "--port=9000" in args
    assert operator_config(docs, tmp_path, monkeypatch).simulator_url == "http://elsewhere:1"


@pytest.fixture
def release(control_plane: ControlPlane, crds: None, tenants: Tenants) -> Iterator[str]:
    namespace = tenants.namespace("system")
    name = f"w{uuid.uuid4().hex[:6]}"
    notes = helm(
        control_plane, "install", name, str(CHART), "--namespace", namespace, "--skip-crds",
        "--set", f"namespaces={{{tenants.pattern}}}", "--set", "config.maxSessions=5",
        "--set", "simulator.enabled=true",
    )  # fmt: skip
    try:
        # NOTES.txt tells the user what to run next.
        assert "kubectl get tq,was -A" in notes
        assert f"kubectl -n {namespace} rollout status deployment/{name}-simulator" in notes
        assert "kubectl -n acme wait --for=condition=Ready was/support" in notes
        yield name
    finally:
        helm(control_plane, "uninstall", name, "--namespace", namespace)


def test_chart_installs_and_its_pods_pass_pod_security_restricted(
    control_plane: ControlPlane, tenants: Tenants, release: str
) -> None:
    namespace = tenants.namespace("system")  # labelled pod-security enforce=restricted
    core = client.CoreV1Api(control_plane.api)

    def pods(name: str) -> list[Any]:
        found: list[Any] = core.list_namespaced_pod(namespace, label_selector=f"app.kubernetes.io/name={name}").items
        return found

    for name in ("waso-operator", "waso-simulator"):
        what = f"the {name} pod (a PodSecurity refusal would leave the ReplicaSet without pods)"
        wait_for(functools.partial(pods, name), timeout=60, what=what)
    assert pods("waso-operator")[0].spec.service_account_name == "waso-operator"
    assert core.read_namespaced_service(f"{release}-simulator", namespace).spec.ports[0].port == 8090
    assert kubectl(control_plane.kubeconfig, "get", "crd", "whatsappsessions.waso.dev", "-o", "name").stdout.strip()


def test_operator_works_with_exactly_the_charts_permissions(
    control_plane: ControlPlane, tenants: Tenants, release: str, tmp_path: Path
) -> None:
    """Run the operator as the chart's ServiceAccount: admission, status and tenant workloads must all work."""
    system = tenants.namespace("system")
    core = client.CoreV1Api(control_plane.api)
    token = core.create_namespaced_service_account_token(
        "waso-operator", system, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    kubeconfig = tmp_path / "operator.kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "c", "cluster": cluster}], "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "c", "user": "operator"}}],
    }))  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(core.read_namespaced_config_map("waso-operator", system).data["config.yaml"])
    log = tmp_path / "operator.log"
    # As the chart's Deployment sets them (its downward API gives the operator its namespace).
    env = {
        "KUBECONFIG": str(kubeconfig), "WASO_CONFIG": str(config), "WASO_METRICS_PORT": "0",
        "WASO_OPERATOR_NAMESPACE": system,
    }  # fmt: skip
    tenant = tenants.namespace("acme")
    operator = spawn_waso(["operator", "-n", tenants.pattern], env, log)
    try:
        # The chart's admission policy sets the credentials finalizer at creation, once the API server has loaded it.
        wait_for(lambda: _finalizers_at_creation(control_plane.api, tenant) == [CLEANUP_FINALIZER], timeout=60,
                 what="the credentials finalizer set by the chart's MutatingAdmissionPolicy")  # fmt: skip
        assert _finalizers_at_creation(control_plane.api, "default") == []  # outside the operator's namespaces
        create_session(control_plane.api, tenant, "s1", "+4915112345699")
        obj = wait_admission(control_plane.api, tenant, "s1", expected=True, reason="Admitted")
        assert obj["status"]["shard"] == 0
        assert obj["metadata"]["finalizers"] == [CLEANUP_FINALIZER]
        # One write per admitted session: its status. The operator wrote nothing else on the object.
        writes = [(f["manager"], f.get("subresource", "")) for f in obj["metadata"]["managedFields"]]
        assert ("waso-operator", "") not in writes, writes
        assert ("waso-operator", "status") in writes, writes
        rbac = client.RbacAuthorizationV1Api(control_plane.api)
        wait_for(lambda: rbac.list_namespaced_role_binding(tenant).items, timeout=30, what="the runtime's RoleBinding")
        apps = client.AppsV1Api(control_plane.api)
        # Applied after the status, beside the decisions, and the StatefulSet last of the tenant's objects.
        sets = wait_for(lambda: apps.list_namespaced_stateful_set(tenant).items, timeout=30, what="the StatefulSet")
        assert [s.spec.replicas for s in sets] == [1]
        assert "Forbidden" not in log.read_text(), log.read_text()[-3000:]
    finally:
        operator.kill()
        operator.wait()


def _finalizers_at_creation(api: client.ApiClient, namespace: str) -> list[str]:
    """The finalizers a new session gets from admission (a dry run: nothing is stored)."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": WhatsAppSession.KIND,
        "metadata": {"name": "dry-run", "namespace": namespace}, "spec": {"phoneNumber": "+4915112345698"},
    }  # fmt: skip
    created = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, WhatsAppSession.PLURAL, body, dry_run="All"
    )
    return list(created["metadata"].get("finalizers") or [])
