"""coordination.k8s.io Leases through the API, by the rules of ``waso.leases``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from waso.kube import ApiError, KubeClient
from waso.leases import LeaseAction, LeaseView, lease_action

log = logging.getLogger("waso.leases")


class LeaseKeeper:
    """Acquires, renews and releases Leases of one namespace as ``identity``, writing as field manager ``manager``."""

    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        identity: str,
        duration_seconds: int,
        clock: Callable[[], datetime],
        manager: str,
    ) -> None:
        self.kube = kube
        self.manager = manager
        self.namespace = namespace
        self.identity = identity
        self.duration = duration_seconds
        self.clock = clock
        self.expiries: dict[str, datetime] = {}
        """When each lease that someone else holds runs out, as last read."""

    async def _read(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.kube.get("Lease", self.namespace, name)
        except ApiError as error:
            if error.status != 404:
                raise
            return None

    async def hold(
        self, name: str, labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None
    ) -> datetime | None:
        """Acquire or renew ``name``; the time of the successful write, or None if another holder has it.

        ``labels`` and ``annotations`` are written with it (the heartbeat's shard and memory report).
        """
        now = self.clock()
        lease = await self._read(name)
        previous: dict[str, Any] = (lease or {}).get("spec") or {}
        view = None
        if lease is not None:
            renew = previous.get("renewTime")
            view = LeaseView(
                previous.get("holderIdentity"),
                _parse_micro_time(renew) if renew else None,
                previous.get("leaseDurationSeconds"),
            )
        action = lease_action(view, self.identity, now)
        if action == LeaseAction.WAIT:
            if view is not None and view.renew_time is not None:
                self.expiries[name] = view.renew_time + timedelta(seconds=view.duration_seconds or 0)
            return None
        self.expiries.pop(name, None)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "renewTime": _micro_time(now),
            "acquireTime": previous.get("acquireTime") if action == LeaseAction.RENEW else _micro_time(now),
            "leaseTransitions": (previous.get("leaseTransitions") or 0) + (action == LeaseAction.TAKE),
        }
        meta: dict[str, Any] = dict((lease or {}).get("metadata") or {"name": name, "namespace": self.namespace})
        if labels:
            meta["labels"] = {**(meta.get("labels") or {}), **labels}
        if annotations:
            meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
        try:
            if lease is None:
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta}
                await self.kube.create({**body, "spec": spec}, self.manager)
            else:
                # metadata carries the resourceVersion read: a concurrent writer makes this fail with 409
                await self.kube.replace({**lease, "metadata": meta, "spec": spec}, self.manager)
        except ApiError as error:
            if error.status in (409, 422):
                return None  # someone else wrote first
            raise
        if action == LeaseAction.TAKE:
            log.info("lease %s taken over from %s", name, view.holder if view else None)
        return now

    def retry_after(self, name: str) -> float:
        """A standby tries again just after the holder's lease would run out, and at least every third of it."""
        interval = max(1.0, self.duration / 3)
        expiry = self.expiries.get(name)
        if expiry is None:
            return interval
        return min(interval, max(0.2, (expiry - self.clock()).total_seconds() + 0.1))

    async def release(self, name: str) -> None:
        """Give the lease up so that another holder need not wait for it to expire."""
        try:
            lease = await self._read(name)
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            spec = {k: v for k, v in spec.items() if k not in ("holderIdentity", "renewTime")}
            await self.kube.replace({**lease, "spec": spec}, self.manager)
        except ApiError as error:
            if error.status not in (404, 409):
                log.warning("lease %s not released: %s", name, error)
        except OSError as error:  # it expires by itself
            log.warning("lease %s not released: %s", name, error)


def _micro_time(value: datetime) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_micro_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
