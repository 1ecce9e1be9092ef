"""Smoke tests proving that the local control plane is a real one.

Each test exercises a component that a mock would not have: etcd-backed watches,
the controller-manager's Deployment and garbage collector, PodSecurity admission,
RBAC with signed ServiceAccount tokens, and Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, cast

import localcluster
import pytest
import redis
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from localcluster import BIN, LocalCluster
from processes import ClusterError

from tests.conftest import ControlPlane, RedisServer
from tests.support import api_message, kubectl, wait_for

VERSIONS = dict(
    line.split("=", 1)
    for line in (BIN.parent / "hack/versions.env").read_text().splitlines()
    if line and not line.startswith("#")
)


@pytest.mark.parametrize("name", ["kube-apiserver", "kube-controller-manager", "kube-scheduler"])
def test_binaries_report_pinned_kubernetes_version(name: str) -> None:
    out = subprocess.run([str(BIN / name), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"Kubernetes {VERSIONS['KUBERNETES_VERSION']}"


def test_etcd_and_helm_report_pinned_versions() -> None:
    etcd = subprocess.run([str(BIN / "etcd"), "--version"], capture_output=True, text=True, check=True).stdout
    assert f"etcd Version: {VERSIONS['ETCD_VERSION'].removeprefix('v')}" in etcd
    helm = subprocess.run([str(BIN / "helm"), "version"], capture_output=True, text=True, check=True).stdout
    assert f'Version:"{VERSIONS["HELM_VERSION"]}"' in helm


def test_missing_binary_is_a_failure_naming_the_build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localcluster, "BIN", tmp_path / "empty-bin")
    with pytest.raises(ClusterError, match=r"kube-apiserver|etcd") as raised:
        LocalCluster(tmp_path / "cluster").start(tied=True)
    assert "make tools" in str(raised.value)


def test_server_is_real_and_ready(control_plane: ControlPlane) -> None:
    assert kubectl(control_plane.kubeconfig, "get", "--raw", "/readyz").stdout.strip() == "ok"
    server_version = client.VersionApi(control_plane.api).get_code()
    assert server_version.git_version == VERSIONS["KUBERNETES_VERSION"]


def test_custom_resource_watch_delivers_events(control_plane: ControlPlane, namespace: str) -> None:
    ext = client.ApiextensionsV1Api(control_plane.api)
    group, plural = "smoke.waso.dev", "widgets"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer"}}}},
                        }
                    },
                }
            ],
        },
    }
    try:
        ext.create_custom_resource_definition(cast(Any, crd))  # the client accepts plain dicts
    except ApiException as error:
        if error.status != 409:
            raise
    wait_for(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in (ext.read_custom_resource_definition(f"{plural}.{group}").status.conditions or [])
        ),
        timeout=30,
        what="the CRD to be Established",
    )

    custom = client.CustomObjectsApi(control_plane.api)
    seen: list[tuple[str, str, int]] = []
    stream = watch.Watch()

    def watch_widgets() -> None:
        for event in stream.stream(
            custom.list_namespaced_custom_object, group, "v1", namespace, plural, timeout_seconds=30
        ):
            obj = event["object"]
            seen.append((event["type"], obj["metadata"]["name"], obj["spec"]["size"]))
            if event["type"] == "DELETED":
                stream.stop()

    watcher = threading.Thread(target=watch_widgets, daemon=True)
    watcher.start()
    body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 1}}
    # The watch may start after the create; ADDED is still delivered by the initial list.
    custom.create_namespaced_custom_object(group, "v1", namespace, plural, body)
    custom.patch_namespaced_custom_object(group, "v1", namespace, plural, "w1", {"spec": {"size": 2}})
    wait_for(lambda: any(e[0] == "MODIFIED" for e in seen), timeout=30, what="a MODIFIED event")
    custom.delete_namespaced_custom_object(group, "v1", namespace, plural, "w1")
    watcher.join(timeout=30)
    assert ("ADDED", "w1", 1) in seen
    assert ("MODIFIED", "w1", 2) in seen
    assert seen[-1][0] == "DELETED"


def _deployment(name: str, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name="main", image="example.invalid/app:1")]),
            ),
        ),
    )


def test_controller_manager_turns_deployment_into_pods_and_collects_garbage(
    control_plane: ControlPlane, namespace: str
) -> None:
    apps = client.AppsV1Api(control_plane.api)
    core = client.CoreV1Api(control_plane.api)
    apps.create_namespaced_deployment(namespace, _deployment("web", replicas=2))

    replica_sets = wait_for(
        lambda: apps.list_namespaced_replica_set(namespace).items, timeout=60, what="the Deployment's ReplicaSet"
    )
    assert replica_sets[0].metadata.owner_references[0].name == "web"

    def two_pods() -> list[client.V1Pod] | None:
        pods = core.list_namespaced_pod(namespace).items
        return pods if len(pods) == 2 else None

    pods = wait_for(two_pods, timeout=60, what="two Pods from the ReplicaSet")
    assert all(p.metadata.owner_references[0].kind == "ReplicaSet" for p in pods)

    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")
    wait_for(
        lambda: (
            (not apps.list_namespaced_replica_set(namespace).items and not core.list_namespaced_pod(namespace).items)
            or None
        ),
        timeout=60,
        what="the garbage collector to delete the ReplicaSet and its Pods",
    )


def test_garbage_collector_deletes_dependents_of_a_deleted_owner(control_plane: ControlPlane, namespace: str) -> None:
    core = client.CoreV1Api(control_plane.api)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    reference = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependent", owner_references=[reference]))
    )
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except ApiException as error:
            return error.status == 404
        return False

    wait_for(dependent_gone, timeout=60, what="the dependent ConfigMap to be garbage-collected")


def test_pod_security_restricted_rejects_a_privileged_pod(control_plane: ControlPlane, namespace: str) -> None:
    core = client.CoreV1Api(control_plane.api)
    core.patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="root"),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(
                    name="main",
                    image="example.invalid/app:1",
                    security_context=client.V1SecurityContext(run_as_user=0, allow_privilege_escalation=True),
                )
            ]
        ),
    )
    with pytest.raises(ApiException) as raised:
        core.create_namespaced_pod(namespace, pod)
    assert raised.value.status == 403
    message = api_message(raised.value)
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "allowPrivilegeEscalation != false" in message


def test_service_account_without_permissions_is_denied(control_plane: ControlPlane, namespace: str) -> None:
    core = client.CoreV1Api(control_plane.api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody"))
    )
    user = f"system:serviceaccount:{namespace}:nobody"
    review = client.AuthorizationV1Api(control_plane.api).create_subject_access_review(
        client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user,
                groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                resource_attributes=client.V1ResourceAttributes(namespace=namespace, verb="list", resource="secrets"),
            )
        )
    )
    assert review.status.allowed is False

    # The token is signed by the API server; using it proves authentication and RBAC end to end.
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    admin = control_plane.api.configuration
    as_service_account = client.Configuration(host=admin.host)
    as_service_account.ssl_ca_cert = admin.ssl_ca_cert
    as_service_account.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(as_service_account) as api, pytest.raises(ApiException) as raised:
        client.CoreV1Api(api).list_namespaced_secret(namespace)
    assert raised.value.status == 403
    message = api_message(raised.value)
    assert f'User "{user}" cannot list resource "secrets"' in message


def test_redis_answers(redis_server: RedisServer) -> None:
    connection = redis.Redis.from_url(redis_server.url)
    try:
        assert connection.ping() is True
        connection.set("waso:smoke", "1")
        assert connection.incr("waso:smoke") == 2
    finally:
        connection.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _leftovers(directory: Path, network: int) -> list[str]:
    """What a stopped cluster could leave on the machine: processes, cgroups (a live node's claim on the kernel
    settings is its cgroup), the veth."""
    found = []
    marker = str(directory).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    found.append(f"process {entry.name}")
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/waso-node-{network}")]
    link = subprocess.run(["ip", "link", "show", f"waso{network}h"], capture_output=True, check=False)
    if link.returncode == 0:
        found.append(f"link waso{network}h")
    return found


def _wait_until_gone(directory: Path, network: int) -> None:
    try:
        wait_for(lambda: not _leftovers(directory, network), timeout=90, what="the cluster and its node to go")
    except AssertionError as error:
        raise AssertionError(f"{error}; still there: {_leftovers(directory, network)}") from None


def _pod_on_the_node(kubeconfig: Path) -> None:
    """A pod from the pause image: its container and sandbox are processes in the node's cgroups."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper", "namespace": "default"},
        "spec": {
            "containers": [{"name": "pause", "image": localcluster.pause_image(), "imagePullPolicy": "Never"}],
            "automountServiceAccountToken": False,
        },
    }
    kubectl(kubeconfig, "apply", "-f", "-", stdin=json.dumps(pod))
    kubectl(kubeconfig, "wait", "--for=condition=Ready", "pod/sleeper", "--timeout=120s")


