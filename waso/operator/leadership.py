"""Leader election: of several operator replicas, only the holder of one Lease decides and writes.

Every replica watches and keeps its informers' indexes filled, so a standby that takes over
decides from the whole cluster at once. The leader renews every third of the lease;
it stops deciding (its pass in flight is cancelled) once it could not renew for
``duration - margin`` (``waso.leases.still_held``), before any standby may take over
at ``renewTime + duration``. A killed leader is replaced within one lease duration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable
from datetime import datetime

from waso.kube import KubeClient
from waso.lease_keeper import LeaseKeeper
from waso.leases import still_held
from waso.operator import metrics

log = logging.getLogger("waso.operator")
MANAGER = "waso-operator"


def identity() -> str:
    """This replica: its pod name (the chart sets POD_NAME, else the host name) and a token per process."""
    return f"{os.environ.get('POD_NAME') or os.uname().nodename}/{secrets.token_hex(4)}"


class Leadership:
    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        lease: str,
        duration_seconds: int,
        clock: Callable[[], datetime],
        me: str,
    ) -> None:
        self.keeper = LeaseKeeper(kube, namespace, me, duration_seconds, clock, MANAGER)
        self.namespace = namespace
        self.lease = lease
        self.duration = duration_seconds
        self.clock = clock
        self.identity = me
        self.renewed: datetime | None = None
        self.leading = asyncio.Event()
        """Set while this replica may decide."""
        self.deposed = asyncio.Event()
        """Set while it may not (the complement of ``leading``, to wait on)."""
        self.deposed.set()

    def holds(self) -> bool:
        return self.renewed is not None and still_held(self.renewed, self.duration, self.clock())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline: asyncio.TimerHandle | None = None
        while True:
            try:
                renewed = await self.keeper.hold(self.lease)
            except Exception as error:  # any failure is a renewal that did not happen; the loop goes on
                log.warning("leader lease %s/%s not renewed: %s", self.namespace, self.lease, error)
                renewed = None
            if renewed is not None:
                self.renewed = renewed
                if deadline is not None:
                    deadline.cancel()
                # Stand down on time even while the next renewal hangs on a slow API server.
                margin = max(1.0, self.duration / 3)
                remaining = (renewed - self.clock()).total_seconds() + self.duration - margin
                deadline = loop.call_later(max(0.0, remaining), self._check)
            if self.holds() and not self.leading.is_set():
                log.info("leading as %s (Lease %s/%s)", self.identity, self.namespace, self.lease)
                self.deposed.clear()
                self.leading.set()
                metrics.LEADER.set(1)
            self._check()
            if not self.leading.is_set():
                pause = self.keeper.retry_after(self.lease)
            elif renewed is None:
                pause = 1.0  # a renewal failed: again soon, the deadline is nearer than a third of the lease
            else:  # a third of the lease after the renewal began, however long the API server took to answer
                pause = max(0.0, self.duration / 3 - (self.clock() - renewed).total_seconds())
            await asyncio.sleep(pause)

    def _check(self) -> None:
        """Stand down once the lease may have passed to a standby."""
        if self.leading.is_set() and not self.holds():
            log.warning("no longer the leader: the lease was not renewed in time; standing by")
            self.leading.clear()
            self.deposed.set()
            metrics.LEADER.set(0)

    async def release(self) -> None:
        """On a clean stop: a standby takes over at once instead of after the lease runs out."""
        if self.leading.is_set():
            self.leading.clear()
            self.deposed.set()
            await self.keeper.release(self.lease)
