"""The one way waso reaches the Kubernetes API (kopf's own watches aside).

Every request is a REST call on a path built from ``RESOURCES``, whose waso kinds come
from the CRD definitions, so no resource name is spelled twice. The official client
is synchronous; it runs in a bounded thread pool so the asyncio loop never blocks on
the network, and a watch runs in a thread of its own that feeds an asyncio queue.
Callers see dicts and ``ApiError``; none of them imports the client.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from waso.api.base import API_VERSION
from waso.api.crd import DEFINITIONS

T = TypeVar("T")


@dataclass(frozen=True)
class Resource:
    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        prefix = f"/apis/{self.api_version}" if "/" in self.api_version else f"/api/{self.api_version}"
        scope = f"/namespaces/{namespace}" if self.namespaced and namespace else ""
        path = f"{prefix}{scope}/{self.plural}"
        if name:
            path += f"/{name}"
        return f"{path}/{subresource}" if subresource else path


RESOURCES: dict[str, Resource] = {
    "Namespace": Resource("v1", "namespaces", namespaced=False),
    "ServiceAccount": Resource("v1", "serviceaccounts"),
    "Service": Resource("v1", "services"),
    "Pod": Resource("v1", "pods"),
    "Secret": Resource("v1", "secrets"),
    "ConfigMap": Resource("v1", "configmaps"),
    "Event": Resource("v1", "events"),
    "Role": Resource("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Resource("rbac.authorization.k8s.io/v1", "rolebindings"),
    "ClusterRole": Resource("rbac.authorization.k8s.io/v1", "clusterroles", namespaced=False),
    "ClusterRoleBinding": Resource("rbac.authorization.k8s.io/v1", "clusterrolebindings", namespaced=False),
    "TokenReview": Resource("authentication.k8s.io/v1", "tokenreviews", namespaced=False),
    "SubjectAccessReview": Resource("authorization.k8s.io/v1", "subjectaccessreviews", namespaced=False),
    "PodDisruptionBudget": Resource("policy/v1", "poddisruptionbudgets"),
    "NetworkPolicy": Resource("networking.k8s.io/v1", "networkpolicies"),
    "StatefulSet": Resource("apps/v1", "statefulsets"),
    "Lease": Resource("coordination.k8s.io/v1", "leases"),
    **{d.kind: Resource(API_VERSION, d.plural) for d in DEFINITIONS},
}


class Unreachable(ConnectionError):
    """The API server did not answer (refused, reset, timed out): an OSError, so I/O handlers catch it."""


def _lines(response: Any) -> Iterator[str]:
    """The lines of a streamed response; a broken stream raises Unreachable."""
    try:
        yield from iter_resp_lines(response)  # type: ignore[no-untyped-call]
    except (urllib3.exceptions.HTTPError, http.client.HTTPException) as error:
        raise Unreachable(f"watch stream broke: {error}") from error


class ApiError(Exception):
    """A refused request: ``status`` is the HTTP status (404 not found, 409 conflict, 403 forbidden ...)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status, self.reason, self.message = status, reason, message

    @classmethod
    def from_response(cls, status: int, reason: str, body: bytes | str | None) -> ApiError:
        try:
            message = str(json.loads(body or b"{}").get("message", ""))
        except (ValueError, AttributeError):
            message = str(body or "")
        return cls(status, reason or "", message)


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


def reference(kind: str, namespace: str, name: str) -> dict[str, Any]:
    """The minimal object that names a resource for a patch or an apply."""
    return {
        "apiVersion": RESOURCES[kind].api_version,
        "kind": kind,
        "metadata": {"namespace": namespace, "name": name},
    }


def _object_path(obj: dict[str, Any], subresource: str | None = None, *, collection: bool = False) -> str:
    meta = obj["metadata"]
    name = None if collection else meta["name"]
    return RESOURCES[obj["kind"]].path(meta.get("namespace"), name, subresource)


