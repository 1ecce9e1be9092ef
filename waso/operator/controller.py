"""The operator's single serialized decision point.

kopf's indexes hold every session and quota in memory (pre-populated before any
handler runs, so a restarted operator sees the whole cluster before deciding). Watch
events only *poke* this controller; one loop then runs a full pass: admission over
the whole cluster, shard placement per tenant, tenant workloads, and the status of
every object whose desired status differs from the one stored.

Statuses go through one StatusWriter per kind, which remembers what this process wrote
and the resourceVersion the API server returned for it. Until the watch delivers that
revision, the written status is the truth for the next pass; this is what prevents
double admission when passes run faster than the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from waso.api.base import API_VERSION, format_timestamp
from waso.api.conditions import ConditionType, Reason, find_condition, is_true
from waso.api.quota import TenantQuota, TenantQuotaSpec
from waso.api.session import CLEANUP_FINALIZER, RepairStatus, RuntimeState, WhatsAppSession, WhatsAppSessionStatus
from waso.api.tenancy import Heartbeat, MemoryReport, QuotaFacts, honoured_quota
from waso.kube import ApiError, KubeClient, reference
from waso.logs import about
from waso.operator import metrics
from waso.operator.admission import Verdict
from waso.operator.cleanup import Release, release_finalizer, wants_finalizer
from waso.operator.config import OperatorConfig
from waso.operator.events import Decision, TenantEvent, decision_events, lifecycle_events
from waso.operator.eviction import EvictionPolicy, Slots, admit, admit_new, after_admitting, slots_left
from waso.operator.health import device_health
from waso.operator.leadership import Leadership
from waso.operator.placement import assign_shards, replicas_needed
from waso.operator.repair import (
    RepairCandidate,
    RepairPlan,
    RepairPolicy,
    begin,
    pending_request,
    plan_repairs,
    rollback,
    settle,
)
from waso.operator.resources import review_binding, review_role, tenant_objects
from waso.operator.status import (
    DELETING,
    SettledStatuses,
    StatusInputs,
    Summary,
    desired_quota_status,
    desired_status,
    next_silence,
    operator_part,
    silent_shards,
    summary,
)
from waso.operator.world import PodFacts, SessionFacts
from waso.status_writer import Outcome, StatusWriter
from waso.tasks import Bounded, first_of

MANAGER = "waso-operator"
NO_REPAIRS = RepairStatus()
Write = Callable[[], Awaitable[Any]]
"""A write a pass decided, made once the pass has decided them all."""
REVIEWS = "-"
"""The key of the runtimes' review access among the tenants' workload tasks (no namespace is named so)."""
WRITES_AHEAD = 4
"""Writes a pass has decided and not yet made, per write slot: each holds its desired status until written."""
MAX_PAUSE = 1.0
"""Seconds between passes at most, after a long one."""
REFUSALS = {Reason.CAPACITY_EXCEEDED, Reason.QUOTA_EXCEEDED, Reason.PHONE_NUMBER_CONFLICT}
log = logging.getLogger("waso.operator")

Clock = Callable[[], datetime]


class Deposed(Exception):
    """This replica stopped leading during a pass: its remaining writes are not made."""


def utc_now() -> datetime:
    return datetime.now(UTC)


OPERATOR_NAMESPACE_ENV = "WASO_OPERATOR_NAMESPACE"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def own_namespace() -> str:
    """The operator's namespace: where it records Events a tenant namespace refuses (it is being deleted), and
    the name of its runtimes' review binding. The chart sets WASO_OPERATOR_NAMESPACE (downward API)."""
    if namespace := os.environ.get(OPERATOR_NAMESPACE_ENV):
        return namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


@dataclass(frozen=True)
class Retry:
    """A tenant whose workload was refused: the same objects are not tried again before ``at``."""

    attempts: int
    at: datetime
    fingerprint: str = ""


@dataclass(frozen=True)
class Announcement:
    """A session whose admission decision this pass changed (and wrote), for the pass's Events."""

    session: SessionFacts
    decision: Decision
    resource_version: str


def retry_after(previous: Retry | None, now: datetime, fingerprint: str = "", cap: float = 60.0) -> Retry:
    attempts = (previous.attempts if previous else 0) + 1
    return Retry(attempts, now + timedelta(seconds=min(cap, 2 ** (attempts - 1))), fingerprint)


