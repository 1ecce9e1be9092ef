"""Placement: which shard (session pod) of its tenant serves a session.

A session's credentials live on its shard's volume, so a shard is assigned once and
never changes. New sessions fill the lowest shard with room. A shard counts every
session that holds it, running or parked (suspended, evicted, waiting after having run),
so that a parked session can always come back to its own shard without overfilling it.
The StatefulSet runs as many pods as the highest shard with a running session needs;
empty top shards are scaled away, and a tenant without running sessions has no pods.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from waso.operator.world import SessionFacts


def assign_shards(
    tenant_sessions: Iterable[SessionFacts], running: Mapping[str, bool], sessions_per_pod: int
) -> dict[str, int]:
    """Shard per session uid of one tenant: kept where held, assigned to running sessions that hold none."""
    sessions = list(tenant_sessions)
    shards = {s.uid: s.shard for s in sessions if s.shard is not None}
    load = Counter(shards.values())
    unplaced = (s for s in sessions if s.uid not in shards and running.get(s.uid, False))
    for session in sorted(unplaced, key=lambda s: s.queue_order):
        shard = 0
        while load[shard] >= sessions_per_pod:
            shard += 1
        shards[session.uid] = shard
        load[shard] += 1
    return shards


def replicas_needed(shards: Mapping[str, int], running: Mapping[str, bool]) -> int:
    """Pods needed: up to the highest shard that serves a running session."""
    return max((shard + 1 for uid, shard in shards.items() if running.get(uid, False)), default=0)
