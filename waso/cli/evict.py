"""`waso evict|suspend|resume NS/NAME`: park a session by hand, or bring it back.

``evict`` and the resumption of an evicted session write an annotation (``waso.dev/evict``,
``waso.dev/resume``) with a new token; the operator acts on it once. A session evicted by a
person stays parked until a person resumes it; one evicted under pressure comes back by
itself when room returns, and ``resume`` brings it back now, evicting an idle session if it
must (within the usual rules). ``suspend`` sets ``spec.suspend`` (its slot is released), and
``resume`` of a suspended session clears it: where GitOps manages the manifest, change it
there instead, or the next sync undoes the change.
"""

from __future__ import annotations

import asyncio
from typing import Any

from waso.api.conditions import ConditionType, Reason
from waso.api.session import EVICT_ANNOTATION, RESUME_ANNOTATION
from waso.cli.connection import EXIT_USAGE, CliError, Cluster
from waso.cli.requests import annotate, new_token, parse_target, patch_session, read_session


def _admitted(session: dict[str, Any]) -> tuple[str, str]:
    for condition in (session.get("status") or {}).get("conditions") or []:
        if condition.get("type") == ConditionType.ADMITTED:
            return str(condition.get("status")), str(condition.get("reason"))
    return "Unknown", str(Reason.PENDING)


def refusal(command: str, session: dict[str, Any]) -> str | None:
    """Why the request would change nothing (None when it should be made)."""
    suspended = bool((session.get("spec") or {}).get("suspend"))
    if (session.get("metadata") or {}).get("deletionTimestamp"):
        return "is being deleted"
    if command == "suspend":
        return "is suspended already" if suspended else None
    if suspended:
        return None if command == "resume" else "is suspended by its spec (spec.suspend: true)"
    status, reason = _admitted(session)
    if command == "resume" and reason != Reason.EVICTED:
        return f"is not evicted (Admitted={status}, reason {reason})"
    if command == "evict" and reason == Reason.EVICTED:
        last = ((session.get("status") or {}).get("eviction") or {}).get("lastReason")
        if last == "Manual":
            return "is already evicted on request"
    return None


def main(cluster: Cluster, command: str, text: str) -> int:
    target = parse_target(text)
    if target is None:
        raise CliError(f"usage: waso {command} NAMESPACE/NAME", EXIT_USAGE)
    key = "/".join(target)
    session = asyncio.run(read_session(cluster, target))
    why_not = refusal(command, session)
    if why_not is not None:
        raise CliError(f"{key} {why_not}; nothing requested")
    if command == "suspend" or (command == "resume" and (session.get("spec") or {}).get("suspend")):
        asyncio.run(patch_session(cluster, target, {"spec": {"suspend": command == "suspend"}}))
        changed = "suspended (spec.suspend: true)" if command == "suspend" else "resumed (spec.suspend: false)"
        print(f"{key} {changed}; if GitOps manages it, change the manifest too")
        return 0
    annotation = EVICT_ANNOTATION if command == "evict" else RESUME_ANNOTATION
    asyncio.run(annotate(cluster, target, annotation, new_token()))
    print(f"{command} of {key} requested; follow it with: kubectl get was {target[1]} -n {target[0]} -w")
    return 0
