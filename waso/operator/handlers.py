"""kopf wiring: indexes feed the controller, watch events poke it. Nothing is decided here.

kopf always watches cluster-wide; tenant namespace patterns (``WASO_NAMESPACES``, or
``waso operator -n``) filter the events. kopf's own per-namespace mode lists and watches
namespaces and starts a watch per match, and a namespace created in the instant that
watch began was seen never to get one; a filter over cluster-wide watches has no such gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
from typing import Any

import kopf
from prometheus_client import start_http_server

from waso.api.base import GROUP, VERSION
from waso.api.quota import TenantQuota
from waso.api.session import WhatsAppSession
from waso.api.tenancy import HEARTBEAT_LABEL, Heartbeat, QuotaFacts, heartbeat, memory_report, quota_facts
from waso.kube import KubeClient
from waso.operator.config import load_config
from waso.operator.controller import Controller, own_namespace, utc_now
from waso.operator.leadership import Leadership, identity
from waso.operator.resources import IDENTITY_FINALIZER, SELECTOR
from waso.operator.world import PodFacts, SessionFacts, pod_facts, session_facts

SESSIONS = (GROUP, VERSION, WhatsAppSession.PLURAL)
QUOTAS = (GROUP, VERSION, TenantQuota.PLURAL)
ROLES = ("rbac.authorization.k8s.io", "v1", "roles")
NAMESPACES_ENV = "WASO_NAMESPACES"
log = logging.getLogger("waso.operator")


def in_scope(namespace: str | None, **_: Any) -> bool:
    """Whether the namespace matches the tenant patterns (comma-separated globs; none: every namespace)."""
    patterns = [p for p in os.environ.get(NAMESPACES_ENV, "").split(",") if p]
    return not patterns or (namespace is not None and any(fnmatch.fnmatchcase(namespace, p) for p in patterns))


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster credentials, else the kubeconfig named by KUBECONFIG at the time of login."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = load_config()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.posting.level = logging.WARNING
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per watch event is noise
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="operator.waso.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="operator.waso.dev")
    kube = KubeClient.connect(threads=config.write_concurrency)
    memo.controller = Controller(config, kube)
    memo.kube = kube
    election = config.leader_election
    memo.leadership = None
    if election.enabled:
        memo.leadership = Leadership(
            kube, own_namespace(), election.lease_name, election.lease_seconds, utc_now, identity()
        )
        memo.election = asyncio.create_task(memo.leadership.run(), name="waso-leader-election")
    memo.task = asyncio.create_task(memo.controller.run(memo.leadership), name="waso-controller")
    memo.metrics = start_http_server(config.metrics_port, addr="0.0.0.0") if config.metrics_port else None
    log.info("waso operator started: max_sessions=%d transport=%s", config.max_sessions, config.transport)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    tasks = [memo.task, *([memo.election] if memo.leadership is not None else [])]
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if memo.leadership is not None:
        with contextlib.suppress(Exception):  # it runs out by itself
            await memo.leadership.release()
    if memo.metrics is not None:
        server, _thread = memo.metrics
        server.shutdown()
    memo.kube.close()


@kopf.index(*SESSIONS, when=in_scope)
def sessions_by_tenant(body: kopf.Body, **_: Any) -> dict[str, SessionFacts]:
    facts = session_facts(body)
    return {facts.namespace: facts}


@kopf.index(*QUOTAS, when=in_scope)
def quotas_by_tenant(body: kopf.Body, **_: Any) -> dict[str, QuotaFacts]:
    facts = quota_facts(body)
    return {facts.namespace: facts}


@kopf.index("v1", "pods", labels=SELECTOR, when=in_scope)
def session_pods_by_tenant(body: kopf.Body, **_: Any) -> dict[str, PodFacts] | None:
    facts = pod_facts(body)
    return {facts.namespace: facts} if facts is not None else None


@kopf.index("coordination.k8s.io", "v1", "leases", labels={HEARTBEAT_LABEL: "true"}, when=in_scope)
def heartbeats_by_tenant(body: kopf.Body, **_: Any) -> dict[str, Heartbeat] | None:
    found = heartbeat(body)
    return {found.namespace: found} if found is not None else None


def under_pressure(body: kopf.Body, memo: kopf.Memo, namespace: str | None, **_: Any) -> bool:
    """A heartbeat wakes the operator only under memory pressure (the resync sees the rest)."""
    report = memory_report(body)
    return in_scope(namespace) and report is not None and memo.controller.under_pressure(report)


@kopf.index(*ROLES, labels={"app.kubernetes.io/managed-by": "waso-operator"}, when=in_scope)
def runtime_identity_by_tenant(body: kopf.Body, **_: Any) -> dict[str, bool]:
    """Tenants whose runtime Role is held by the access finalizer (found again after an operator restart)."""
    return {str(body["metadata"]["namespace"]): IDENTITY_FINALIZER in (body["metadata"].get("finalizers") or [])}


@kopf.on.event(*SESSIONS, when=in_scope)
@kopf.on.event(*QUOTAS, when=in_scope)
@kopf.on.event("v1", "pods", labels=SELECTOR, when=in_scope)
@kopf.on.event(*ROLES, labels={"app.kubernetes.io/managed-by": "waso-operator"}, when=in_scope)
@kopf.on.event("coordination.k8s.io", "v1", "leases", labels={HEARTBEAT_LABEL: "true"}, when=under_pressure)
def poke(memo: kopf.Memo, **kwargs: Any) -> None:
    """Every watch event: the indexes are current, so the next pass sees it."""
    sessions: kopf.Index[str, SessionFacts] = kwargs["sessions_by_tenant"]
    quotas: kopf.Index[str, QuotaFacts] = kwargs["quotas_by_tenant"]
    pods: kopf.Index[str, PodFacts] = kwargs["session_pods_by_tenant"]
    access: kopf.Index[str, bool] = kwargs["runtime_identity_by_tenant"]
    heartbeats: kopf.Index[str, Heartbeat] = kwargs["heartbeats_by_tenant"]
    memo.controller.attach(sessions, quotas, pods, access, heartbeats)
    memo.controller.poke()
