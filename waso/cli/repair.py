"""`waso repair NS/NAME` and `waso repair rollback NS/NAME [--backup ID]`: a person asks, the operator acts.

Both write an annotation on the session (a new value each time); the operator picks it up
within the cluster-wide repair limit and says what happened in the session's conditions
and Events. Nothing here touches credentials: only the session's runtime can reach them.
"""

from __future__ import annotations

import asyncio
import sys

from waso.api.session import REPAIR_ANNOTATION, ROLLBACK_ANNOTATION
from waso.cli.connection import Cluster
from waso.cli.requests import annotate, new_token, parse_target


def main(cluster: Cluster, words: list[str], backup: str | None) -> int:
    rollback = bool(words) and words[0] == "rollback"
    rest = words[1:] if rollback else words
    target = parse_target(rest[0]) if len(rest) == 1 else None
    if target is None:
        print("usage: waso repair NAMESPACE/NAME | waso repair rollback NAMESPACE/NAME [--backup ID]", file=sys.stderr)
        return 2
    if backup is not None and not rollback:
        print("waso repair: --backup belongs to `waso repair rollback`", file=sys.stderr)
        return 2
    token = new_token()
    annotation, value = (
        (ROLLBACK_ANNOTATION, f"{backup or 'latest'}#{token}") if rollback else (REPAIR_ANNOTATION, token)
    )
    asyncio.run(annotate(cluster, target, annotation, value))
    what = f"rollback to {backup or 'the latest backup'}" if rollback else "repair"
    print(f"{what} of {'/'.join(target)} requested; follow it with: kubectl describe was {target[1]} -n {target[0]}")
    return 0
