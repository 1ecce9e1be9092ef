"""The Kubernetes objects of one tenant's session pods, built as plain dicts.

Pure functions of (tenant, quota, configuration, replicas): a unit test compares them
without a cluster, and the controller applies them with server-side apply. The pod
template passes PodSecurity ``restricted``; the runtime's Role allows only what the
runtime needs in its own namespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from waso.api.base import GROUP
from waso.api.quota import TenantQuota, TenantQuotaSpec
from waso.api.session import WhatsAppSession
from waso.api.webhook import Webhook
from waso.operator.config import OperatorConfig
from waso.operator.status import RUNTIME_PORT

NAME = "waso-sessions"
RUNTIME_ACCOUNT = "waso-runtime"
DATA_DIR = "/var/lib/waso"
RUNTIME_UID = 65532
SELECTOR = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/instance": NAME}
LABELS = {**SELECTOR, "app.kubernetes.io/part-of": "waso", "app.kubernetes.io/managed-by": "waso-operator"}


def _meta(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": dict(LABELS)}


def runtime_env(config: OperatorConfig, quota: TenantQuotaSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "WASO_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "WASO_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {
            "name": "WASO_SHARD",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}},
        },
        {"name": "WASO_TRANSPORT", "value": config.transport},
        {"name": "WASO_DATA_DIR", "value": DATA_DIR},
        {"name": "WASO_HTTP_PORT", "value": str(RUNTIME_PORT)},
        # neonize holds one executor thread per live session; leave room for short calls.
        {"name": "WASO_EXECUTOR_THREADS", "value": str(quota.sessions_per_pod + 16)},
        # What applies while the namespace has no TenantQuota of its own.
        {"name": "WASO_DEFAULT_QUOTA", "value": json.dumps(config.default_quota.to_wire(), sort_keys=True)},
        {"name": "WASO_KEEP_BACKUPS", "value": str(config.repair.keep_backups)},
        {"name": "WASO_LOG_FORMAT", "value": config.log_format},
    ]
    if config.simulator_url:
        env.append({"name": "WASO_SIMULATOR_URL", "value": config.simulator_url})
    if config.redis_url:
        env.append({"name": "WASO_REDIS_URL", "value": config.redis_url})
    if config.mongo_url:
        env.append({"name": "WASO_MONGO_URL", "value": config.mongo_url})
        env.append({"name": "WASO_MONGO_POOL_SIZE", "value": str(config.mongo_pool_size)})
    return env


def statefulset(namespace: str, quota: TenantQuotaSpec, config: OperatorConfig, replicas: int) -> dict[str, Any]:
    resources = quota.pod_resources.to_wire()
    probe = {"periodSeconds": 10, "timeoutSeconds": 2}
    container = {
        "name": "runtime",
        "image": config.runtime_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["runtime"],
        "env": runtime_env(config, quota),
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, **probe},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "failureThreshold": 6, **probe},
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": config.volume_size}},
    }
    if config.storage_class:
        claim_spec["storageClassName"] = config.storage_class
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(NAME, namespace),
        "spec": {
            "serviceName": NAME,
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": dict(SELECTOR)},
            # Credentials outlive scale-down and deletion: a shard that comes back finds its sessions' stores.
            "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Retain", "whenDeleted": "Retain"},
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "serviceAccountName": RUNTIME_ACCOUNT,
                    # Room to unlink every device when the namespace is deleted; a normal stop takes seconds.
                    "terminationGracePeriodSeconds": 90,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUNTIME_UID,
                        "runAsGroup": RUNTIME_UID,
                        "fsGroup": RUNTIME_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
            "volumeClaimTemplates": [
                {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"}, "spec": claim_spec}
            ],
        },
    }


def headless_service(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(NAME, namespace),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": dict(SELECTOR),
            "ports": [{"name": "http", "port": RUNTIME_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(NAME, namespace),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(SELECTOR)}},
    }


ACCESS_LABEL = "waso.dev/runtime-access"


def network_policy(namespace: str) -> dict[str, Any]:
    """The runtime's HTTP API (QR codes, pairing codes, sending) is reachable only from the tenant's own
    namespace and from namespaces labelled waso.dev/runtime-access=true (a gateway, monitoring)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(NAME, namespace),
        "spec": {
            "podSelector": {"matchLabels": dict(SELECTOR)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": {}},
                        {"namespaceSelector": {"matchLabels": {ACCESS_LABEL: "true"}}},
                    ],
                    "ports": [{"protocol": "TCP", "port": RUNTIME_PORT}],
                }
            ],
        },
    }