class KubeClient:
    """Async access to the API server through the official client's connection pool."""

    def __init__(self, api: client.ApiClient, threads: int) -> None:
        self.api = api
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")

    @classmethod
    def connect(cls, threads: int = 8) -> KubeClient:
        return cls(load_api_client(threads), threads)

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, call, *args)

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
        timeout: float | None = 30,
        stream: bool = False,
    ) -> Any:
        serialized = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*serialized, _request_timeout=timeout)
            if not 200 <= response.status < 300:
                raise ApiError.from_response(response.status, response.reason, response.read())  # type: ignore[no-untyped-call]
            if stream:
                return response.response
            return json.loads(response.read())  # type: ignore[no-untyped-call]
        except ApiException as error:
            raise ApiError.from_response(error.status or 0, error.reason or "", error.body) from None
        except (urllib3.exceptions.HTTPError, http.client.HTTPException) as error:
            raise Unreachable(f"{method} {path}: {error}") from error

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(self._call, method, path, body, content_type, query)
        return result

    # -- reads ------------------------------------------------------------------------------

    async def get(self, kind: str, namespace: str | None, name: str, subresource: str | None = None) -> dict[str, Any]:
        return await self._request("GET", RESOURCES[kind].path(namespace, name, subresource))

    async def list(self, kind: str, namespace: str | None = None, label_selector: str | None = None) -> dict[str, Any]:
        """A listing: ``items`` and ``metadata.resourceVersion`` (all namespaces when ``namespace`` is None)."""
        query = [("labelSelector", label_selector)] if label_selector else []
        return await self._request("GET", RESOURCES[kind].path(namespace), query=query)

    async def watch(
        self,
        kind: str,
        namespace: str | None,
        resource_version: str,
        label_selector: str | None = None,
        timeout_seconds: int = 30,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events after ``resource_version`` until the server ends the watch; bookmarks included.

        A 410 Gone (the version is too old) arrives as ``ApiError(410)``: list again.
        """
        query = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        path = RESOURCES[kind].path(namespace)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, dict[str, Any]] | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def pump() -> None:
            response = None
            try:
                response = self._call("GET", path, query=query, timeout=timeout_seconds + 10, stream=True)
                for line in _lines(response):
                    if stop.is_set():
                        break
                    event = json.loads(line)
                    obj = event.get("object", {})
                    if event.get("type") == "ERROR":
                        raise ApiError(int(obj.get("code", 500)), obj.get("reason", ""), obj.get("message", ""))
                    loop.call_soon_threadsafe(events.put_nowait, (event["type"], obj))
                loop.call_soon_threadsafe(events.put_nowait, None)
            except BaseException as error:  # handed to the reader
                loop.call_soon_threadsafe(events.put_nowait, error)
            finally:
                if response is not None:  # closed, not returned half-read to the pool
                    response.close()
                    response.release_conn()

        threading.Thread(target=pump, name=f"watch-{kind}", daemon=True).start()
        try:
            while True:
                item = await events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    # -- writes -----------------------------------------------------------------------------

    async def create(self, obj: dict[str, Any], manager: str) -> dict[str, Any]:
        query = [("fieldManager", manager)]
        return await self._request("POST", _object_path(obj, collection=True), obj, query=query)

    async def replace(self, obj: dict[str, Any], manager: str) -> dict[str, Any]:
        """PUT: with ``metadata.resourceVersion`` set, a concurrent writer makes this fail with 409."""
        return await self._request("PUT", _object_path(obj), obj, query=[("fieldManager", manager)])

    async def apply(self, obj: dict[str, Any], manager: str, subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply, taking ownership of the fields in ``obj`` (force: we are their only writer)."""
        query = [("fieldManager", manager), ("force", "true")]
        path = _object_path(obj, subresource)
        return await self._request("PATCH", path, obj, "application/apply-patch+yaml", query)

    async def merge_patch(
        self, ref: dict[str, Any], patch: dict[str, Any], manager: str, subresource: str | None = None
    ) -> dict[str, Any]:
        query = [("fieldManager", manager)]
        path = _object_path(ref, subresource)
        return await self._request("PATCH", path, patch, "application/merge-patch+json", query)

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        await self._request("DELETE", RESOURCES[kind].path(namespace, name))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.api.close()  # type: ignore[no-untyped-call]
