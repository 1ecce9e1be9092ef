"""Helper processes for tests/test_neonize.py; each prints what happened as JSON.

- ``python -m tests.neonize_offline DATA SECONDS``: two real neonize sessions under the
  supervisor with no network, for at least SECONDS and until both failed to dial and tried again.
  Started inside `unshare -n` (a network namespace with nothing in it), so whatsmeow's
  dial fails locally and no packet leaves the machine. Leases and status writes are
  recorded in memory: the subject is neonize, the pairing child and the supervisor.
- ``fake-pairing-child MODE ARGS...``: the real pairing child program
  (``waso.session_runtime.neonize_pairing.main``) with a fake neonize client: ``hang``
  (a QR code, then blocked forever), ``hang-ignore-term`` (the same, deaf to SIGTERM),
  ``pair`` (a QR code, a pair code on request, then paired into its store).
- ``pairing-parent DATA``: a transport whose pairing child hangs; prints the child's pid
  once it showed a QR code, then waits to be killed.
- ``orphan DATA``: a child subreaper that SIGKILLs a ``pairing-parent`` and reaps the
  orphaned pairing child, reporting how and how fast it ended.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FAKE_JID = "4915112345601:53@s.whatsapp.net"
FAKE_PAIR_CODE = "ABCD-EFGH"
_PR_SET_CHILD_SUBREAPER = 36
BOUND = 90.0


def fake_pairing_command(mode: str) -> list[str]:
    return [sys.executable, "-m", "tests.neonize_offline", "fake-pairing-child", mode]


# -- the fake neonize client of the pairing child ------------------------------------------


class FakePairingClient:
    def __init__(self, mode: str, store: Path) -> None:
        self.mode, self.store = mode, store
        self.code_requested = threading.Event()
        if mode == "hang-ignore-term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # in the main thread: the factory runs there

    def run(self, events: Any) -> None:
        events.qr("fake-qr-1")
        if self.mode == "pair":
            if not self.code_requested.wait(30):
                raise RuntimeError("nobody asked for a pair code")
            with sqlite3.connect(self.store) as db:  # what whatsmeow stores, reduced to what waso reads
                db.execute("CREATE TABLE whatsmeow_device (jid TEXT PRIMARY KEY)")
                db.execute("INSERT INTO whatsmeow_device (jid) VALUES (?)", (FAKE_JID,))
            events.paired(FAKE_JID)
            events.connected()
        threading.Event().wait()  # like whatsmeow's QR loop: never returns by itself

    def pair_code(self, phone: str) -> str:
        self.code_requested.set()
        return FAKE_PAIR_CODE


def fake_pairing_child(mode: str, argv: list[str]) -> None:
    from waso.session_runtime.neonize_pairing import main as pairing_main

    pairing_main(argv, client_factory=lambda store, _name, _uuid: FakePairingClient(mode, store))


# -- a parent that gets killed, and a subreaper that watches its orphan ---------------------


def identity(data: Path, name: str = "s1", phone: str = "+4915112345601") -> Any:
    from waso.session_runtime.transport import SessionIdentity

    return SessionIdentity("acme", name, phone, "waso", data / "sessions" / name)


async def pairing_parent(data: Path) -> None:
    from waso.session_runtime.neonize_transport import NeonizeTransport
    from waso.session_runtime.transport import QrCode

    transport = NeonizeTransport(identity(data), pairing_command=fake_pairing_command("hang-ignore-term"))
    await transport.start()
    async with asyncio.timeout(60):
        while not isinstance(await transport.events.get(), QrCode):
            pass
    worker = transport.pairing_worker
    assert worker is not None
    assert worker.started is not None
    print(json.dumps({"pid": worker.pid, "pdeathsig": worker.started["pdeathsig"]}), flush=True)
    await asyncio.Event().wait()


def orphan(data: Path) -> dict[str, Any]:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, "prctl(PR_SET_CHILD_SUBREAPER)"
    parent = subprocess.Popen(
        [sys.executable, "-m", "tests.neonize_offline", "pairing-parent", str(data)], stdout=subprocess.PIPE
    )
    assert parent.stdout is not None
    started = json.loads(parent.stdout.readline())  # the caller's timeout bounds this
    child = int(started["pid"])
    parent.kill()
    parent.wait()
    killed = time.monotonic()
    deadline = killed + 10
    status = None
    while time.monotonic() < deadline:  # the orphan is ours to reap (we are its subreaper)
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid == child:
            break
        status = None
        time.sleep(0.02)
    ended = {
        "reaped": status is not None,
        "seconds": time.monotonic() - killed,
        "signal": os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None,
        "exit": os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None,
    }
    return {"child": child, "pdeathsig": started["pdeathsig"], **ended}


# -- two real neonize sessions without network ----------------------------------------------


class AlwaysHeld:
    duration = 15

    async def hold(self, name: str) -> datetime:
        return datetime.now(UTC)

    async def release(self, name: str) -> None:
        return None

    def retry_after(self, name: str) -> float:
        return 1.0


def own_children() -> list[int]:
    """Processes whose parent is this one (zombies included)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.append(int(entry.name))
    return children