def service_account(namespace: str, keep: bool = True) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _access_meta(namespace, keep)}


IDENTITY_FINALIZER = "waso.dev/runtime-identity"
"""On the runtime's ServiceAccount, Role and RoleBinding while the tenant has sessions: deleting the
namespace removes them at once (and a token of a deleted ServiceAccount stops working), but a runtime
stopping in it still has to unlink its devices and report that it did."""


def _access_meta(namespace: str, keep: bool) -> dict[str, Any]:
    return {**_meta(RUNTIME_ACCOUNT, namespace), "finalizers": [IDENTITY_FINALIZER] if keep else []}


RUNTIME_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [GROUP],
        "resources": [WhatsAppSession.PLURAL, TenantQuota.PLURAL],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [GROUP], "resources": [f"{WhatsAppSession.PLURAL}/status"], "verbs": ["get", "patch"]},
    # Events out: the namespace's Webhooks, and this shard's entry in their status. Their signing Secrets are
    # granted by the tenant, by name (docs/events.md): the operator holds no Secret access to grant.
    {"apiGroups": [GROUP], "resources": [Webhook.PLURAL], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [GROUP], "resources": [f"{Webhook.PLURAL}/status"], "verbs": ["get", "patch"]},
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    },
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    # Its own namespace only (a Role grants nothing elsewhere): on SIGTERM, is the tenant being deleted?
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
]


def runtime_role(namespace: str, keep: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _access_meta(namespace, keep),
        "rules": RUNTIME_RULES,
    }


REVIEWS = "waso-runtime-reviews"
REVIEW_RULES: list[dict[str, Any]] = [
    # Who is calling the runtime's API, and may they? (waso.session_runtime.auth) Cluster-scoped APIs:
    # a Role cannot grant them, so one ClusterRole, bound to every tenant's runtime ServiceAccount.
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
]


def review_role() -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": REVIEWS, "labels": dict(LABELS)},
        "rules": REVIEW_RULES,
    }


def review_binding(operator_namespace: str, tenants: Iterable[str]) -> dict[str, Any]:
    """The runtimes of these tenants may ask for reviews; one binding per operator installation."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": f"{REVIEWS}-{operator_namespace}", "labels": dict(LABELS)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": REVIEWS},
        "subjects": [
            {"kind": "ServiceAccount", "name": RUNTIME_ACCOUNT, "namespace": namespace} for namespace in sorted(tenants)
        ],
    }


def runtime_role_binding(namespace: str, keep: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _access_meta(namespace, keep),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": RUNTIME_ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": RUNTIME_ACCOUNT, "namespace": namespace}],
    }


def tenant_objects(
    namespace: str, quota: TenantQuotaSpec, config: OperatorConfig, replicas: int, has_sessions: bool = True
) -> list[dict[str, Any]]:
    """Everything one tenant's session pods need, in creation order.

    Without sessions the runtime's access is no longer held by a finalizer.
    """
    return [
        service_account(namespace, has_sessions),
        runtime_role(namespace, has_sessions),
        runtime_role_binding(namespace, has_sessions),
        headless_service(namespace),
        network_policy(namespace),
        disruption_budget(namespace),
        statefulset(namespace, quota, config, replicas),
    ]
