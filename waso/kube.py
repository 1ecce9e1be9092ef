"""The one way waso reaches the Kubernetes API (kopf's own watches aside).

Every request is a REST call on a path built from ``RESOURCES``, whose waso kinds come
from the CRD definitions, so no resource name is spelled twice. The official client
is synchronous; it runs in a bounded thread pool so the asyncio loop never blocks on
the network, and a watch runs in a thread of its own that feeds an asyncio queue.
Callers see dicts and ``ApiError``; none of them imports the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from prometheus_client import Counter

from waso.api.base import API_VERSION
from waso.api.crd import DEFINITIONS

T = TypeVar("T")
log = logging.getLogger("waso.kube")
REQUESTS = Counter("waso_kube_requests_total", "Requests to the Kubernetes API server, watches included", ["method"])


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


JsonPatch = list[dict[str, Any]]
"""RFC 6902 operations."""
Items = list[dict[str, Any]]
"""The objects of a listing (or of one page of it)."""


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
    def connect(cls, threads: int = 8, connections: int | None = None) -> KubeClient:
        """``threads`` requests at once; ``connections`` kept open (watches hold one each): at least ``threads``."""
        return cls(load_api_client(max(threads, connections or threads)), threads)

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
        REQUESTS.labels(method).inc()
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

    async def list(
        self,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> dict[str, Any]:
        """A listing: ``items`` and ``metadata.resourceVersion`` (all namespaces when ``namespace`` is None)."""
        query = _selectors(label_selector, field_selector)
        return await self._request("GET", RESOURCES[kind].path(namespace), query=query)

    async def list_pages(
        self,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[tuple[Items, str]]:
        """A listing in pages of at most ``page_size`` items, each with the listing's resourceVersion.

        Pages keep the memory of listing thousands of objects bounded: a caller keeps what it needs of each."""
        token = ""
        while True:
            query = [*_selectors(label_selector, field_selector), ("limit", str(page_size))]
            if token:
                query.append(("continue", token))
            page = await self._request("GET", RESOURCES[kind].path(namespace), query=query)
            yield page["items"], page["metadata"]["resourceVersion"]
            token = page["metadata"].get("continue") or ""
            if not token:
                return

    async def watch(
        self,
        kind: str,
        namespace: str | None,
        resource_version: str,
        label_selector: str | None = None,
        timeout_seconds: int = 30,
        field_selector: str | None = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events after ``resource_version`` until the server ends the watch; bookmarks included.

        A 410 Gone (the version is too old) arrives as ``ApiError(410)``: list again.
        """
        query = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
            *_selectors(label_selector, field_selector),
        ]
        path = RESOURCES[kind].path(namespace)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, dict[str, Any]] | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def deliver(item: tuple[str, dict[str, Any]] | BaseException | None) -> bool:
            """Hand an item to the reader; False once its loop is gone (an operator stopped within a process)."""
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:
                return False
            return True

        opened: list[Any] = []

        def pump() -> None:
            response = None
            try:
                response = self._call("GET", path, query=query, timeout=timeout_seconds + 10, stream=True)
                opened.append(response)
                for line in _lines(response):
                    if stop.is_set():
                        break
                    event = json.loads(line)
                    obj = event.get("object", {})
                    if event.get("type") == "ERROR":
                        raise ApiError(int(obj.get("code", 500)), obj.get("reason", ""), obj.get("message", ""))
                    if not deliver((event["type"], obj)):
                        return
                deliver(None)
            except BaseException as error:  # handed to the reader
                deliver(error)
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
            for response in opened:  # a reader that stops does not leave the thread waiting for the next line
                with contextlib.suppress(Exception):
                    response.shutdown()

    # -- writes -----------------------------------------------------------------------------

    async def create(self, obj: dict[str, Any], manager: str) -> dict[str, Any]:
        query = [("fieldManager", manager)]
        return await self._request("POST", _object_path(obj, collection=True), obj, query=query)

    async def replace(self, obj: dict[str, Any], manager: str) -> dict[str, Any]:
        """PUT: with ``metadata.resourceVersion`` set, a concurrent writer makes this fail with 409."""
        return await self._request("PUT", _object_path(obj), obj, query=[("fieldManager", manager)])

    async def apply(self, obj: dict[str, Any], manager: str, subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply, taking ownership of the fields in ``obj`` (force: we are their only writer).

        Without the server's unknown-field detection (``fieldValidation=Ignore``): waso builds what it applies
        from its typed models, the schema still applies, and the default (Warn) only adds a response header
        nobody reads, for a tenth of a status write's cost on the API server."""
        query = [("fieldManager", manager), ("force", "true"), ("fieldValidation", "Ignore")]
        path = _object_path(obj, subresource)
        return await self._request("PATCH", path, obj, "application/apply-patch+yaml", query)

    async def merge_patch(
        self, ref: dict[str, Any], patch: dict[str, Any], manager: str, subresource: str | None = None
    ) -> dict[str, Any]:
        query = [("fieldManager", manager)]
        path = _object_path(ref, subresource)
        return await self._request("PATCH", path, patch, "application/merge-patch+json", query)

    async def json_patch(self, ref: dict[str, Any], operations: JsonPatch, manager: str) -> dict[str, Any]:
        """A JSON patch (RFC 6902): with a ``test`` operation, it fails with 422 where the object changed meanwhile."""
        query = [("fieldManager", manager)]
        return await self._request("PATCH", _object_path(ref), operations, "application/json-patch+json", query)

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        await self._request("DELETE", RESOURCES[kind].path(namespace, name))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.api.close()  # type: ignore[no-untyped-call]


def _selectors(label_selector: str | None, field_selector: str | None) -> list[tuple[str, str]]:
    query = [("labelSelector", label_selector)] if label_selector else []
    return query + ([("fieldSelector", field_selector)] if field_selector else [])


WATCH_SECONDS = 300
"""How long one watch request of ``follow`` lasts (bookmarks keep its place): 5 minutes, as kopf's and near
client-go's; each renewal costs the API server a request."""
PageHandler = Callable[[Items, bool, bool], Awaitable[None] | None]
"""Called with each page of a listing, whether it is the first and whether it is the last."""
EventHandler = Callable[[str, dict[str, Any]], Awaitable[None] | None]
"""Called with each watch event's type and object (bookmarks excluded)."""


async def follow(
    kube: KubeClient,
    kind: str,
    namespace: str | None,
    on_page: PageHandler,
    on_event: EventHandler,
    *,
    label_selector: str | None = None,
    field_selector: str | None = None,
    retry_seconds: float = 2.0,
) -> None:
    """List, then watch from the listing's resourceVersion; list again after 410 Gone or a failure. Never returns.

    The informer pattern of client-go, as far as waso needs it: every consumer of a kind's objects sees a
    complete listing first and then every change, and a watch that ended or failed is noticed."""
    resource_version: str | None = None
    while True:
        try:
            if resource_version is None:
                first = True
                pages = kube.list_pages(kind, namespace, label_selector, field_selector)
                async for items, listed_at in pages:
                    resource_version = listed_at
                    await _maybe(on_page(items, first, False))
                    first = False
                await _maybe(on_page([], first, True))  # the end of the listing (a page of its own)
            assert resource_version is not None
            events = kube.watch(
                kind, namespace, resource_version, label_selector, WATCH_SECONDS, field_selector=field_selector
            )
            async for event, obj in events:
                resource_version = obj["metadata"]["resourceVersion"]
                if event != "BOOKMARK":
                    await _maybe(on_event(event, obj))
        except asyncio.CancelledError:
            raise
        except ApiError as error:
            resource_version = None
            if error.status != 410:
                log.warning("%s watch failed: %s", kind, error)
                await asyncio.sleep(retry_seconds)
        except Exception as error:  # anything else too: a watch that ended would never be noticed
            resource_version = None
            log.warning("%s watch failed: %s", kind, error)
            await asyncio.sleep(retry_seconds)


async def _maybe(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result