async def main(data: Path, seconds: float) -> dict[str, Any]:
    from waso.session_runtime.neonize_transport import NeonizeTransport
    from waso.session_runtime.supervisor import SessionSupervisor
    from waso.session_runtime.transport import SessionIdentity

    reports: dict[str, list[dict[str, Any]]] = {}
    attempts: dict[str, int] = {}
    children: set[int] = set()

    async def record(name: str, status: Any) -> None:
        if not isinstance(status, dict):
            status = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        reports.setdefault(name, []).append(status)
        children.update(own_children())

    def transport(identity: SessionIdentity) -> NeonizeTransport:
        attempts[identity.name] = attempts.get(identity.name, 0) + 1
        return NeonizeTransport(identity)

    supervisors = []
    for name, phone in (("s1", "+4915112345601"), ("s2", "+4915112345602")):
        supervisor = SessionSupervisor(identity(data, name, phone), transport, AlwaysHeld(), record)
        supervisor.start()
        supervisor.want(True)
        supervisors.append(supervisor)
    # At least ``seconds``, and until both sessions failed to dial and tried again: a pairing
    # child needs seconds to load neonize on a busy machine; at most ``BOUND`` seconds.
    begun = time.monotonic()

    def dialled(name: str) -> bool:
        failures = [r for r in reports.get(name, []) if r["state"] == "Disconnected"]
        return attempts.get(name, 0) >= 2 and any("failed to dial" in r.get("lastError", "") for r in failures)

    while time.monotonic() - begun < BOUND:
        if time.monotonic() - begun >= seconds and all(dialled(s.identity.name) for s in supervisors):
            break
        await asyncio.sleep(0.1)
    elapsed = time.monotonic() - begun
    await asyncio.gather(*(s.close() for s in supervisors))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "reports": reports,
        "attempts": attempts,
        "elapsed": elapsed,
        "cpu": usage.ru_utime + usage.ru_stime,
        "workers_cpu": workers.ru_utime + workers.ru_stime,
        "workers_seen": len(children),
        "children_left": own_children(),
        "threads_left": [t.name for t in threading.enumerate() if t is not threading.main_thread()],
        "files": {name: sorted(os.listdir(data / "sessions" / name)) for name in attempts},
    }


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "fake-pairing-child":
        fake_pairing_child(sys.argv[2], sys.argv[3:])
    elif command == "pairing-parent":
        asyncio.run(pairing_parent(Path(sys.argv[2])))
    elif command == "orphan":
        print(json.dumps(orphan(Path(sys.argv[2]))))
    else:
        print(json.dumps(asyncio.run(main(Path(sys.argv[1]), float(sys.argv[2])))))
