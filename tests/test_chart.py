"""The Helm chart: it renders a valid operator configuration, installs on the real API server,
its pod template passes PodSecurity restricted, and its RBAC is enough for the operator to work."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.conftest import ControlPlane
from tests.operator_support import Tenants, create_session, wait_admission
from tests.runtime_support import spawn_waso
from tests.support import BIN, kubectl, wait_for
from waso.operator.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts/waso"


def helm(control_plane: ControlPlane, *args: str) -> str:
    result = subprocess.run(
        [str(BIN / "helm"), f"--kubeconfig={control_plane.kubeconfig}", *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(*args: str) -> list[dict[str, Any]]:
    command = [str(BIN / "helm"), "template", "waso", str(CHART), "--kube-version", "1.36.3", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_chart_lints_and_renders_a_valid_operator_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lint = subprocess.run([str(BIN / "helm"), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = rendered("--set", "config.maxSessions=50", "--set", "config.maxDeviceId=10")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    monkeypatch.setenv("WASO_CONFIG", str(path))
    for variable in [v for v in os.environ if v.startswith("WASO_") and v != "WASO_CONFIG"]:
        monkeypatch.delenv(variable)
    config = load_config()
    assert (config.max_sessions, config.max_device_id, config.runtime_image) == (50, 10, "waso:dev")
    assert config.default_quota.sessions_per_pod == 20
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    refused = subprocess.run(
        [str(BIN / "helm"), "template", "waso", str(CHART), "--kube-version", "1.36.3", "--set", "replicas=2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "replicas must be 1" in refused.stderr


@pytest.fixture
def release(control_plane: ControlPlane, crds: None, tenants: Tenants) -> Iterator[str]:
    namespace = tenants.namespace("system")
    name = f"w{uuid.uuid4().hex[:6]}"
    helm(
        control_plane, "install", name, str(CHART), "--namespace", namespace, "--skip-crds",
        "--set", f"namespaces={{{tenants.pattern}}}", "--set", "config.maxSessions=5",
    )  # fmt: skip
    try:
        yield name
    finally:
        helm(control_plane, "uninstall", name, "--namespace", namespace)


def test_chart_installs_and_its_pod_passes_pod_security_restricted(
    control_plane: ControlPlane, tenants: Tenants, release: str
) -> None:
    namespace = tenants.namespace("system")  # labelled pod-security enforce=restricted
    core = client.CoreV1Api(control_plane.api)
    pods = wait_for(
        lambda: core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/name=waso-operator").items,
        timeout=60,
        what="the operator pod (a PodSecurity refusal would leave the ReplicaSet without pods)",
    )
    assert pods[0].spec.service_account_name == "waso-operator"
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
    env = {"KUBECONFIG": str(kubeconfig), "WASO_CONFIG": str(config), "WASO_METRICS_PORT": "0"}
    tenant = tenants.namespace("acme")
    operator = spawn_waso(["operator", "-n", tenants.pattern], env, log)
    try:
        create_session(control_plane.api, tenant, "s1", "+4915112345699")
        obj = wait_admission(control_plane.api, tenant, "s1", expected=True, reason="Admitted")
        assert obj["metadata"]["labels"]["waso.dev/shard"] == "0"
        rbac = client.RbacAuthorizationV1Api(control_plane.api)
        wait_for(lambda: rbac.list_namespaced_role_binding(tenant).items, timeout=30, what="the runtime's RoleBinding")
        apps = client.AppsV1Api(control_plane.api)
        assert apps.read_namespaced_stateful_set("waso-sessions", tenant).spec.replicas == 1
        assert "Forbidden" not in log.read_text(), log.read_text()[-3000:]
    finally:
        operator.kill()
        operator.wait()