class Controller:
    def __init__(self, config: OperatorConfig, kube: KubeClient, clock: Clock = utc_now) -> None:
        self.config = config
        self.kube = kube
        self.clock = clock
        self.sessions: Mapping[str, Iterable[SessionFacts]] = {}
        self.quotas: Mapping[str, Iterable[QuotaFacts]] = {}
        self.pods: Mapping[str, Iterable[PodFacts]] = {}
        self.access: Mapping[str, Iterable[bool]] = {}
        self.heartbeats: Mapping[str, Iterable[Heartbeat]] = {}
        self.session_status = StatusWriter(
            kube, WhatsAppSession.KIND, MANAGER, on_write=metrics.STATUS_WRITES.labels(WhatsAppSession.KIND).inc
        )
        self.quota_status = StatusWriter(
            kube, TenantQuota.KIND, MANAGER, on_write=metrics.STATUS_WRITES.labels(TenantQuota.KIND).inc
        )
        self.applied_tenants: dict[str, tuple[TenantQuotaSpec, int, bool]] = {}
        """What each tenant's workload objects were last applied for: its quota, pods, whether it has sessions."""
        self.applied_reviews: set[str] | None = None
        self.tenant_retries: dict[str, Retry] = {}
        self.released: set[str] = set()
        self._quiet_repairs: dict[str, SessionFacts] = {}
        """Running sessions whose facts (this very object) called for no repair and changed none at the last pass."""
        self.event_namespace = own_namespace()
        self._retry_timer: asyncio.TimerHandle | None = None
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._silent: set[tuple[str, int]] = set()
        self._unconfirmed: list[tuple[StatusWriter, str, str, int]] = []
        """Changes observed while this process's status write of the same object was in flight."""
        """The shards the last pass saw silent."""
        self._background: set[asyncio.Task[None]] = set()
        self._tenant_work: dict[str, tuple[object, asyncio.Task[None]]] = {}
        """Per tenant (and REVIEWS): what its workload task in flight applies, and the task."""
        self._tenant_next: dict[str, tuple[object, Write]] = {}
        """Per tenant, the workload to apply once the one in flight is done (it went out of date meanwhile)."""
        self._wake = asyncio.Event()
        self._whole = True
        """Whether the next pass goes over the whole cluster: something other than new sessions changed."""
        self._new: dict[str, str] = {}
        """Sessions created since the last pass over the whole cluster (uid -> namespace), to decide alone."""
        self._slots: Slots | None = None
        """What the last pass over the whole cluster, and the new sessions admitted alone since, left of the slots."""
        self._running: dict[str, bool] = {}
        """By uid, whether the session holds a slot: as the last pass decided."""
        self._tenants: set[str] = set()
        """The namespaces with sessions, as the last pass saw them."""
        self._rest_until = 0.0
        self._writes = asyncio.Semaphore(config.write_concurrency)
        self._workloads = asyncio.Semaphore(max(1, config.write_concurrency // 4))
        """Tenants whose workload is applied at once: a thousand new tenants must not hold back a decision."""
        self.passes = 0
        self.computing_seconds = 0.0
        """How long the last pass took to decide, without its writes."""
        self.may_write: Callable[[], bool] = lambda: True
        """Whether this replica still leads, checked before each write (``run`` wires it to the election)."""
        metrics.CAPACITY.set(config.max_sessions)
        settings = config.eviction
        self._eviction = EvictionPolicy(
            enabled=settings.enabled,
            min_idle=timedelta(seconds=settings.min_idle_seconds),
            order=settings.order,
            flag_parked_after=timedelta(seconds=settings.flag_parked_after_seconds),
            memory_fraction=settings.memory_pressure_fraction,
            memory_resume_fraction=settings.memory_resume_fraction,
            memory_settle=timedelta(seconds=settings.memory_settle_seconds),
        )
        self.settled = SettledStatuses(self._eviction.flag_parked_after)

    def attach(
        self,
        sessions: Mapping[str, Iterable[SessionFacts]],
        quotas: Mapping[str, Iterable[QuotaFacts]],
        pods: Mapping[str, Iterable[PodFacts]],
        access: Mapping[str, Iterable[bool]],
        heartbeats: Mapping[str, Iterable[Heartbeat]],
    ) -> None:
        """Hand over the informers' views, by namespace: kept current, and complete before ``run`` is started."""
        self.sessions, self.quotas, self.pods, self.access = sessions, quotas, pods, access
        self.heartbeats = heartbeats

    def under_pressure(self, report: MemoryReport) -> bool:
        """Whether a pod's memory report calls for a pass now (the resync notices a pressure that ended)."""
        return report.fraction >= self._eviction.memory_fraction

    def poke(self) -> None:
        """A pass over the whole cluster, soon."""
        self._whole = True
        self._wake.set()

    def session_changed(self, before: SessionFacts | None, current: SessionFacts | None) -> bool:
        """Whether a session's change needs no pass over the whole cluster (else the informer pokes one).

        This process's own status write coming back through the watch was decided on already (half the passes of
        a burst). A new session wakes a pass of its own, which decides it alone where the slots allow
        (``admit_new``): with 10,000 sessions, milliseconds instead of half a second."""
        if current is None:
            return False
        if not self.may_write():
            return False  # a standby notes nothing: it starts its term with a pass over the whole cluster
        if before is None and current.admitted_condition is None and not current.admitted:
            self._new[current.uid] = current.namespace
            self._wake.set()
            return True
        return self._own_write(self.session_status, current.namespace, current.name, current.resource_version)

    def quota_changed(self, _before: QuotaFacts | None, current: QuotaFacts | None) -> bool:
        """Whether a quota's change is this process's own status write coming back."""
        if current is None:
            return False
        return self._own_write(self.quota_status, current.namespace, current.name, current.resource_version)

    def _own_write(self, writer: StatusWriter, namespace: str, name: str, resource_version: int) -> bool:
        own = writer.own(namespace, name, resource_version)
        if own is None:  # the watch was faster than the write's answer: decided once the pass's writes are done
            self._unconfirmed.append((writer, namespace, name, resource_version))
            return True
        return own

    @contextlib.asynccontextmanager
    async def _write_slot(self) -> AsyncIterator[None]:
        """One of ``write_concurrency`` writes at once; none once this replica stopped leading."""
        async with self._writes:
            if not self.may_write():
                raise Deposed("no longer the leader: write not made")
            yield

    def poke_later(self, delay: float) -> None:
        """Another pass after ``delay`` seconds (failed writes), without spinning meanwhile."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._retry_timer is not None:
            if self._retry_timer.when() <= due:
                return  # an earlier pass is due anyway
            self._retry_timer.cancel()
        self._retry_timer = loop.call_at(due, self._poke_now)

    def _watch_heartbeats(self, beats: list[Heartbeat], now: datetime) -> None:
        """A pass when the next shard falls silent, not at the next resync; a check of the heartbeats alone until
        then (a runtime that renews in time, as most do, costs no pass)."""
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        at = next_silence(beats, now)
        if at is not None:
            delay = (at - now).total_seconds() + 0.1
            self._heartbeat_timer = asyncio.get_running_loop().call_later(delay, self._check_heartbeats)

    def _check_heartbeats(self) -> None:
        self._heartbeat_timer = None
        now = self.clock()
        beats = [beat for found in list(self.heartbeats.values()) for beat in found]
        if set(silent_shards(beats, now)) != self._silent:
            self.poke()
        else:
            self._watch_heartbeats(beats, now)

    def _poke_now(self) -> None:
        self._retry_timer = None  # fired: the next poke_later schedules again
        self.poke()

    async def run(self, leadership: Leadership | None = None) -> None:
        """Passes, on every poke and at least every resync; with ``leadership``, only while leading."""
        try:
            await self._passes(leadership)
        finally:
            self._stop_tenant_work()

    async def _passes(self, leadership: Leadership | None) -> None:
        if leadership is not None:
            self.may_write = leadership.holds
        while True:
            if leadership is not None and not leadership.leading.is_set():
                await leadership.leading.wait()
                self.poke()  # a new term starts with a pass over everything the indexes hold
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.resync_seconds)
            except TimeoutError:
                self._whole = True  # the resync: the clock moves decisions on too (repairs, parked sessions)
            self._wake.clear()
            if leadership is not None and not leadership.holds():
                continue  # deposed while waiting: not one more pass
            await asyncio.sleep(0.02)  # let a burst of watch events land in the indexes first
            try:
                with metrics.RECONCILE.time():
                    if leadership is None:
                        await self._pass()
                    else:
                        await first_of(self._pass(), leadership.deposed.wait())
                        if leadership.deposed.is_set():
                            log.warning("pass stopped: no longer the leader")
                            self._stop_tenant_work()
            except asyncio.CancelledError:
                raise
            except Deposed as stopped:
                log.warning("pass stopped: %s", stopped)
                self._stop_tenant_work()
            except Exception:
                log.exception("reconcile pass failed; retrying")
                await asyncio.sleep(1)
                self.poke()

    async def _pass(self) -> None:
        """New sessions alone where they can be, else a pass over the whole cluster."""
        if not self._whole and (not self._new or await self.admit_new_sessions()):
            return
        # Changes that keep coming (runtimes of a thousand tenants reporting) would otherwise make passes over the
        # whole cluster back to back: a pause of half the last one's own computing (at most a second) bounds the
        # cost to two thirds of a core. New sessions decided alone do not wait for it.
        loop = asyncio.get_running_loop()
        if (rest := self._rest_until - loop.time()) > 0:
            await asyncio.sleep(rest)
        await self.reconcile_once()
        self._rest_until = loop.time() + min(MAX_PAUSE, self.computing_seconds / 2)

    def _start_tenant_work(self, key: str, wanted: object, write: Write) -> None:
        """Apply a tenant's workload (or the review access) beside the passes; one task per tenant at a time."""
        running = self._tenant_work.get(key)
        if running is not None:
            if running[0] != wanted:
                self._tenant_next[key] = (wanted, write)  # out of date: applied again once it is done
            else:
                self._tenant_next.pop(key, None)
            return
        task = asyncio.create_task(self._tenant_task(key, write), name=f"waso-workload-{key}")
        self._tenant_work[key] = (wanted, task)

    async def _tenant_task(self, key: str, write: Write) -> None:
        try:
            async with self._workloads:  # a few at once: status writes keep most of the write slots
                await write()
        except Deposed as stopped:
            log.warning("workload not applied: %s", stopped, extra=about(key))
        except Exception:
            log.exception("workload not applied", extra=about(key))
            self.poke_later(1)
        finally:
            self._tenant_work.pop(key, None)
            queued = self._tenant_next.pop(key, None)
            if queued is not None and self.may_write():
                self._start_tenant_work(key, *queued)

    def _stop_tenant_work(self) -> None:
        """No longer the leader: the workloads in flight stop (the next leader applies what is still wanted)."""
        self._tenant_next.clear()
        for _wanted, task in self._tenant_work.values():
            task.cancel()

    # -- one pass ---------------------------------------------------------------------------

    async def reconcile_once(self) -> None:
        """A pass over the whole cluster."""
        self.passes += 1
        started = time.thread_time()
        log.debug("pass %d starts", self.passes)
        now = self.clock()
        # Everything changed until now is in this pass (no await before the sessions are read).
        self._wake.clear()
        self._whole, self._slots = False, None
        metrics.PASSES.labels("cluster").inc()
        self._new.clear()
        sessions = [self._effective(f) for facts in list(self.sessions.values()) for f in facts]
        present = {s.uid for s in sessions}
        self.session_status.retain(lambda: {(s.namespace, s.name) for s in sessions})
        self.settled.retain(present)
        self.released &= present
        quotas_by_ns = {ns: list(qs) for ns, qs in list(self.quotas.items())}
        honoured = {ns: honoured_quota(qs) for ns, qs in quotas_by_ns.items()}
        namespaces = {s.namespace for s in sessions}
        pods = {(p.namespace, p.shard): p for facts in list(self.pods.values()) for p in facts}
        limits = {ns: self._quota_spec(honoured.get(ns)).max_sessions for ns in namespaces}

        beats = [beat for found in list(self.heartbeats.values()) for beat in found]
        memory = [beat.memory for beat in beats if beat.memory is not None]
        silent = silent_shards(beats, now)
        self._silent = set(silent)
        self._watch_heartbeats(beats, now)
        admitted_now = {s.uid: s.admitted for s in sessions}
        admission = admit(sessions, admitted_now, limits, self.config.max_sessions, self._eviction, now, memory)
        verdicts = admission.verdicts
        for eviction in admission.evictions:
            victim, beneficiary = eviction.victim, eviction.beneficiary
            log.info(
                "evicted (%s, idle since %s)%s", eviction.reason, format_timestamp(eviction.idle_since),
                f" for {beneficiary.key}" if beneficiary else "", extra=about(victim.namespace, victim.name),
            )  # fmt: skip
        running = {uid: v.admitted for uid, v in verdicts.items()}
        self._running = running
        by_tenant: dict[str, list[SessionFacts]] = defaultdict(list)
        for session in sessions:
            by_tenant[session.namespace].append(session)
        shards: dict[str, int] = {}
        tenant_writes: list[tuple[str, object, Write]] = []
        held = {ns for ns, finalized in list(self.access.items()) if any(finalized)}
        for namespace in namespaces | set(self.applied_tenants) | held | set(self.tenant_retries):
            spec = self._quota_spec(honoured.get(namespace))
            shards.update(self._place(namespace, by_tenant.get(namespace, []), spec, tenant_writes, now))
        self._tenants = namespaces
        self._review_write(tenant_writes)

        repairs, repair_plan = self._plan_repairs(sessions, running, honoured, now)
        slots = slots_left(sessions, admission, memory, self._eviction)
        # Decisions first: session and quota statuses are what people and tools wait on (`kubectl wait`). A pass
        # waits for them, so the next one never races a status write still in flight. Tenant workloads (seven
        # objects each; a thousand new tenants take a minute) are applied beside the passes, one task per tenant.
        async with Bounded(WRITES_AHEAD * self.config.write_concurrency) as writes:
            tally: Counter[tuple[str, ...]] = Counter()
            unhealthy: Counter[tuple[str, ...]] = Counter()
            devices: Counter[tuple[str, ...]] = Counter()
            parked: Counter[tuple[str, ...]] = Counter()
            parked_oldest: dict[tuple[str, ...], float] = {}
            timeout = timedelta(seconds=self.config.cleanup_timeout_seconds)
            for index, session in enumerate(sessions):
                if index % 1000 == 999:
                    await asyncio.sleep(
                        0
                    )  # tens of thousands of sessions: let the watches and the election run between
                if session.deleting:
                    release = release_finalizer(session, now, timeout)
                    if release is not None and session.uid not in self.released:
                        await writes.start(partial(self._release, session, release))
                    elif release is None and session.has_finalizer:
                        # Shown while the runtime erases the credentials; no slot is held meanwhile.
                        shown = desired_status(session, DELETING, session.shard, now, self.config.max_device_id)
                        if shown != operator_part(session.status):
                            await writes.start(partial(self._write_session, session, DELETING, shown))
                    continue
                if session.uid not in verdicts:
                    continue
                shard = shards.get(session.uid)
                inputs = StatusInputs(
                    verdicts[session.uid],
                    shard,
                    pods.get((session.namespace, shard)) if shard is not None else None,
                    repairs.get(session.uid),
                    repair_plan.stalled.get(session.uid),
                    repair_plan.waiting.get(session.uid),
                    admission.records.get(session.uid),
                    silent.get((session.namespace, shard)) if shard is not None else None,
                )
                seen = await self._decide_status(writes, session, inputs, now)
                tally[(session.namespace, seen.phase)] += 1
                if seen.unhealthy is not None:
                    unhealthy[(session.namespace, seen.unhealthy)] += 1
                runtime = session.runtime
                if runtime is not None and runtime.state == RuntimeState.CONNECTED and runtime.device_id is not None:
                    devices[(metrics.device_range(runtime.device_id),)] += 1
                if seen.parked_since is not None:
                    parked[(session.namespace, verdicts[session.uid].reason.value)] += 1
                    age = (now - seen.parked_since).total_seconds()
                    parked_oldest[(session.namespace,)] = max(parked_oldest.get((session.namespace,), 0.0), age)

            for ns, found in quotas_by_ns.items():
                for quota in found:
                    used = slots.used_by_tenant.get(ns, 0)
                    await writes.start(partial(self._write_quota, quota, honoured[ns], used, now))
            metrics.publish(metrics.SESSIONS, tally)  # what this pass decided, before the last of it is written
            metrics.publish(metrics.HEALTH_FAILURES, unhealthy)
            metrics.publish(metrics.DEVICE_NUMBERS, devices)
            metrics.publish(metrics.PARKED, parked)
            metrics.publish(metrics.PARKED_AGE, parked_oldest)
            metrics.ADMITTED.set(slots.used)
            self.computing_seconds = time.thread_time() - started  # this thread's: not the writes' waiting
        self._slots = slots  # once its writes are made: a pass that fails leaves none
        self._after_writes(writes, tenant_writes)
        log.debug(
            "pass %d: %d sessions, %.3f CPU s deciding, %d session writes, %d tenants",
            self.passes,
            len(sessions),
            self.computing_seconds,
            writes.started,
            len(tenant_writes),
        )

    async def admit_new_sessions(self) -> bool:
        """Decide the sessions created since the last pass over the whole cluster without going over the others,
        where the slots that pass left allow it (``admit_new``): their verdict, shard and status, their tenant's
        workload and quota status, as a pass over the whole cluster would. False: such a pass is needed."""
        started = time.thread_time()
        now = self.clock()
        if self._slots is None:
            return False
        tenants = {ns: [self._effective(f) for f in self.sessions.get(ns, ())] for ns in set(self._new.values())}
        new = [s for found in tenants.values() for s in found if s.uid in self._new]
        honoured = {ns: honoured_quota(list(self.quotas.get(ns, ()))) for ns in tenants}
        specs = {ns: self._quota_spec(honoured[ns]) for ns in tenants}
        verdicts = admit_new(new, self._slots, {ns: spec.max_sessions for ns, spec in specs.items()},
                             self.config.max_sessions)  # fmt: skip
        if verdicts is None or len(new) != len(self._new):
            return False
        self._new.clear()
        self._slots = slots = after_admitting(self._slots, new)
        metrics.PASSES.labels("new").inc()
        self._running.update({uid: verdict.admitted for uid, verdict in verdicts.items()})
        self._tenants |= set(tenants)
        tenant_writes: list[tuple[str, object, Write]] = []
        async with Bounded(WRITES_AHEAD * self.config.write_concurrency) as writes:
            for namespace, found in tenants.items():
                spec = specs[namespace]
                shards = self._place(namespace, found, spec, tenant_writes, now)
                pods = {pod.shard: pod for pod in self.pods.get(namespace, ())}
                silent = silent_shards(self.heartbeats.get(namespace, ()), now)
                for session in (s for s in found if s.uid in verdicts):
                    shard = shards.get(session.uid)
                    pod = pods.get(shard) if shard is not None else None
                    beat = silent.get((namespace, shard)) if shard is not None else None
                    inputs = StatusInputs(verdicts[session.uid], shard, pod, silent=beat)
                    seen = await self._decide_status(writes, session, inputs, now)
                    metrics.add(metrics.SESSIONS, (namespace, seen.phase))
                for quota in self.quotas.get(namespace, ()):
                    used = slots.used_by_tenant.get(namespace, 0)
                    await writes.start(partial(self._write_quota, quota, honoured[namespace], used, now))
            self._review_write(tenant_writes)
            metrics.ADMITTED.set(slots.used)
            self.computing_seconds = time.thread_time() - started
        self._after_writes(writes, tenant_writes)
        log.debug("%d new session(s) decided alone, %.3f CPU s deciding", len(new), self.computing_seconds)
        return True

    def _place(
        self,
        namespace: str,
        tenant_sessions: list[SessionFacts],
        spec: TenantQuotaSpec,
        tenant_writes: list[tuple[str, object, Write]],
        now: datetime,
    ) -> dict[str, int]:
        """A tenant's shards; its workload is applied (beside the pass) where it differs from what was."""
        running = self._running
        shards = assign_shards(tenant_sessions, running, spec.sessions_per_pod)
        # A deleted session's shard runs until its runtime has unlinked the device (suspended or not).
        served = {uid: True for uid in shards if running.get(uid)} | {
            s.uid: True for s in tenant_sessions if _awaits_erasure(s)
        }
        wanted = (spec, replicas_needed(shards, served), bool(tenant_sessions))
        if self.applied_tenants.get(namespace) != wanted:
            tenant_writes.append((namespace, wanted, partial(self._ensure_tenant, namespace, *wanted, now)))
        return shards

    def _review_write(self, tenant_writes: list[tuple[str, object, Write]]) -> None:
        if self.applied_reviews != self._tenants:
            tenants = set(self._tenants)
            tenant_writes.append((REVIEWS, tenants, partial(self._ensure_reviews, tenants)))

    async def _decide_status(
        self, writes: Bounded, session: SessionFacts, inputs: StatusInputs, now: datetime
    ) -> Summary:
        """The session's desired status, written (started) where the API server holds another; its summary."""
        settled = self.settled.get(session, inputs, now)
        if settled is not None:
            return settled
        desired = self._desired(session, inputs, now)
        shard = inputs.shard
        if desired != operator_part(session.status) or shard != session.shard or wants_finalizer(session, shard):
            await writes.start(partial(self._write_session, session, inputs.verdict, desired))
        else:
            self.settled.put(session, inputs, desired, now)
        return summary(desired)

    def _after_writes(self, writes: Bounded, tenant_writes: list[tuple[str, object, Write]]) -> None:
        """Once a pass's status writes are made: changes seen meanwhile, workloads, Events, failed writes."""
        results = writes.results
        unconfirmed, self._unconfirmed = self._unconfirmed, []
        if not all(writer.own(namespace, name, revision) for writer, namespace, name, revision in unconfirmed):
            self.poke()  # someone else changed an object while this pass wrote it
        for key, target, write in tenant_writes:
            self._start_tenant_work(key, target, write)
        self._record_decisions([r for r in results if isinstance(r, Announcement)])
        for failure in (r for r in results if isinstance(r, BaseException)):
            if isinstance(failure, asyncio.CancelledError):
                raise failure
            log.error("a write of pass %d failed", self.passes, exc_info=failure)
            self.poke_later(1)

    def _plan_repairs(
        self,
        sessions: list[SessionFacts],
        running: Mapping[str, bool],
        honoured: Mapping[str, QuotaFacts | None],
        now: datetime,
    ) -> tuple[dict[str, RepairStatus], RepairPlan]:
        """Repairs finished (folded into the status), and the ones to start now across the cluster."""
        settings = self.config.repair
        policy = RepairPolicy(
            enabled=settings.enabled,
            max_in_flight=settings.max_in_flight,
            cooldown=timedelta(seconds=settings.cooldown_seconds),
            loop_limit=settings.loop_limit,
            loop_window=timedelta(seconds=settings.loop_window_seconds),
            keep_backups=settings.keep_backups,
        )
        changed: dict[str, RepairStatus] = {}
        candidates = []
        quiet, self._quiet_repairs = self._quiet_repairs, {}
        for session in sessions:
            if session.deleting or not running.get(session.uid):
                continue
            if quiet.get(session.uid) is session:  # the same facts as last pass, and nothing to plan for them then
                self._quiet_repairs[session.uid] = session
                continue
            before = session.status.repairs or NO_REPAIRS
            current = settle(before, session.runtime, policy)
            current, refused = rollback(current, session.rollback_request, now)
            if refused is not None:
                self._spawn_event(session, "RollbackRefused", f"tenant {session.namespace}: {refused}", "Warning")
            if current != before:
                changed[session.uid] = current
            health = device_health(session.runtime, self.config.max_device_id)
            # Until the cleared request is stored, its slot is still taken: writes of one pass
            # land in any order, and the API must never show more than the limit.
            in_flight = before.requested is not None or current.requested is not None
            manual = pending_request(session.repair_request, current)
            if health.healthy is not False and not in_flight and manual is None:
                if current == before:
                    self._quiet_repairs[session.uid] = session
                continue  # nothing to plan for it (most sessions): no candidate to build
            unhealthy = find_condition(session.status.conditions, ConditionType.DEVICE_HEALTHY)
            candidates.append(
                RepairCandidate(
                    uid=session.uid,
                    namespace=session.namespace,
                    name=session.name,
                    health=health.reason if health.healthy is False else None,
                    tenant_auto_repair=self._quota_spec(honoured.get(session.namespace)).auto_repair,
                    in_flight=in_flight,
                    repair_starts=current.starts or (),
                    acted_at=current.acted_at,
                    manual_request=manual,
                    needed_since=unhealthy.last_transition_time if unhealthy and unhealthy.status == "False" else None,
                )
            )
        plan = plan_repairs(candidates, policy, now)
        by_uid = {s.uid: s for s in sessions}
        for start in plan.start:
            current = changed.get(start.uid) or by_uid[start.uid].status.repairs or RepairStatus()
            changed[start.uid] = begin(current, start, now)
            metrics.REPAIRS.labels(start.namespace, start.reason).inc()
            log.info("repair started (%s)", start.reason, extra=about(start.namespace, start.name))
        if plan.wake_at is not None:  # a cooldown ends: repair then, not at the next resync
            self.poke_later(max(0.0, (plan.wake_at - now).total_seconds()))
        return changed, plan

    def _spawn_event(self, session: SessionFacts, reason: str, message: str, kind: str) -> None:
        """An Event recorded beside the pass (a decision that writes no status of its own)."""
        self._spawn(self._event(session, reason, message, kind, None))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _desired(self, session: SessionFacts, inputs: StatusInputs, now: datetime) -> WhatsAppSessionStatus:
        return desired_status(
            session,
            inputs.verdict,
            inputs.shard,
            now,
            self.config.max_device_id,
            inputs.pod,
            inputs.repairs,
            inputs.repair_stalled,
            inputs.repair_waiting,
            inputs.eviction,
            self._eviction.flag_parked_after,
            inputs.silent,
        )

    def _quota_spec(self, quota: QuotaFacts | None) -> TenantQuotaSpec:
        return quota.spec if quota is not None else self.config.default_quota

    def _effective(self, facts: SessionFacts) -> SessionFacts:
        """The session as this process last wrote it, until the watch has caught up."""
        written = self.session_status.pending(facts.namespace, facts.name, facts.resource_version)
        if written is None:  # the watch has delivered everything this process wrote (the usual case)
            return facts
        status = WhatsAppSessionStatus.model_validate({**written, "runtime": facts.status.runtime})
        return replace(
            facts,
            admitted=is_true(status.conditions, ConditionType.ADMITTED),
            shard=facts.shard if facts.shard is not None else status.shard,
            has_finalizer=facts.has_finalizer or (status.shard is not None and not facts.deleting),
            status=status,
        )

    # -- writes -----------------------------------------------------------------------------

    async def _write_session(
        self, session: SessionFacts, verdict: Verdict, desired: WhatsAppSessionStatus
    ) -> Announcement | None:
        async with self._write_slot():
            if wants_finalizer(session, desired.shard):
                # Where the chart's admission policy did not set it at creation: before the shard is in the status,
                # since the shard's runtime serves the session from then on and may store credentials.
                try:
                    await self.kube.apply(_credentials_finalizer(session), MANAGER)
                except (ApiError, OSError) as error:
                    if not isinstance(error, ApiError) or error.status != 404:  # 404: deleted meanwhile
                        log.warning("finalizer not set: %s", error, extra=about(session.namespace, session.name))
                        self.poke_later(1)
                    return None
            observed = operator_part(session.status).to_wire()
            result = await self.session_status.write(
                session.namespace, session.name, desired.to_wire(), observed, session.resource_version
            )
        if result.outcome == Outcome.FAILED:
            self.poke_later(1)
        if result.outcome != Outcome.WRITTEN:
            return None
        for event in lifecycle_events(session.namespace, session.status.conditions, desired.conditions):
            self._spawn_event(session, event.reason, event.message, "Warning" if event.warning else "Normal")
        return self._announce(session, verdict, desired, str(result.resource_version))

    async def _release(self, session: SessionFacts, release: Release) -> None:
        """Let a deleted session go: drop the credentials finalizer (set at creation by the chart's admission
        policy, or by this operator), where it still is: a JSON patch that fails if the finalizers changed."""
        ref = reference(WhatsAppSession.KIND, session.namespace, session.name)
        position = f"/metadata/finalizers/{session.finalizers.index(CLEANUP_FINALIZER)}"
        operations = [{"op": "test", "path": position, "value": CLEANUP_FINALIZER}, {"op": "remove", "path": position}]
        async with self._write_slot():
            try:
                await self.kube.json_patch(ref, operations, MANAGER)
            except (ApiError, OSError) as error:
                if not isinstance(error, ApiError) or error.status != 404:  # 422: the finalizers moved, next pass
                    log.warning("finalizer not released: %s", error, extra=about(session.namespace, session.name))
                    self.poke_later(1)
                return
        self.released.add(session.uid)
        log.info("released (%s)", release.reason, extra=about(session.namespace, session.name))
        if release.warning:
            await self._event(session, "CredentialsNotErased", release.reason, "Warning", None)

    def _announce(
        self, session: SessionFacts, verdict: Verdict, desired: WhatsAppSessionStatus, resource_version: str
    ) -> Announcement | None:
        """The refusal, eviction and resumption counters when the admission decision changed, and its Event."""
        before = session.admitted_condition
        if before is not None and before.reason == verdict.reason:
            return None
        if verdict.reason in REFUSALS:
            metrics.REFUSALS.labels(session.namespace, verdict.reason.value).inc()
        eviction = desired.eviction.last_reason if desired.eviction else None
        if verdict.reason == Reason.EVICTED and eviction is not None:
            metrics.EVICTIONS.labels(session.namespace, eviction.value).inc()
        elif verdict.admitted and before is not None and before.reason == Reason.EVICTED and eviction is not None:
            metrics.RESUMPTIONS.labels(session.namespace, eviction.value).inc()
        warning = verdict.reason in REFUSALS or verdict.reason == Reason.EVICTED
        decision = Decision(session.namespace, session.name, verdict.reason.value, verdict.message, warning)
        return Announcement(session, decision, resource_version)

    def _record_decisions(self, announcements: list[Announcement]) -> None:
        """Events for this pass's admission decisions, beside the next pass: one per tenant for a burst."""
        by_key = {(a.decision.namespace, a.decision.name): a for a in announcements}
        single, bursts = decision_events([a.decision for a in announcements])
        for decision in single:
            found = by_key[(decision.namespace, decision.name)]
            kind = "Warning" if decision.warning else "Normal"
            self._spawn(self._event(found.session, decision.reason, decision.message, kind, found.resource_version))
        for burst in bursts:
            self._spawn(self._tenant_event(burst))

    async def _event(
        self, session: SessionFacts, reason: str, message: str, kind: str, resource_version: str | None
    ) -> None:
        involved = {
            "apiVersion": API_VERSION,
            "kind": "WhatsAppSession",
            "name": session.name,
            "namespace": session.namespace,
            "uid": session.uid,
        }
        if resource_version is not None:
            involved["resourceVersion"] = resource_version
        await self._record(involved, reason, message, kind, about(session.namespace, session.name))

    async def _tenant_event(self, burst: TenantEvent) -> None:
        """An Event about many sessions of a tenant, on its Namespace (``kubectl get events -n <tenant>``)."""
        involved = {"apiVersion": "v1", "kind": "Namespace", "name": burst.namespace, "namespace": burst.namespace}
        kind = "Warning" if burst.warning else "Normal"
        await self._record(involved, burst.reason, burst.message, kind, about(burst.namespace))

    async def _record(
        self, involved: dict[str, str], reason: str, message: str, kind: str, context: Mapping[str, str]
    ) -> None:
        now = format_timestamp(self.clock())
        namespace = involved["namespace"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
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
        log.info("%s %s: %s", kind, reason, message, extra=context)
        try:
            await self.kube.create(event, MANAGER)
        except OSError as error:
            log.warning("event %s not recorded: %s", reason, error, extra=context)
            return
        except ApiError as error:
            if error.status != 403 or namespace == self.event_namespace:
                log.warning("event %s not recorded: %s", reason, error, extra=context)
                return
            # The tenant namespace is being deleted and takes no new objects: keep the Event with the operator.
            # An Event outside its object's namespace must be a "new" one: eventTime, action, reporter.
            event["metadata"] = {"generateName": f"{namespace}.{involved['name']}.", "namespace": self.event_namespace}
            event |= {
                "eventTime": self.clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "action": reason,
                "reportingInstance": f"{MANAGER}-{os.uname().nodename}",
            }
            try:
                await self.kube.create(event, MANAGER)
            except (ApiError, OSError) as again:
                log.warning("event %s not recorded: %s", reason, again, extra=context)

    async def _write_quota(self, quota: QuotaFacts, honoured: QuotaFacts | None, used: int, now: datetime) -> None:
        desired = desired_quota_status(quota, honoured, used, now).to_wire()
        async with self._write_slot():
            result = await self.quota_status.write(
                quota.namespace, quota.name, desired, quota.status.to_wire(), quota.resource_version
            )
        if result.outcome == Outcome.FAILED:
            self.poke_later(1)

    async def _ensure_tenant(
        self, namespace: str, quota: TenantQuotaSpec, replicas: int, has_sessions: bool, now: datetime
    ) -> None:
        """Apply the tenant's workload objects when they differ from what this process last applied.

        Refusals back off per tenant (1 s doubling to 60 s), so a namespace being deleted,
        which refuses new objects, costs a log line now and then instead of a busy loop.
        """
        wanted = (quota, replicas, has_sessions)
        if self.applied_tenants.get(namespace) == wanted:
            return  # applied as they are: not even built again (a pass over 1,000 tenants would spend 0.3 s)
        objects = tenant_objects(namespace, quota, self.config, replicas, has_sessions)
        fingerprint = json.dumps(objects, sort_keys=True)
        retry = self.tenant_retries.get(namespace)
        if retry is not None and retry.fingerprint == fingerprint and now < retry.at:
            return  # the same objects were refused a moment ago
        if not has_sessions:
            # Letting go: the Role (which the operator indexes) last, so that a tenant whose other
            # objects still hold their finalizer is found again, also after a restart.
            objects.sort(key=lambda obj: obj["kind"] == "Role")
        failures: list[ApiError] = []
        gone = False
        async with self._write_slot():
            for obj in objects:
                if failures and (has_sessions or obj["kind"] == "Role"):
                    break  # in creation order, what follows needs what failed; the Role waits for the rest
                try:
                    await self.kube.apply(obj, MANAGER)
                except (ApiError, OSError) as error:
                    refused = error if isinstance(error, ApiError) else ApiError(0, "Unreachable", str(error))
                    if has_sessions or refused.status not in (403, 404):
                        failures.append(refused)
                    gone = True  # without sessions, 403/404: the namespace is being deleted or gone
        self.applied_tenants.pop(namespace, None)
        if failures:
            retry = retry_after(retry, now, fingerprint)
            self.tenant_retries[namespace] = retry
            log.warning(
                "workload not applied (attempt %d, next in %.0f s): %s",
                retry.attempts, (retry.at - now).total_seconds(), failures[0], extra=about(namespace),
            )  # fmt: skip
            self.poke_later((retry.at - now).total_seconds())
            return
        self.tenant_retries.pop(namespace, None)
        if gone:
            return  # everything that still exists has let go of the runtime's identity: forget the tenant
        self.applied_tenants[namespace] = wanted
        log.info("%d session pod(s)", replicas, extra=about(namespace))

    async def _ensure_reviews(self, tenants: set[str]) -> None:
        """The runtimes of tenants with sessions may review their callers' tokens and permissions."""
        if self.applied_reviews == tenants:
            return
        objects = [review_role(), review_binding(self.event_namespace, tenants)]
        async with self._write_slot():
            try:
                for obj in objects:
                    await self.kube.apply(obj, MANAGER)
            except (ApiError, OSError) as error:
                log.warning("runtime review access not applied: %s", error)
                self.poke_later(5)
                return
        self.applied_reviews = set(tenants)


def _awaits_erasure(session: SessionFacts) -> bool:
    """Deleted, and its runtime has not yet unlinked the device and erased the credentials."""
    runtime_state = session.runtime.state if session.runtime else None
    return (
        session.deleting
        and session.has_finalizer
        and session.shard is not None
        and runtime_state
        not in (
            None,
            RuntimeState.REMOVED,
        )
    )


def _credentials_finalizer(session: SessionFacts) -> dict[str, Any]:
    """The credentials finalizer, owned by this operator (server-side apply)."""
    ref = reference(WhatsAppSession.KIND, session.namespace, session.name)
    return {**ref, "metadata": {**ref["metadata"], "finalizers": [CLEANUP_FINALIZER]}}
