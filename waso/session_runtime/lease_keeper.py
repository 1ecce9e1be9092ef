"""coordination.k8s.io Leases through the API: per-session locks and the pod heartbeat."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from waso.kube import KubeClient
from waso.session_runtime.leases import LeaseAction, LeaseView, lease_action

log = logging.getLogger("waso.runtime")


def session_lease_name(session: str) -> str:
    return f"waso-session-{session}"


class LeaseKeeper:
    def __init__(
        self, kube: KubeClient, namespace: str, identity: str, duration_seconds: int, clock: Callable[[], datetime]
    ) -> None:
        self.kube = kube
        self.api = client.CoordinationV1Api(kube.api)
        self.namespace = namespace
        self.identity = identity
        self.duration = duration_seconds
        self.clock = clock

    async def hold(self, name: str) -> datetime | None:
        """Acquire or renew ``name``; the time of the successful write, or None if another holder has it."""
        now = self.clock()
        try:
            lease = await self.kube.run(self.api.read_namespaced_lease, name, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            lease = None
        view = None
        if lease is not None:
            spec = lease.spec or client.V1LeaseSpec()
            view = LeaseView(spec.holder_identity, spec.renew_time, spec.lease_duration_seconds)
        action = lease_action(view, self.identity, now)
        if action == LeaseAction.WAIT:
            return None
        previous = lease.spec if lease is not None and lease.spec is not None else client.V1LeaseSpec()
        spec = client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=self.duration,
            renew_time=now,
            acquire_time=previous.acquire_time if action == LeaseAction.RENEW else now,
            lease_transitions=(previous.lease_transitions or 0) + (action == LeaseAction.TAKE),
        )
        try:
            if lease is None:
                body = client.V1Lease(metadata=client.V1ObjectMeta(name=name, namespace=self.namespace), spec=spec)
                await self.kube.run(self.api.create_namespaced_lease, self.namespace, body)
            else:
                lease.spec = spec  # carries metadata.resourceVersion: a concurrent writer makes this fail
                await self.kube.run(self.api.replace_namespaced_lease, name, self.namespace, lease)
        except ApiException as error:
            if error.status in (409, 422):
                return None  # someone else wrote first
            raise
        if action == LeaseAction.TAKE:
            log.info("lease %s taken over from %s", name, view.holder if view else None)
        return now

    async def release(self, name: str) -> None:
        """Give the lease up so that another runtime need not wait for it to expire."""
        try:
            lease = await self.kube.run(self.api.read_namespaced_lease, name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.renew_time = None
            await self.kube.run(self.api.replace_namespaced_lease, name, self.namespace, lease)
        except ApiException as error:
            if error.status not in (404, 409):
                log.warning("lease %s not released: %s %s", name, error.status, error.reason)