def test_a_crashed_caller_leaves_no_cluster_behind(tmp_path: Path) -> None:
    directory = tmp_path / "tied"
    script = (
        "import json, sys, time\n"
        "from dataclasses import asdict\n"
        "from pathlib import Path\n"
        "from localcluster import LocalCluster\n"
        f"state = LocalCluster(Path({str(directory)!r})).start(tied=True)\n"
        "print(json.dumps(asdict(state)), flush=True)\n"
        "time.sleep(600)\n"
    )
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(BIN.parent / "hack")})  # fmt: skip
    assert caller.stdout is not None
    state = json.loads(caller.stdout.readline())
    pids, network = state["pids"], state["node_network"]
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node", "node-init"}
    assert all(_alive(pid) for pid in pids.values())
    _pod_on_the_node(Path(state["kubeconfig"]))
    assert _leftovers(directory, network)  # the check sees a running cluster
    caller.kill()  # a crash: no cleanup code runs in the caller
    caller.wait()
    _wait_until_gone(directory, network)


def test_up_then_down_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "user-kubeconfig"))
    directory = tmp_path / "detached"
    assert localcluster.main(["up", "--dir", str(directory)]) == 0
    pids = json.loads((directory / "state.json").read_text())["pids"]
    assert all(_alive(pid) for pid in pids.values())
    current = kubectl(tmp_path / "user-kubeconfig", "config", "current-context").stdout.strip()
    assert current == "waso-local"
    network = json.loads((directory / "state.json").read_text())["node_network"]
    _pod_on_the_node(directory / "kubeconfig")
    assert localcluster.main(["down", "--dir", str(directory)]) == 0
    assert not any(_alive(pid) for pid in pids.values())
    assert not (directory / "etcd").exists()
    assert _leftovers(directory, network) == []
