"""When a deleted session may disappear: after its runtime unlinked the device and erased its credentials.

The operator puts the finalizer ``waso.dev/credentials`` on a session as soon as it gets a
shard (from then on credentials may exist on that shard's volume). The runtime, which
alone can reach the credentials, reports ``status.runtime.state: Removed`` once it has
unlinked the device and erased the store; the operator then releases the finalizer. A
session that no runtime ever saw has nothing to erase. If no runtime answers within
the timeout (the tenant's pods are gone), the finalizer is released anyway, with a
warning Event, so that a deletion never hangs forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from waso.api.session import RuntimeState
from waso.operator.world import SessionFacts


@dataclass(frozen=True)
class Release:
    reason: str
    warning: bool


def wants_finalizer(session: SessionFacts, shard: int | None) -> bool:
    return not session.deleting and shard is not None and not session.has_finalizer


def release_finalizer(session: SessionFacts, now: datetime, timeout: timedelta) -> Release | None:
    """Whether a deleted session's finalizer may go now, and why; None: keep waiting for the runtime."""
    if not session.deleting or not session.has_finalizer:
        return None
    runtime = session.runtime
    if runtime is None or runtime.state is None:
        return Release("no session runtime ever served it: no credentials to erase", warning=False)
    if runtime.state == RuntimeState.REMOVED:
        return Release("the runtime unlinked the device and erased its credentials", warning=False)
    since = session.deleting_since or now
    if now - since >= timeout:
        return Release(
            f"no runtime confirmed the removal within {int(timeout.total_seconds())} s; "
            "credentials may remain on the shard's volume and the device may stay linked",
            warning=True,
        )
    return None
