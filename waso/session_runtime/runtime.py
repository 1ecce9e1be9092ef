"""The session runtime process of one shard pod.

It watches the WhatsAppSessions of its namespace labelled with its shard, keeps one
supervisor per session (running while the session is admitted and not suspended),
reports ``status.runtime`` with server-side apply (field manager ``waso-runtime``) only
when it changed, keeps a heartbeat Lease for the pod, and serves the HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from waso.api.base import API_VERSION, GROUP, VERSION
from waso.api.conditions import ConditionType, is_true
from waso.api.quota import TenantQuota, TenantQuotaSpec
from waso.api.session import CLEANUP_FINALIZER, RuntimeState, WhatsAppSession
from waso.kube import KubeClient, load_api_client
from waso.operator.world import SHARD_LABEL, honoured_quota, quota_facts
from waso.session_runtime import metrics
from waso.session_runtime.config import RuntimeConfig
from waso.session_runtime.lease_keeper import LeaseKeeper
from waso.session_runtime.ratelimit import MemoryRateLimiter, RedisRateLimiter
from waso.session_runtime.supervisor import SessionSupervisor
from waso.session_runtime.transport import SessionIdentity, Transport, TransportError

MANAGER = "waso-runtime"
log = logging.getLogger("waso.runtime")


def wants_running(session: WhatsAppSession) -> bool:
    admitted = session.status is not None and is_true(session.status.conditions, ConditionType.ADMITTED)
    return admitted and not session.spec.suspend and session.metadata.deletion_timestamp is None


class StatusReporter:
    """Applies status.runtime when it differs from what this process applied last."""

    def __init__(self, kube: KubeClient, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.applied: dict[str, dict[str, Any]] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def __call__(self, name: str, runtime: dict[str, Any]) -> None:
        lock = self.locks.setdefault(name, asyncio.Lock())
        async with lock:
            if self.applied.get(name) == runtime:
                return
            body = {
                "apiVersion": API_VERSION,
                "kind": "WhatsAppSession",
                "metadata": {"name": name, "namespace": self.namespace},
                "status": {"runtime": runtime},
            }
            try:
                await self.kube.apply(body, MANAGER, "status")
            except ApiException as error:
                if error.status != 404:
                    log.warning("status of %s not written: %s %s", name, error.status, error.reason)
                return
            metrics.STATUS_WRITES.inc()
            self.applied[name] = runtime

    def forget(self, name: str) -> None:
        self.applied.pop(name, None)


class Runtime:
    def __init__(self, config: RuntimeConfig, kube: KubeClient, clock: Callable[[], datetime] | None = None) -> None:
        self.config = config
        self.kube = kube
        self.clock = clock or (lambda: datetime.now(UTC))
        self.namespace = config.namespace
        self.leases = LeaseKeeper(kube, self.namespace, config.identity, config.lease_seconds, self.clock)
        self.reporter = StatusReporter(kube, self.namespace)
        self.sessions: dict[str, SessionSupervisor] = {}
        self.erasing: set[str] = set()
        self.tenant_quota: TenantQuotaSpec = config.default_quota
        """The namespace's TenantQuota in force (the oldest), else the operator's default."""
        self.synced = asyncio.Event()
        self.heartbeat_ok = False
        self.stopping = threading.Event()
        self.limiter: MemoryRateLimiter | RedisRateLimiter = (
            RedisRateLimiter(config.redis_url, config.rate_limit_fail == "open")
            if config.redis_url
            else MemoryRateLimiter()
        )
        self.http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- transports -------------------------------------------------------------------------

    def make_transport(self, identity: SessionIdentity) -> Transport:
        if self.config.transport == "simulator":
            from waso.session_runtime.simulator_transport import SimulatorTransport

            assert self.http is not None
            assert self.config.simulator_url is not None
            return SimulatorTransport(identity, self.config.simulator_url, self.http)
        from waso.session_runtime.neonize_transport import NeonizeTransport

        return NeonizeTransport(identity)

    # -- sessions ---------------------------------------------------------------------------

    def _on_session(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            supervisor = self.sessions.pop(name, None)
            if supervisor is not None:
                self._tasks.append(asyncio.create_task(self._retire(name, supervisor)))
            return
        session = WhatsAppSession.model_validate(obj)
        supervisor = self.sessions.get(name)
        if supervisor is None:
            identity = SessionIdentity(
                namespace=self.namespace,
                name=name,
                phone_number=session.spec.phone_number,
                device_name=session.spec.device_name or self.config.device_name,
                store_dir=self.config.data_dir / "sessions" / name,
            )
            supervisor = SessionSupervisor(identity, self.make_transport, self.leases, self.reporter, self.clock)
            self.sessions[name] = supervisor
            supervisor.start()
        supervisor.want(wants_running(session))
        deleting = session.metadata.deletion_timestamp is not None
        if deleting and CLEANUP_FINALIZER in (session.metadata.finalizers or []) and name not in self.erasing:
            self.erasing.add(name)
            self._tasks.append(asyncio.create_task(self._erase(name, supervisor)))

    async def _erase(self, name: str, supervisor: SessionSupervisor) -> None:
        """A deleted session: disconnect, unlink the device at WhatsApp, erase the store, report Removed."""
        await supervisor.close()
        lease = supervisor.lease_name
        if await self.leases.hold(lease) is None:
            log.info("%s: another runtime holds the session; it erases the credentials", name)
            return
        error = None
        try:
            await self.make_transport(supervisor.identity).unlink()
        except TransportError as failure:
            error = f"{failure}; credentials erased on this volume only"
            log.warning("%s: %s", name, error)
        shutil.rmtree(supervisor.identity.store_dir, ignore_errors=True)
        await self.leases.release(lease)
        await self.reporter(name, {"state": RuntimeState.REMOVED.value, **({"lastError": error} if error else {})})
        log.info("%s: device unlinked and credentials erased", name)

    async def _retire(self, name: str, supervisor: SessionSupervisor) -> None:
        await supervisor.close()
        self.reporter.forget(name)

    def _on_sync(self, items: list[dict[str, Any]]) -> None:
        """A full listing: start what is new, retire what is gone."""
        seen = {item["metadata"]["name"] for item in items}
        for name in list(self.sessions):
            if name not in seen:
                self._on_session("DELETED", {"metadata": {"name": name}})
        for item in items:
            self._on_session("MODIFIED", item)
        self.synced.set()

    def _watch_sessions(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in a thread: list, then watch from the list's resourceVersion; relist after 410 Gone."""
        custom = client.CustomObjectsApi(self.kube.api)
        selector = f"{SHARD_LABEL}={self.config.shard_index}"
        resource_version: str | None = None
        while not self.stopping.is_set():
            try:
                if resource_version is None:
                    listing: dict[str, Any] = custom.list_namespaced_custom_object(  # type: ignore[assignment]
                        GROUP, VERSION, self.namespace, "whatsappsessions", label_selector=selector
                    )
                    resource_version = listing["metadata"]["resourceVersion"]
                    loop.call_soon_threadsafe(self._on_sync, listing["items"])
                stream = watch.Watch()  # type: ignore[no-untyped-call]
                for event in stream.stream(  # type: ignore[no-untyped-call]
                    custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, "whatsappsessions",
                    label_selector=selector, resource_version=resource_version, timeout_seconds=30,
                    allow_watch_bookmarks=True,
                ):  # fmt: skip
                    obj = event["object"]
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        loop.call_soon_threadsafe(self._on_session, event["type"], obj)
                    if self.stopping.is_set():
                        stream.stop()  # type: ignore[no-untyped-call]
            except ApiException as error:
                if error.status == 410:
                    resource_version = None
                else:
                    log.warning("session watch failed: %s %s", error.status, error.reason)
                    self.stopping.wait(2)
            except Exception as error:
                log.warning("session watch failed: %s", error)
                self.stopping.wait(2)

    async def _poll_quota(self) -> None:
        """The namespace's TenantQuota (oldest wins), re-read periodically: it changes rarely."""
        custom = client.CustomObjectsApi(self.kube.api)
        while True:
            try:
                listing = cast(
                    dict[str, Any],
                    await self.kube.run(
                        custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, TenantQuota.PLURAL
                    ),
                )
                honoured = honoured_quota([quota_facts(item) for item in listing["items"]])
                self.tenant_quota = honoured.spec if honoured is not None else self.config.default_quota
            except ApiException as error:
                log.warning("TenantQuota not readable: %s %s", error.status, error.reason)
            await asyncio.sleep(self.config.quota_refresh_seconds)

    async def _heartbeat(self) -> None:
        name = f"waso-runtime-{self.config.pod_name}"
        while True:
            try:
                self.heartbeat_ok = await self.leases.hold(name) is not None
            except Exception as error:
                log.warning("heartbeat lease failed: %s", error)
                self.heartbeat_ok = False
            await asyncio.sleep(self.config.heartbeat_seconds)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.http = aiohttp.ClientSession()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._watch_sessions, args=(loop,), name="session-watch", daemon=True).start()
        self._tasks += [asyncio.create_task(self._poll_quota()), asyncio.create_task(self._heartbeat())]

    async def stop(self) -> None:
        """Disconnect every socket, release every lease, write the final status."""
        self.stopping.set()
        await asyncio.gather(*(s.close() for s in self.sessions.values()), return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.leases.release(f"waso-runtime-{self.config.pod_name}")
        if self.http is not None:
            await self.http.close()
        if isinstance(self.limiter, RedisRateLimiter):
            await self.limiter.close()


async def serve(config: RuntimeConfig) -> None:
    from aiohttp import web

    from waso.session_runtime.http import build_app

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(config.executor_threads, thread_name_prefix="transport"))
    kube = KubeClient(load_api_client(16), threads=16)
    runtime = Runtime(config, kube)
    await runtime.start()
    app = build_app(runtime)
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, config.http_host, config.http_port)
    await site.start()
    log.info(
        "runtime for %s shard %d on %s:%d (transport %s), instance %s",
        config.namespace, config.shard_index, config.http_host, config.http_port, config.transport, config.instance,
    )  # fmt: skip
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: disconnecting %d session(s)", len(runtime.sessions))
    await runtime.stop()
    await runner.cleanup()
    kube.close()
