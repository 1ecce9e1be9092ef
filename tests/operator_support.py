"""Helpers for operator tests: tenant namespaces, sessions, and reading decisions back."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from processes import die_with_parent
from urllib3.exceptions import ProtocolError

from tests.support import wait_for
from waso.api.base import GROUP, VERSION

PLURAL = "whatsappsessions"


@dataclass
class Tenants:
    """Namespaces named <prefix>-<tenant>, matched by the operator's namespace pattern <prefix>-*."""

    api: client.ApiClient
    prefix: str = field(default_factory=lambda: "w" + uuid.uuid4().hex[:8])
    created: list[str] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        return f"{self.prefix}-*"

    def namespace(self, tenant: str) -> str:
        name = f"{self.prefix}-{tenant}"
        if name not in self.created:
            labels = {"pod-security.kubernetes.io/enforce": "restricted", "waso.dev/test": "true"}
            client.CoreV1Api(self.api).create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
            )
            self.created.append(name)
        return name

    def cleanup(self) -> None:
        custom = client.CustomObjectsApi(self.api)
        for name in self.created:
            # The operator that would release the credentials finalizer has stopped with the test.
            with contextlib.suppress(ApiException):
                for item in list_sessions(self.api, name):
                    custom.patch_namespaced_custom_object(
                        GROUP, VERSION, name, PLURAL, item["metadata"]["name"], {"metadata": {"finalizers": None}}
                    )
            rbac = client.RbacAuthorizationV1Api(self.api)
            unfinalized = {"metadata": {"finalizers": None}}
            with contextlib.suppress(ApiException):  # likewise the runtime's access, held while sessions exist
                rbac.patch_namespaced_role("waso-runtime", name, unfinalized)
            with contextlib.suppress(ApiException):
                rbac.patch_namespaced_role_binding("waso-runtime", name, unfinalized)
            with contextlib.suppress(ApiException):
                client.CoreV1Api(self.api).patch_namespaced_service_account("waso-runtime", name, unfinalized)
            with contextlib.suppress(ApiException):
                client.CoreV1Api(self.api).delete_namespace(name, propagation_policy="Background")


def create_session(api: client.ApiClient, namespace: str, name: str, phone: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WhatsAppSession",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"phoneNumber": phone, **spec},
    }
    return cast(
        dict[str, Any],
        client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body),
    )


def create_quota(api: client.ApiClient, namespace: str, name: str = "default", **spec: Any) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TenantQuota",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "tenantquotas", body)


def get(api: client.ApiClient, namespace: str, name: str, plural: str = PLURAL) -> dict[str, Any]:
    return cast(
        dict[str, Any],
        client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name),
    )


def namespace_gone(api: client.ApiClient, name: str) -> bool:
    """Whether the namespace is deleted for good (not merely terminating)."""
    try:
        client.CoreV1Api(api).read_namespace(name)
    except client.ApiException as error:
        return error.status == 404
    return False


def list_sessions(api: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL
    )["items"]
    return items


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def admitted(obj: dict[str, Any]) -> bool | None:
    """True/False once decided, None while undecided."""
    found = condition(obj, "Admitted")
    return None if found is None else found["status"] == "True"


def wait_admission(
    api: client.ApiClient, namespace: str, name: str, *, expected: bool, reason: str, timeout: float = 60
) -> dict[str, Any]:
    def decided() -> dict[str, Any] | None:
        obj = get(api, namespace, name)
        found = condition(obj, "Admitted")
        return obj if found and found["status"] == str(expected) and found["reason"] == reason else None

    return wait_for(decided, timeout=timeout, what=f"{namespace}/{name} Admitted={expected} ({reason})")


def create_many(api: client.ApiClient, specs: list[tuple[str, str, str]], threads: int = 8) -> None:
    """Create (namespace, name, phone) sessions concurrently."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: create_session(api, *s), specs))


@contextlib.contextmanager
def operator_process(
    kubeconfig: Path, namespace_pattern: str, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`waso operator` as a real process, killed with the test."""
    full_env = {**os.environ, "KUBECONFIG": str(kubeconfig), "WASO_METRICS_PORT": "0", **env}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "waso.cli.main", "operator", "-n", namespace_pattern],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


