"""`waso evict NS/NAME` and `waso resume NS/NAME`: park a session by hand, or bring an evicted one back.

Both write an annotation (``waso.dev/evict``, ``waso.dev/resume``) with a new token; the
operator acts on it once. A session evicted by a person stays parked until a person resumes
it; one evicted under pressure comes back by itself when room returns, and ``waso resume``
brings it back now, evicting an idle session if it must (within the usual rules). A session
stopped by ``spec.suspend`` is not this command's: its manifest says so, and GitOps would
undo a change made here.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from waso.api.conditions import ConditionType, Reason
from waso.api.session import EVICT_ANNOTATION, RESUME_ANNOTATION
from waso.cli.requests import annotate, new_token, parse_target, read_session
from waso.kube import ApiError


def _admitted(session: dict[str, Any]) -> tuple[str, str]:
    for condition in (session.get("status") or {}).get("conditions") or []:
        if condition.get("type") == ConditionType.ADMITTED:
            return str(condition.get("status")), str(condition.get("reason"))
    return "Unknown", str(Reason.PENDING)


def refusal(command: str, session: dict[str, Any]) -> str | None:
    """Why the request would change nothing (None when it should be made)."""
    if (session.get("spec") or {}).get("suspend"):
        return "is suspended by its spec (spec.suspend: true); change the manifest instead"
    if (session.get("metadata") or {}).get("deletionTimestamp"):
        return "is being deleted"
    status, reason = _admitted(session)
    if command == "resume" and reason != Reason.EVICTED:
        return f"is not evicted (Admitted={status}, reason {reason})"
    if command == "evict" and reason == Reason.EVICTED:
        last = ((session.get("status") or {}).get("eviction") or {}).get("lastReason")
        if last == "Manual":
            return "is already evicted on request"
    return None


def main(command: str, text: str) -> int:
    target = parse_target(text)
    if target is None:
        print(f"usage: waso {command} NAMESPACE/NAME", file=sys.stderr)
        return 2
    key = "/".join(target)
    try:
        session = asyncio.run(read_session(target))
        why_not = refusal(command, session)
        if why_not is not None:
            print(f"waso {command}: {key} {why_not}; nothing requested", file=sys.stderr)
            return 1
        annotation = EVICT_ANNOTATION if command == "evict" else RESUME_ANNOTATION
        asyncio.run(annotate(target, annotation, new_token()))
    except (ApiError, OSError) as error:
        print(f"waso {command}: {key}: {error}", file=sys.stderr)
        return 1
    print(f"{command} of {key} requested; follow it with: kubectl get was {target[1]} -n {target[0]} -w")
    return 0
