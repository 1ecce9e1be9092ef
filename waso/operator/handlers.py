"""kopf wiring: the operator's process (startup, cleanup, login, liveness). Nothing is decided here.

The controller's view of the cluster is kept by informers (``waso.informer``), one per kind,
each a cluster-wide list and watch filtered by the tenant namespace patterns
(``WASO_NAMESPACES``, or ``waso operator -n``). They replaced kopf's indexes and watch
handlers: kopf pre-populates indexes by waking every waiting object each time one more is
indexed, which is quadratic in the number of objects (6.6 s for 1,000 sessions, minutes for
5,000), and processes each watch event through its cause detection, several milliseconds
that a session's every status write paid again. A filter over cluster-wide watches also has
no gap for a namespace created the instant a per-namespace watch would begin.
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

from waso.api.quota import TenantQuota
from waso.api.session import WhatsAppSession
from waso.api.tenancy import HEARTBEAT_LABEL, Heartbeat, heartbeat, quota_facts
from waso.informer import Informer
from waso.kube import KubeClient
from waso.operator.config import load_config
from waso.operator.controller import Controller, own_namespace, utc_now
from waso.operator.leadership import Leadership, identity
from waso.operator.resources import IDENTITY_FINALIZER, SELECTOR
from waso.operator.world import PodFacts, pod_facts, session_facts

NAMESPACES_ENV = "WASO_NAMESPACES"
MANAGED = "app.kubernetes.io/managed-by=waso-operator"
WATCHES = 5
"""Informers, each holding one connection of the client's pool for its watch."""
log = logging.getLogger("waso.operator")


def in_scope(namespace: str | None) -> bool:
    """Whether the namespace matches the tenant patterns (comma-separated globs; none: every namespace)."""
    patterns = [p for p in os.environ.get(NAMESPACES_ENV, "").split(",") if p]
    return not patterns or (namespace is not None and any(fnmatch.fnmatchcase(namespace, p) for p in patterns))


def runtime_identity(role: Any) -> bool:
    """Whether a tenant's runtime Role is held by the access finalizer (found again after an operator restart)."""
    return IDENTITY_FINALIZER in (role["metadata"].get("finalizers") or [])


def out_of_memory(pod: PodFacts) -> bool:
    return pod.out_of_memory


def never(_: object) -> bool:
    return False


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster credentials, else the kubeconfig named by KUBECONFIG at the time of login."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = load_config()
    settings.posting.level = logging.WARNING
    kube = KubeClient.connect(threads=config.write_concurrency, connections=config.write_concurrency + WATCHES)
    controller = Controller(config, kube)
    memo.controller, memo.kube = controller, kube

    def under_pressure(beat: Heartbeat) -> bool:
        """A heartbeat wakes the operator only into or out of memory pressure (a silent one: the heartbeat timer)."""
        return beat.memory is not None and controller.under_pressure(beat.memory)

    poke = controller.poke
    sessions = Informer(
        kube, WhatsAppSession.KIND, session_facts, poke, in_scope=in_scope, handled=controller.session_changed
    )
    quotas = Informer(kube, TenantQuota.KIND, quota_facts, poke, in_scope=in_scope, handled=controller.quota_changed)
    pod_selector = ",".join(f"{key}={value}" for key, value in SELECTOR.items())
    # A pod matters to a decision only while its runtime was OOMKilled.
    pods = Informer(kube, "Pod", pod_facts, poke, in_scope=in_scope, label_selector=pod_selector, wakes=out_of_memory)
    # The Roles are the operator's own: it applies one per tenant, and a burst of a thousand new tenants would
    # otherwise set off a pass for each. A Role matters once its tenant has no session left, which the session's
    # deletion wakes; after a restart, the listing does.
    roles = Informer(kube, "Role", runtime_identity, poke, in_scope=in_scope, label_selector=MANAGED, wakes=never)
    beat_selector = f"{HEARTBEAT_LABEL}=true"
    beats = Informer(
        kube, "Lease", heartbeat, poke, in_scope=in_scope, label_selector=beat_selector, wakes=under_pressure
    )
    informers: list[Informer[Any]] = [sessions, quotas, pods, roles, beats]
    memo.tasks = [asyncio.create_task(i.run(), name=f"waso-informer-{i.kind}") for i in informers]
    controller.attach(sessions.view, quotas.view, pods.view, roles.view, beats.view)

    election = config.leader_election
    memo.leadership = None
    if election.enabled:
        # A client of its own: a renewal must not queue behind a burst of status writes.
        memo.election_kube = KubeClient.connect(threads=1)
        memo.leadership = Leadership(
            memo.election_kube, own_namespace(), election.lease_name, election.lease_seconds, utc_now, identity()
        )
        memo.tasks.append(asyncio.create_task(memo.leadership.run(), name="waso-leader-election"))

    async def run() -> None:
        # A pass only over the whole cluster: not before every informer has listed its kind (a standby too,
        # so that it decides at once when it takes over).
        await asyncio.gather(*(i.synced.wait() for i in informers))
        log.info("indexes filled: %d tenant(s) with sessions, %d session(s)", len(sessions.view), len(sessions))
        await controller.run(memo.leadership)

    memo.tasks.append(asyncio.create_task(run(), name="waso-controller"))
    memo.metrics = start_http_server(config.metrics_port, addr="0.0.0.0") if config.metrics_port else None
    log.info("waso operator started: max_sessions=%d transport=%s", config.max_sessions, config.transport)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for task in memo.tasks:
        task.cancel()
    for task in memo.tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if memo.leadership is not None:
        with contextlib.suppress(Exception):  # it runs out by itself
            await memo.leadership.release()
        memo.election_kube.close()
    if memo.metrics is not None:
        server, _thread = memo.metrics
        server.shutdown()
    memo.kube.close()
