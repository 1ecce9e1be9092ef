"""The operator's single serialized decision point.

kopf's indexes hold every session and quota in memory (pre-populated before any
handler runs, so a restarted operator sees the whole cluster before deciding). Watch
events only *poke* this controller; one loop then runs a full pass: admission over
the whole cluster, shard placement per tenant, tenant workloads, and the status of
every object whose desired status differs from the one stored.

The ledger keeps what this process wrote and the resourceVersion the API server
returned for it. Until the watch delivers that revision, the ledger's version of an
object is the truth for the next pass; this is what prevents double admission when
passes run faster than the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException

from waso.api.base import API_VERSION, format_timestamp
from waso.api.conditions import ConditionType, Reason, find_condition
from waso.api.quota import TenantQuotaSpec
from waso.api.session import CLEANUP_FINALIZER
from waso.kube import KubeClient
from waso.operator import metrics
from waso.operator.admission import Verdict, plan_admission
from waso.operator.cleanup import Release, release_finalizer, wants_finalizer
from waso.operator.config import OperatorConfig
from waso.operator.placement import assign_shards, replicas_needed
from waso.operator.resources import tenant_objects
from waso.operator.status import (
    DELETING,
    OperatorStatus,
    desired_quota_status,
    desired_status,
    observed_operator_status,
    observed_quota_status,
)
from waso.operator.world import SHARD_LABEL, PodFacts, QuotaFacts, SessionFacts, honoured_quota

MANAGER = "waso-operator"
REFUSALS = {Reason.CAPACITY_EXCEEDED, Reason.QUOTA_EXCEEDED, Reason.PHONE_NUMBER_CONFLICT}
log = logging.getLogger("waso.operator")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Written:
    status: OperatorStatus
    admitted: bool
    shard: int | None
    has_finalizer: bool
    resource_version: int


class Controller:
    def __init__(self, config: OperatorConfig, kube: KubeClient, clock: Clock = utc_now) -> None:
        self.config = config
        self.kube = kube
        self.clock = clock
        self.sessions: Mapping[str, Iterable[SessionFacts]] = {}
        self.quotas: Mapping[str, Iterable[QuotaFacts]] = {}
        self.pods: Mapping[str, Iterable[PodFacts]] = {}
        self.ledger: dict[str, Written] = {}
        self.quota_ledger: dict[str, tuple[dict[str, Any], int]] = {}
        self.applied_tenants: dict[str, str] = {}
        self.released: set[str] = set()
        self._wake = asyncio.Event()
        self._writes = asyncio.Semaphore(config.write_concurrency)
        self.passes = 0
        metrics.CAPACITY.set(config.max_sessions)

    def attach(
        self,
        sessions: Mapping[str, Iterable[SessionFacts]],
        quotas: Mapping[str, Iterable[QuotaFacts]],
        pods: Mapping[str, Iterable[PodFacts]],
    ) -> None:
        """Hand over kopf's live index views (the same objects on every call)."""
        self.sessions, self.quotas, self.pods = sessions, quotas, pods

    def poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.resync_seconds)
            self._wake.clear()
            await asyncio.sleep(0.02)  # let a burst of watch events land in the indexes first
            try:
                with metrics.RECONCILE.time():
                    await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile pass failed; retrying")
                await asyncio.sleep(1)
                self.poke()

    # -- one pass ---------------------------------------------------------------------------

    async def reconcile_once(self) -> None:
        self.passes += 1
        log.debug("pass %d starts", self.passes)
        now = self.clock()
        sessions = [self._effective(f) for facts in list(self.sessions.values()) for f in facts]
        present = {s.uid for s in sessions}
        for gone in set(self.ledger) - present:
            del self.ledger[gone]
        self.released &= present
        quotas_by_ns = {ns: list(qs) for ns, qs in list(self.quotas.items())}
        honoured = {ns: honoured_quota(qs) for ns, qs in quotas_by_ns.items()}
        namespaces = {s.namespace for s in sessions}
        pods = {(p.namespace, p.shard): p for facts in list(self.pods.values()) for p in facts}
        limits = {ns: self._quota_spec(honoured.get(ns)).max_sessions for ns in namespaces}

        verdicts = plan_admission(sessions, {s.uid: s.admitted for s in sessions}, limits, self.config.max_sessions)
        running = {uid: v.admitted for uid, v in verdicts.items()}

        by_tenant: dict[str, list[SessionFacts]] = defaultdict(list)
        for session in sessions:
            by_tenant[session.namespace].append(session)
        shards: dict[str, int] = {}
        tenant_writes = []
        for namespace in namespaces | set(self.applied_tenants):
            spec = self._quota_spec(honoured.get(namespace))
            tenant_shards = assign_shards(by_tenant.get(namespace, []), running, spec.sessions_per_pod)
            shards.update(tenant_shards)
            replicas = replicas_needed(tenant_shards, running)
            tenant_writes.append(self._ensure_tenant(namespace, spec, replicas, has_sessions=namespace in namespaces))

        session_writes = []
        tally: Counter[tuple[str, str]] = Counter()
        timeout = timedelta(seconds=self.config.cleanup_timeout_seconds)
        for session in sessions:
            if session.deleting:
                release = release_finalizer(session, now, timeout)
                if release is not None and session.uid not in self.released:
                    session_writes.append(self._release(session, release))
                elif release is None and session.has_finalizer:
                    # Shown while the runtime erases the credentials; no slot is held meanwhile.
                    desired = desired_status(session, DELETING, session.shard, now, self.config.max_device_id)
                    if desired.to_wire() != observed_operator_status(session):
                        session_writes.append(self._write_session(session, DELETING, desired))
                continue
            if session.uid not in verdicts:
                continue
            shard = shards.get(session.uid)
            pod = pods.get((session.namespace, shard)) if shard is not None else None
            desired = desired_status(session, verdicts[session.uid], shard, now, self.config.max_device_id, pod)
            tally[(session.namespace, desired.phase.value)] += 1
            if (
                desired.to_wire() != observed_operator_status(session)
                or shard != session.shard
                or wants_finalizer(session, shard)
            ):
                session_writes.append(self._write_session(session, verdicts[session.uid], desired))

        used = Counter(s.namespace for s in sessions if running.get(s.uid))
        quota_writes = [
            self._write_quota(q, honoured[ns], used[ns], now) for ns, qs in quotas_by_ns.items() for q in qs
        ]
        metrics.publish_sessions(tally)  # what this pass decided, published before it is written
        metrics.ADMITTED.set(sum(1 for admitted in running.values() if admitted))
        # Independent writes: tenant workloads, session and quota statuses share the write budget.
        await asyncio.gather(*tenant_writes, *session_writes, *quota_writes)
        log.debug(
            "pass %d: %d sessions, %d session writes, %d tenants",
            self.passes,
            len(sessions),
            len(session_writes),
            len(tenant_writes),
        )

    def _quota_spec(self, quota: QuotaFacts | None) -> TenantQuotaSpec:
        return quota.spec if quota is not None else self.config.default_quota

    def _effective(self, facts: SessionFacts) -> SessionFacts:
        """The session as this process last wrote it, until the watch has caught up."""
        written = self.ledger.get(facts.uid)
        if written is None:
            return facts
        if facts.resource_version >= written.resource_version:
            del self.ledger[facts.uid]
            return facts
        status = facts.status.model_copy(
            update={
                "phase": written.status.phase,
                "conditions": written.status.conditions,
                "observed_generation": written.status.observed_generation,
                "shard": written.status.shard,
                "endpoint": written.status.endpoint,
                "admitted_at": written.status.admitted_at,
            }
        )
        return replace(
            facts,
            admitted=written.admitted,
            shard=written.shard,
            has_finalizer=facts.has_finalizer or written.has_finalizer,
            status=status,
        )

    # -- writes -----------------------------------------------------------------------------

    async def _write_session(self, session: SessionFacts, verdict: Verdict, desired: OperatorStatus) -> None:
        ref = _reference("WhatsAppSession", session.namespace, session.name)
        async with self._writes:
            try:
                if (
                    not session.deleting
                    and desired.shard is not None
                    and (desired.shard != session.shard or not session.has_finalizer)
                ):
                    await self.kube.apply(_ownership(ref, desired.shard, finalizer=True), MANAGER)
                result = await self.kube.merge_patch(ref, {"status": desired.to_wire()}, MANAGER, "status")
            except ApiException as error:
                if error.status != 404:  # deleted meanwhile: nothing to do
                    log.warning("status write for %s failed: %s %s", session.key, error.status, error.reason)
                    self.poke()
                return
            metrics.STATUS_WRITES.labels("WhatsAppSession").inc()
            revision = int(result["metadata"]["resourceVersion"])
            self.ledger[session.uid] = Written(
                desired, verdict.admitted, desired.shard, desired.shard is not None, revision
            )
            await self._announce(session, verdict, result)

    async def _release(self, session: SessionFacts, release: Release) -> None:
        """Let a deleted session go: drop the credentials finalizer this operator applied."""
        ref = _reference("WhatsAppSession", session.namespace, session.name)
        async with self._writes:
            try:
                await self.kube.apply(_ownership(ref, session.shard, finalizer=False), MANAGER)
            except ApiException as error:
                if error.status != 404:
                    log.warning("finalizer of %s not released: %s %s", session.key, error.status, error.reason)
                    self.poke()
                return
        self.released.add(session.uid)
        log.info("%s: released (%s)", session.key, release.reason)
        if release.warning:
            await self._event(session, "CredentialsNotErased", release.reason, "Warning", None)

    async def _announce(self, session: SessionFacts, verdict: Verdict, result: dict[str, Any]) -> None:
        """An Event when the admission decision changed, and the refusal counter."""
        before = find_condition(session.status.conditions, ConditionType.ADMITTED)
        if before is not None and before.reason == verdict.reason:
            return
        if verdict.reason in REFUSALS:
            metrics.REFUSALS.labels(session.namespace, verdict.reason.value).inc()
        kind = "Warning" if verdict.reason in REFUSALS else "Normal"
        await self._event(session, verdict.reason.value, verdict.message, kind, result["metadata"]["resourceVersion"])

    async def _event(
        self, session: SessionFacts, reason: str, message: str, kind: str, resource_version: str | None
    ) -> None:
        now = format_timestamp(self.clock())
        involved = {
            "apiVersion": API_VERSION,
            "kind": "WhatsAppSession",
            "name": session.name,
            "namespace": session.namespace,
            "uid": session.uid,
        }
        if resource_version is not None:
            involved["resourceVersion"] = resource_version
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{session.name}.", "namespace": session.namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": MANAGER},
            "reportingComponent": "waso.dev/operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.kube.create(event, MANAGER)
        except ApiException as error:
            log.warning("event for %s not recorded: %s %s", session.key, error.status, error.reason)

    async def _write_quota(self, quota: QuotaFacts, honoured: QuotaFacts | None, used: int, now: datetime) -> None:
        desired = desired_quota_status(quota, honoured, used, now)
        pending = self.quota_ledger.get(quota.uid)
        if pending is not None and quota.resource_version < pending[1]:
            current = pending[0]
        else:
            self.quota_ledger.pop(quota.uid, None)
            current = observed_quota_status(quota)
        if _same_status(desired, current):
            return
        ref = _reference("TenantQuota", quota.namespace, quota.name)
        async with self._writes:
            try:
                result = await self.kube.merge_patch(ref, {"status": desired}, MANAGER, "status")
            except ApiException as error:
                if error.status != 404:
                    log.warning("status write for quota %s/%s failed: %s", quota.namespace, quota.name, error.reason)
                    self.poke()
                return
        metrics.STATUS_WRITES.labels("TenantQuota").inc()
        self.quota_ledger[quota.uid] = (desired, int(result["metadata"]["resourceVersion"]))

    async def _ensure_tenant(self, namespace: str, quota: TenantQuotaSpec, replicas: int, has_sessions: bool) -> None:
        """Apply the tenant's workload objects when they differ from what this process last applied."""
        objects = tenant_objects(namespace, quota, self.config, replicas)
        fingerprint = json.dumps(objects, sort_keys=True)
        if self.applied_tenants.get(namespace) == fingerprint:
            return
        async with self._writes:
            try:
                for obj in objects:
                    await self.kube.apply(obj, MANAGER)
            except ApiException as error:
                self.applied_tenants.pop(namespace, None)
                if not has_sessions and error.status in (403, 404):
                    return  # the namespace is gone or terminating: nothing left to scale down
                log.warning("tenant %s workload not applied: %s %s", namespace, error.status, error.reason)
                self.poke()
                return
        self.applied_tenants[namespace] = fingerprint
        log.info("tenant %s: %d session pod(s)", namespace, replicas)


def _reference(kind: str, namespace: str, name: str) -> dict[str, Any]:
    """The minimal object that names a waso resource for a patch or an apply."""
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"namespace": namespace, "name": name}}


def _ownership(ref: dict[str, Any], shard: int | None, *, finalizer: bool) -> dict[str, Any]:
    """The metadata this operator owns on a session (server-side apply): shard label and finalizer."""
    metadata: dict[str, Any] = {**ref["metadata"], "finalizers": [CLEANUP_FINALIZER] if finalizer else []}
    if shard is not None:
        metadata["labels"] = {SHARD_LABEL: str(shard)}
    return {"apiVersion": ref["apiVersion"], "kind": ref["kind"], "metadata": metadata}


def _same_status(desired: dict[str, Any], current: dict[str, Any]) -> bool:
    """Equal once fields set to None (absent) are dropped on both sides."""
    return {k: v for k, v in desired.items() if v is not None} == {k: v for k, v in current.items() if v is not None}
