"""Kubernetes API access shared by the operator and the runtime.

The official client is synchronous; callers run it in a bounded thread pool
(``KubeClient.run``) so the asyncio loop never blocks on the network.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

T = TypeVar("T")

_PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "Service": "services",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "NetworkPolicy": "networkpolicies",
    "StatefulSet": "statefulsets",
    "Lease": "leases",
    "Event": "events",
    "WhatsAppSession": "whatsappsessions",
    "TenantQuota": "tenantquotas",
}


def load_api_client(pool_size: int = 8) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        # The client reads KUBECONFIG when it is imported; read it now instead.
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def collection_path(obj: dict[str, Any]) -> str:
    """The REST path of the collection a namespaced object belongs to."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{obj['metadata']['namespace']}/{_PLURALS[kind]}"


def object_path(obj: dict[str, Any], subresource: str | None = None) -> str:
    """The REST path of a namespaced object."""
    path = f"{collection_path(obj)}/{obj['metadata']['name']}"
    return f"{path}/{subresource}" if subresource else path


class KubeClient:
    """The synchronous client behind an asyncio facade."""

    def __init__(self, api: client.ApiClient, threads: int) -> None:
        self.api = api
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")

    async def run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: call(*args, **kwargs))

    def _request(
        self, method: str, path: str, body: Any, content_type: str, query: list[tuple[str, str]]
    ) -> dict[str, Any]:
        serialized = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*serialized)
        data: bytes = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        result: dict[str, Any] = json.loads(data)
        return result

    async def apply(self, obj: dict[str, Any], manager: str, subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply, taking ownership of the fields in ``obj`` (force: we are their only writer)."""
        query = [("fieldManager", manager), ("force", "true")]
        return await self.run(
            self._request, "PATCH", object_path(obj, subresource), obj, "application/apply-patch+yaml", query
        )

    async def merge_patch(
        self, ref: dict[str, Any], patch: dict[str, Any], manager: str, subresource: str | None = None
    ) -> dict[str, Any]:
        query = [("fieldManager", manager)]
        return await self.run(
            self._request, "PATCH", object_path(ref, subresource), patch, "application/merge-patch+json", query
        )

    async def create(self, obj: dict[str, Any], manager: str) -> dict[str, Any]:
        query = [("fieldManager", manager)]
        return await self.run(self._request, "POST", collection_path(obj), obj, "application/json", query)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.api.close()  # type: ignore[no-untyped-call]
