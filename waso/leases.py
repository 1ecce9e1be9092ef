"""coordination.k8s.io Leases: at most one live socket per session, one heartbeat per runtime pod, one
deciding operator.

Two sockets on one credential fight with StreamReplaced forever, so a runtime connects
a session only while it holds the session's coordination.k8s.io Lease. The decisions
are pure functions of the Lease as read and the time; ``waso.lease_keeper`` does the I/O.
The operator's leader election uses the same rules and keeper.

The holder treats its lease as lost well before anyone else may take it: a
challenger waits for ``renewTime + leaseDurationSeconds``, the holder gives up at
``last successful renewal + duration - margin``. Killed holders lose their sockets with
their process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class LeaseAction(StrEnum):
    CREATE = "create"
    TAKE = "take"
    RENEW = "renew"
    WAIT = "wait"


@dataclass(frozen=True)
class LeaseView:
    holder: str | None
    renew_time: datetime | None
    duration_seconds: int | None


def lease_action(lease: LeaseView | None, me: str, now: datetime) -> LeaseAction:
    if lease is None:
        return LeaseAction.CREATE
    if lease.holder == me:
        return LeaseAction.RENEW
    if not lease.holder or lease.renew_time is None:
        return LeaseAction.TAKE
    if now >= lease.renew_time + timedelta(seconds=lease.duration_seconds or 0):
        return LeaseAction.TAKE
    return LeaseAction.WAIT


def still_held(last_renewed: datetime, duration_seconds: int, now: datetime) -> bool:
    """The holder's own view: keep the socket only while no challenger could have taken over."""
    margin = max(1.0, duration_seconds / 3)
    return now < last_renewed + timedelta(seconds=duration_seconds - margin)
