"""The session runtime process of one shard pod.

It watches the WhatsAppSessions of its namespace labelled with its shard, keeps one
supervisor per session (running while the session is admitted and not suspended),
reports ``status.runtime`` with server-side apply (field manager ``waso-runtime``) only
when it changed, keeps a heartbeat Lease for the pod, and serves the HTTP API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import logging
import shutil
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from pymongo.errors import ConnectionFailure, PyMongoError

from waso import logs
from waso.api.base import API_VERSION
from waso.api.conditions import ConditionType, is_true
from waso.api.quota import TenantQuota, TenantQuotaSpec
from waso.api.session import (
    CLEANUP_FINALIZER,
    RepairReport,
    RepairRequest,
    RuntimeState,
    RuntimeStatus,
    WhatsAppSession,
)
from waso.api.tenancy import (
    HEARTBEAT_LABEL,
    MEMORY_ANNOTATION,
    SHARD_LABEL,
    honoured_quota,
    memory_annotation,
    quota_facts,
    revision,
)
from waso.api.webhook import Webhook
from waso.kube import ApiError, KubeClient, follow
from waso.lease_keeper import LeaseKeeper
from waso.session_runtime import metrics
from waso.session_runtime.auth import Authorizer
from waso.session_runtime.backoff import Backoff
from waso.session_runtime.backups import BackupError, backup_store, prune_backups, reset_store, restore_backup
from waso.session_runtime.config import RuntimeConfig
from waso.session_runtime.events import EventHub, MemoryOutbox
from waso.session_runtime.ratelimit import MemoryRateLimiter, RedisRateLimiter
from waso.session_runtime.store import MessageStore
from waso.session_runtime.streams import stream_slots
from waso.session_runtime.supervisor import MANAGER, SessionSupervisor
from waso.session_runtime.transport import SessionIdentity, Transport, TransportError
from waso.status_writer import Outcome, Result, StatusWriter

log = logging.getLogger("waso.runtime")
STOP_ERASING_SECONDS = 60.0
"""How long a stopping runtime waits for erasures in flight (the pod's grace period is 90 s)."""


def wants_running(session: WhatsAppSession) -> bool:
    admitted = session.status is not None and is_true(session.status.conditions, ConditionType.ADMITTED)
    return admitted and not session.spec.suspend and session.metadata.deletion_timestamp is None


class StatusReporter:
    """Writes status.runtime of this namespace's sessions through one StatusWriter, one write at a time per session.

    ``observe`` records what the watch delivered, so a report compares against what the
    API server holds (not against what this process believes it wrote last).
    """

    def __init__(self, kube: KubeClient, namespace: str) -> None:
        self.namespace = namespace
        self.writer = StatusWriter(kube, WhatsAppSession.KIND, MANAGER, "runtime", metrics.STATUS_WRITES.inc)
        self.observed: dict[str, tuple[int, dict[str, Any] | None]] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    def observe(self, session: WhatsAppSession) -> None:
        runtime = session.status.runtime if session.status else None
        wire = runtime.to_wire() if runtime else None
        self.observed[session.metadata.name] = (revision(session.metadata.resource_version), wire)

    async def __call__(self, name: str, runtime: RuntimeStatus) -> Result:
        async with self.locks.setdefault(name, asyncio.Lock()):
            observed_revision, observed = self.observed.get(name, (0, None))
            return await self.writer.write(self.namespace, name, runtime.to_wire(), observed, observed_revision)

    def forget(self, name: str) -> None:
        self.observed.pop(name, None)
        self.locks.pop(name, None)
        self.writer.forget(self.namespace, name)


class Runtime:
    def __init__(self, config: RuntimeConfig, kube: KubeClient, clock: Callable[[], datetime] | None = None) -> None:
        self.config = config
        self.kube = kube
        self.clock = clock or (lambda: datetime.now(UTC))
        self.namespace = config.namespace
        self.leases = LeaseKeeper(kube, self.namespace, config.identity, config.lease_seconds, self.clock, MANAGER)
        self.reporter = StatusReporter(kube, self.namespace)
        self.authorizer = Authorizer(
            kube.create, self.namespace, config.auth_audiences,
            on_review=lambda kind: metrics.AUTH_REVIEWS.labels(kind).inc(),
        )  # fmt: skip
        self.sessions: dict[str, SessionSupervisor] = {}
        self.erasing: dict[str, asyncio.Task[None]] = {}
        self.tenant_quota: TenantQuotaSpec = config.default_quota
        """The namespace's TenantQuota in force (the oldest), else the operator's default."""
        self.synced = asyncio.Event()
        self.heartbeat_ok = False
        self.limiter: MemoryRateLimiter | RedisRateLimiter = (
            RedisRateLimiter(config.redis_url, config.rate_limit_fail == "open")
            if config.redis_url
            else MemoryRateLimiter()
        )
        self.stream_slots = stream_slots(config)
        self.store = (
            MessageStore(config.mongo_url, self.namespace, config.shard_index, config.mongo_pool_size)
            if config.mongo_url
            else None
        )
        self.session_labels: dict[str, dict[str, str]] = {}
        self.events = EventHub(
            self.namespace,
            config.shard_index,
            self.store or MemoryOutbox(config.event_buffer),
            self.read_secret,
            lambda name: self.session_labels.get(name, {}),
            recorder=self.store,
            transient=(ConnectionFailure, OSError),
            intake_capacity=config.event_buffer,
            clock=self.clock,
        )
        self.webhook_status: dict[str, dict[str, Any]] = {}
        """Per Webhook uid, this shard's deliveries entry as last written."""
        self.http: aiohttp.ClientSession | None = None
        self.pairing_slots = asyncio.Semaphore(config.pairing_workers)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- transports -------------------------------------------------------------------------

    def make_transport(self, identity: SessionIdentity) -> Transport:
        if self.config.transport == "simulator":
            from waso.session_runtime.simulator_transport import SimulatorTransport

            assert self.http is not None
            assert self.config.simulator_url is not None
            return SimulatorTransport(identity, self.config.simulator_url, self.http)
        from waso.session_runtime.neonize_transport import NeonizeTransport

        return NeonizeTransport(identity, pairing_slots=self.pairing_slots)

    # -- sessions ---------------------------------------------------------------------------

    def _on_session(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.session_labels.pop(name, None)
            supervisor = self.sessions.pop(name, None)
            if supervisor is not None:
                self._spawn(self._retire(name, supervisor), f"retire:{name}", session=name)
            return
        session = WhatsAppSession.model_validate(obj)
        self.reporter.observe(session)
        self.session_labels[name] = dict(session.metadata.labels or {})
        supervisor = self.sessions.get(name)
        if supervisor is None:
            identity = SessionIdentity(
                namespace=self.namespace,
                name=name,
                phone_number=session.spec.phone_number,
                device_name=session.spec.device_name or self.config.device_name,
                store_dir=self.config.data_dir / "sessions" / name,
            )
            supervisor = SessionSupervisor(
                identity,
                self.make_transport,
                self.leases,
                self.reporter,
                self.clock,
                repairer=self.repair_store,
                emit=self.events.emit,
            )
            observed = session.status.runtime if session.status else None
            if observed is not None:  # a repair done before this process started is not done again
                supervisor.view = replace(supervisor.view, last_repair=observed.last_repair)
            self.sessions[name] = supervisor
            supervisor.start()
        supervisor.want(wants_running(session))
        repairs = session.status.repairs if session.status else None
        if repairs is not None and repairs.requested is not None:
            supervisor.request_repair(repairs.requested)
        deleting = session.metadata.deletion_timestamp is not None
        if deleting and CLEANUP_FINALIZER in (session.metadata.finalizers or []):
            self._start_erasing(name, supervisor)
        elif supervisor.holds_lease():
            # Someone else's write (or a stale one) may show; the holder puts the truth back.
            self._spawn(supervisor.report(), f"report:{name}", session=name)

    def repair_store(self, identity: SessionIdentity, request: RepairRequest) -> RepairReport:
        """Back up the session's credential store, keep the newest backups, reset the store (blocking).

        A rollback request (with a backup) restores that backup instead.
        """
        backups_dir = self.config.data_dir / "backups" / identity.name
        now = self.clock()
        if request.backup is not None:
            try:
                restore_backup(backups_dir, request.backup, identity.store_dir)
            except (BackupError, OSError, ValueError) as error:
                return RepairReport(id=request.id, backup=request.backup, completed_at=now, error=str(error)[:1024])
            return RepairReport(id=request.id, backup=request.backup, completed_at=now)
        try:
            taken = backup_store(identity.store_dir, backups_dir, request.id, now)
        except (BackupError, OSError, TimeoutError, ValueError) as error:
            return RepairReport(id=request.id, completed_at=now, error=f"backup failed, store kept: {error}"[:1024])
        if not taken.files:  # nothing was stored: an empty backup would only push a real one out
            shutil.rmtree(taken.path, ignore_errors=True)
        prune_backups(backups_dir, self.config.keep_backups)
        reset_store(identity.store_dir)
        return RepairReport(id=request.id, backup=taken.id if taken.files else None, completed_at=now)

    def _start_erasing(self, name: str, supervisor: SessionSupervisor) -> asyncio.Task[None]:
        """The erasure of a session, started once while it runs (it is idempotent once finished)."""
        running = self.erasing.get(name)
        if running is not None:
            return running
        task = self._spawn(self._erase(name, supervisor), f"erase:{name}", session=name)
        self.erasing[name] = task
        task.add_done_callback(lambda done: self.erasing.pop(name, None) if self.erasing.get(name) is done else None)
        return task

    def _spawn(self, work: Coroutine[Any, Any, None], name: str, *, session: str | None = None) -> asyncio.Task[None]:
        """A background task, kept until it ends (and cancelled with the runtime); its lines name ``session``."""
        task = asyncio.create_task(work, name=name, context=logs.session_context(session) if session else None)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _erase(self, name: str, supervisor: SessionSupervisor) -> None:
        """A deleted session: disconnect, unlink the device at WhatsApp, erase the store, report Removed.

        Retried with back-off until the API server holds Removed (or the session is gone), so
        that the operator never falls back to its timeout because one write failed.
        """
        await supervisor.close()
        lease = supervisor.lease_name
        delay = 1.0
        while True:
            try:
                held = await self.leases.hold(lease) is not None
            except ApiError as error:
                # A namespace being deleted refuses new objects, a Lease included: nobody else can start it.
                held = error.status == 403
                if not held:
                    log.warning("lease not readable (%s); erasing later", error)
            except OSError as error:
                held = False
                log.warning("lease not readable (%s); erasing later", error)
            else:
                if not held:
                    log.info("another runtime holds the session; it erases the credentials")
                    return
            if held:
                problem = None
                try:
                    await self.make_transport(supervisor.identity).unlink()  # nothing to do once erased
                except TransportError as failure:
                    problem = f"{failure}; credentials erased on this volume only"
                    log.warning(problem)
                shutil.rmtree(supervisor.identity.store_dir, ignore_errors=True)
                shutil.rmtree(self.config.data_dir / "backups" / name, ignore_errors=True)  # credentials too
                result = await self.reporter(name, RuntimeStatus(state=RuntimeState.REMOVED, last_error=problem))
                if result.outcome != Outcome.FAILED:
                    with contextlib.suppress(ApiError, OSError):
                        await self.leases.release(lease)
                    log.info("device unlinked and credentials erased")
                    return
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)

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

    async def _watch(
        self,
        kind: str,
        field_selector: str | None,
        on_sync: Callable[[list[dict[str, Any]]], Awaitable[None] | None],
        on_event: Callable[[str, dict[str, Any]], Awaitable[None] | None],
    ) -> None:
        """Every object of ``kind`` in this namespace: a full listing (``on_sync``), then each change."""
        listing: list[dict[str, Any]] = []

        async def on_page(items: list[dict[str, Any]], first: bool, last: bool) -> None:
            if first:
                listing.clear()
            listing.extend(items)
            if last:
                await _maybe(on_sync(list(listing)))
                listing.clear()

        await follow(self.kube, kind, self.namespace, on_page, on_event, field_selector=field_selector)

    # -- events out -------------------------------------------------------------------------

    async def read_secret(self, name: str, key: str) -> bytes:
        secret = await self.kube.get("Secret", self.namespace, name)
        value = (secret.get("data") or {}).get(key)
        if value is None:
            raise KeyError(f"Secret {name} has no key {key!r}")
        return base64.b64decode(value)

    async def _on_webhook(self, kind: str, obj: dict[str, Any]) -> None:
        uid = obj["metadata"].get("uid") or obj["metadata"]["name"]
        if kind == "DELETED":
            self.webhook_status.pop(uid, None)
            await self.events.remove(uid)
            return
        try:
            webhook = Webhook.model_validate(obj)
        except ValueError as error:  # the API server validated it: only a newer schema could get here
            log.warning("Webhook %s not understood: %s", obj["metadata"]["name"], error)
            return
        await self.events.update(webhook)

    async def _on_webhook_sync(self, items: list[dict[str, Any]]) -> None:
        listed = {item["metadata"].get("uid") or item["metadata"]["name"] for item in items}
        for uid in set(self.events.endpoints) - listed:
            await self._on_webhook("DELETED", {"metadata": {"name": uid, "uid": uid}})
        for item in items:
            await self._on_webhook("MODIFIED", item)
        await self.events.retain(listed)
        self.events.subscribed.set()

    async def _report_deliveries(self) -> None:
        """This shard's entry in each Webhook's status.deliveries, written when it changed; keys re-read."""
        manager = f"{MANAGER}-{self.config.shard_index}"
        rounds = 0
        while True:
            await asyncio.sleep(self.config.event_status_seconds)
            rounds += 1
            try:
                if rounds % 6 == 0:
                    await self.events.refresh_keys()
                reports = await self.events.report()
            except PyMongoError as error:
                log.warning("webhook status not gathered: %s", error)
                continue
            for webhook, stats in reports:  # one at a time: a Webhook deleted meanwhile does not hold back the rest
                uid = webhook.metadata.uid or webhook.metadata.name
                entry = stats.to_wire()
                if self.webhook_status.get(uid) == entry:
                    continue
                patch = {
                    "apiVersion": API_VERSION,
                    "kind": Webhook.KIND,
                    "metadata": {"name": webhook.metadata.name, "namespace": self.namespace},
                    "status": {"deliveries": [entry]},
                }
                try:
                    await self.kube.apply(patch, manager, subresource="status")
                except (ApiError, OSError) as error:
                    log.warning("status of Webhook %s not written: %s", webhook.metadata.name, error)
                    continue
                self.webhook_status[uid] = entry

    async def _prune_messages(self) -> None:
        """The tenant's retention and size cap (TenantQuota), enforced by every shard (it is idempotent)."""
        assert self.store is not None
        while True:
            quota = self.tenant_quota
            try:
                removed = await self.store.prune(quota.message_retention_days, quota.max_stored_messages, self.clock())
                if removed:
                    log.info("message store: %d message(s) past retention or the size cap removed", removed)
            except PyMongoError as error:
                log.warning("message store not pruned: %s", error)
            await asyncio.sleep(self.config.prune_seconds)

    async def _poll_quota(self) -> None:
        """The namespace's TenantQuota (oldest wins), re-read periodically: it changes rarely."""
        while True:
            try:
                listing = await self.kube.list(TenantQuota.KIND, self.namespace)
                honoured = honoured_quota([quota_facts(item) for item in listing["items"]])
                self.tenant_quota = honoured.spec if honoured is not None else self.config.default_quota
            except (ApiError, OSError) as error:
                log.warning("TenantQuota not readable: %s", error)
            await asyncio.sleep(self.config.quota_refresh_seconds)

    async def _heartbeat(self) -> None:
        name = f"waso-runtime-{self.config.pod_name}"
        labels = {HEARTBEAT_LABEL: "true", SHARD_LABEL: str(self.config.shard_index)}
        while True:
            memory = read_memory(self.config.cgroup_dir)
            annotations = {MEMORY_ANNOTATION: memory_annotation(*memory)} if memory is not None else None
            try:
                self.heartbeat_ok = await self.leases.hold(name, labels, annotations) is not None
            except Exception as error:
                log.warning("heartbeat lease failed: %s", error)
                self.heartbeat_ok = False
            await asyncio.sleep(self.config.heartbeat_seconds)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.http = aiohttp.ClientSession()
        if self.config.transport == "neonize":
            # Loading neonize (Go runtime included) takes seconds: in a thread, not on the event loop.
            await asyncio.to_thread(importlib.import_module, "waso.session_runtime.neonize_transport")
            await asyncio.to_thread(importlib.import_module, "neonize.aioze.client")
        if self.store is not None:
            self._spawn(self._prepare_store(), "store")
        self.events.start(self.http)
        # status.shard is a selectable field of the CRD: the operator's one status write places a session.
        selector = f"status.shard={self.config.shard_index}"
        self._spawn(self._watch(WhatsAppSession.KIND, selector, self._on_sync, self._on_session), "session-watch")
        self._spawn(self._watch(Webhook.KIND, None, self._on_webhook_sync, self._on_webhook), "webhook-watch")
        self._spawn(self._report_deliveries(), "webhook-status")
        self._spawn(self._poll_quota(), "quota")
        self._spawn(self._heartbeat(), "heartbeat")

    async def _prepare_store(self) -> None:
        """Indexes, retried until the store answers; then the pruning loop."""
        assert self.store is not None
        backoff = Backoff(base=1.0, cap=30.0)
        while True:
            try:
                await self.store.setup()
                break
            except PyMongoError as error:
                log.warning("message store not reachable: %s", error)
                await asyncio.sleep(backoff.next())
        await self._prune_messages()

    async def _namespace_terminating(self) -> bool:
        try:
            namespace = await self.kube.get("Namespace", None, self.namespace)
        except (ApiError, OSError) as error:
            log.warning("namespace %s not readable: %s", self.namespace, error)
            return False
        return namespace["metadata"].get("deletionTimestamp") is not None

    async def stop(self) -> None:
        """Disconnect every socket, release every lease, write the final status.

        When the tenant's namespace is being deleted, the sessions die with it and nothing
        would unlink their devices later: this runtime unlinks and erases them now, within
        the pod's grace period.
        """
        if await self._namespace_terminating():
            log.info("namespace %s is being deleted: unlinking %d session(s)", self.namespace, len(self.sessions))
            for name, supervisor in self.sessions.items():
                self._start_erasing(name, supervisor)
        if self.erasing:  # bounded: the pod's grace period is longer, and a SIGKILL would end it anyway
            await asyncio.wait(list(self.erasing.values()), timeout=STOP_ERASING_SECONDS)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(s.close() for s in self.sessions.values()), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.leases.release(f"waso-runtime-{self.config.pod_name}")
        if self.http is not None:
            await self.http.close()
        if isinstance(self.limiter, RedisRateLimiter):
            await self.limiter.close()
        await self.stream_slots.close()
        await self.events.stop()
        if self.store is not None:
            await self.store.close()


def read_memory(cgroup_dir: Path) -> tuple[int, int] | None:
    """(working set, limit) bytes of the container's memory cgroup (limit 0: none); None where there is none.

    cgroup v2 (``memory.current``, ``memory.max``) or v1 (the ``memory`` hierarchy: ``memory.usage_in_bytes``,
    ``memory.limit_in_bytes``), since nodes of both kinds still run. The working set is what kubelet and
    ``kubectl top`` report: usage less the inactive file cache, which the kernel reclaims before it kills anything.
    """
    v1 = cgroup_dir / "memory"
    for directory, usage, limit_file, inactive_key in (
        (cgroup_dir, "memory.current", "memory.max", "inactive_file"),
        (v1, "memory.usage_in_bytes", "memory.limit_in_bytes", "total_inactive_file"),
    ):
        try:
            used = int((directory / usage).read_text().strip())
            limit_text = (directory / limit_file).read_text().strip()
        except (OSError, ValueError):
            continue
        inactive = 0
        with contextlib.suppress(OSError, ValueError):
            for line in (directory / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        limit = int(limit_text) if limit_text.isdigit() else 0
        # v1 says "no limit" with the largest page-aligned number, v2 with "max"
        return max(0, used - inactive), limit if limit < _NO_LIMIT_V1 else 0
    return None


_NO_LIMIT_V1 = 1 << 62


async def _maybe(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result
