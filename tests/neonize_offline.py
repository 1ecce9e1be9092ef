"""Run two real neonize sessions under the supervisor with no network; print what happened as JSON.

Started by tests/test_neonize.py inside `unshare -n` (a network namespace with nothing in it),
so whatsmeow's dial fails locally and no packet leaves the machine. Leases and status
writes are recorded in memory: the subject here is neonize and the supervisor.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from waso.session_runtime.neonize_transport import NeonizeTransport
from waso.session_runtime.supervisor import SessionSupervisor
from waso.session_runtime.transport import SessionIdentity


class AlwaysHeld:
    duration = 15

    async def hold(self, name: str) -> datetime:
        return datetime.now(UTC)

    async def release(self, name: str) -> None:
        return None


async def main(data: Path, seconds: float) -> dict[str, Any]:
    reports: dict[str, list[dict[str, Any]]] = {}
    attempts: dict[str, int] = {}

    async def record(name: str, status: dict[str, Any]) -> None:
        reports.setdefault(name, []).append(status)

    def transport(identity: SessionIdentity) -> NeonizeTransport:
        attempts[identity.name] = attempts.get(identity.name, 0) + 1
        return NeonizeTransport(identity)

    supervisors = []
    for name, phone in (("s1", "+4915112345601"), ("s2", "+4915112345602")):
        identity = SessionIdentity("acme", name, phone, "waso", data / "sessions" / name)
        supervisor = SessionSupervisor(
            identity,
            transport,
            AlwaysHeld(),
            record,
        )
        supervisor.start()
        supervisor.want(True)
        supervisors.append(supervisor)
    await asyncio.sleep(seconds)
    await asyncio.gather(*(s.close() for s in supervisors))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"reports": reports, "attempts": attempts, "cpu": usage.ru_utime + usage.ru_stime}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1]), float(sys.argv[2])))))