API_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [GROUP],
        "resources": [f"{PLURAL}/messages", f"{PLURAL}/qr", f"{PLURAL}/pairingcode"],
        "verbs": ["create", "get", "list"],
    }
]
"""Everything the runtime's API offers (waso.session_runtime.auth), for an application of the tenant."""


def api_token(
    api: client.ApiClient, namespace: str, name: str = "app", rules: list[dict[str, Any]] | None = API_RULES,
    audience: str = "waso",
) -> str:  # fmt: skip
    """A ServiceAccount ``name`` with a Role of ``rules`` (none: no Role), and a token for ``audience``.

    Returns once the API server's authorizer grants the rules, so a first request is not refused
    (and the refusal cached) while RBAC catches up.
    """
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    with contextlib.suppress(ApiException):
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )
    if rules:
        meta = client.V1ObjectMeta(name=name)
        rbac.create_namespaced_role(namespace, cast(Any, {"metadata": {"name": name}, "rules": rules}))
        rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=meta,
                role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=name),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name=name, namespace=namespace)],
            ),
        )
        first = rules[0]
        attributes = client.V1ResourceAttributes(
            namespace=namespace, verb=first["verbs"][0], group=first["apiGroups"][0],
            resource=first["resources"][0].split("/")[0], subresource=first["resources"][0].partition("/")[2] or None,
        )  # fmt: skip
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=f"system:serviceaccount:{namespace}:{name}",
                groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                resource_attributes=attributes,
            )
        )
        authorization = client.AuthorizationV1Api(api)
        wait_for(
            lambda: authorization.create_subject_access_review(review).status.allowed,
            timeout=30, what=f"RBAC to grant {name} its Role",
        )  # fmt: skip
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[audience], expiration_seconds=3600)
    )
    token: str = core.create_namespaced_service_account_token(name, namespace, request).status.token  # type: ignore[assignment]
    return token


def metrics_token(api: client.ApiClient, namespace: str, name: str = "metrics") -> str:
    """A token whose ServiceAccount may read ``/metrics`` (a ClusterRole: a Role cannot grant a URL), as Prometheus'."""
    rbac = client.RbacAuthorizationV1Api(api)
    cluster_name = f"{namespace}-{name}"  # cluster-scoped: named after the tenant, left with the test cluster
    role: Any = {"metadata": {"name": cluster_name}, "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]}
    rbac.create_cluster_role(role)
    binding: Any = {
        "metadata": {"name": cluster_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }
    rbac.create_cluster_role_binding(binding)
    token = api_token(api, namespace, name, rules=None)
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{namespace}:{name}",
            non_resource_attributes=client.V1NonResourceAttributes(path="/metrics", verb="get"),
        )
    )
    authorization = client.AuthorizationV1Api(api)
    wait_for(
        lambda: authorization.create_subject_access_review(review).status.allowed,
        timeout=30, what=f"RBAC to let {name} read /metrics",
    )  # fmt: skip
    return token


@contextlib.contextmanager
def observed_peak(api: client.ApiClient, prefix: str, wake: tuple[str, str]) -> Iterator[dict[str, int]]:
    """The most sessions of namespaces ``prefix``* ever Admitted at once, as the API server's watch reports them.

    On leaving, the session ``wake`` (namespace, name) gets a label, so that the watch sees every change made
    before it, and the count is final when the block is left.
    """
    peak = {"admitted": 0}
    state: dict[str, bool] = {}
    stop = threading.Event()

    def observe() -> None:
        custom = client.CustomObjectsApi(api)
        stream = watch.Watch()
        with contextlib.suppress(ProtocolError):  # the control plane stopped after the test
            for event in stream.stream(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, timeout_seconds=600):
                obj = event["object"]
                if obj["metadata"]["namespace"].startswith(prefix):
                    state[obj["metadata"]["uid"]] = event["type"] != "DELETED" and bool(admitted(obj))
                    peak["admitted"] = max(peak["admitted"], sum(state.values()))
                if stop.is_set():
                    stream.stop()

    observer = threading.Thread(target=observe, daemon=True)
    observer.start()
    try:
        yield peak
    finally:
        stop.set()
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP, VERSION, wake[0], PLURAL, wake[1], {"metadata": {"labels": {"done": "yes"}}}
        )
        observer.join(timeout=30)
