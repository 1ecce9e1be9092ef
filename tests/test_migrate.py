"""`waso migrate` against the real API server (issue 10, part 2).

No operator runs: the tests write the sessions' status themselves (status subresource), as the
operator would, so that some sessions are judged broken (DeviceHealthy False IdentityMismatch)
in three tenants. The commands run as the real CLI in a subprocess.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.conftest import ControlPlane
from tests.operator_support import PLURAL, Tenants, create_session, get, list_sessions
from tests.support import run_waso, wait_for
from waso.api.base import GROUP, VERSION

REPAIR = "waso.dev/repair"
ROLLBACK = "waso.dev/rollback"
NOW = "2025-01-01T00:00:00Z"


def _condition(status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": "DeviceHealthy", "status": status, "reason": reason, "message": message, "lastTransitionTime": NOW}


def _set_status(api: client.ApiClient, namespace: str, name: str, status: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status}
    )


def _annotate(api: client.ApiClient, namespace: str, name: str, annotations: dict[str, str]) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"annotations": annotations}}
    )


@dataclass(frozen=True)
class World:
    """Three tenants; in each: broken sessions, a healthy one, one never judged; plus a pending and an in-flight one."""

    api: client.ApiClient
    kubeconfig: Path
    namespaces: tuple[str, str, str]
    broken: dict[str, set[str]]
    """Per tenant: the sessions a migration must ask a repair for."""

    def snapshot(self) -> dict[tuple[str, str], tuple[str, dict[str, str]]]:
        return {
            (ns, o["metadata"]["name"]): (
                o["metadata"]["resourceVersion"],
                dict(o["metadata"].get("annotations") or {}),
            )
            for ns in self.namespaces
            for o in list_sessions(self.api, ns)
        }

    def annotation(self, namespace: str, name: str, key: str = REPAIR) -> str | None:
        value = (get(self.api, namespace, name)["metadata"].get("annotations") or {}).get(key)
        return None if value is None else str(value)

    def waso(self, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = run_waso(*args, kubeconfig=self.kubeconfig, cwd=cwd)
        if check and result.returncode != 0:
            raise AssertionError(f"waso {' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def tenant_args(self) -> list[str]:
        return [word for ns in self.namespaces for word in ("--tenant", ns)]


def _world(control_plane: ControlPlane, tenants: Tenants) -> World:
    api = control_plane.api
    namespaces = (tenants.namespace("a"), tenants.namespace("b"), tenants.namespace("c"))
    broken: dict[str, set[str]] = {}
    phone = 4915100000000
    for index, ns in enumerate(namespaces):
        names = [f"broken-{i}" for i in range(index + 1)]  # 1, 2 and 3 broken sessions
        for name in [*names, "healthy", "unjudged"]:
            phone += 1
            create_session(api, ns, name, f"+{phone}")
        for name in names:
            _set_status(api, ns, name, {"conditions": [_condition("False", "IdentityMismatch", "live JID differs")]})
        _set_status(api, ns, "healthy", {"conditions": [_condition("True", "Healthy", "device 32 is consistent")]})
        broken[ns] = set(names)
    # Tenant a: a broken session whose repair a person already asked for (not yet taken up).
    phone += 1
    create_session(api, namespaces[0], "pending", f"+{phone}")
    _set_status(api, namespaces[0], "pending", {"conditions": [_condition("False", "MalformedJid")]})
    _annotate(api, namespaces[0], "pending", {REPAIR: "asked-by-hand"})
    # Tenant b: a broken session with a repair in flight, and one logged out (no repair fixes that).
    phone += 1
    create_session(api, namespaces[1], "in-flight", f"+{phone}")
    in_flight = {"id": "repair-1-20250101t000000", "reason": "IdentityMismatch", "requestedAt": NOW}
    _set_status(
        api,
        namespaces[1],
        "in-flight",
        {"conditions": [_condition("False", "IdentityMismatch")], "repairs": {"count": 0, "requested": in_flight}},
    )
    phone += 1
    create_session(api, namespaces[1], "logged-out", f"+{phone}")
    _set_status(api, namespaces[1], "logged-out", {"conditions": [_condition("False", "LoggedOut")]})
    return World(api, control_plane.kubeconfig, namespaces, broken)


def _first_action(log: Path) -> datetime:
    first = next(line for line in log.read_text().splitlines() if " action=repair-requested " in line)
    return datetime.strptime(first.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def test_plan_lists_exactly_the_unhealthy_sessions(
    control_plane: ControlPlane, tenants: Tenants, tmp_path: Path
) -> None:
    world = _world(control_plane, tenants)
    a, b, c = world.namespaces
    report = json.loads(world.waso("migrate", "plan", *world.tenant_args(), "-o", "json", cwd=tmp_path).stdout)
    by_tenant = {t["namespace"]: t for t in report["tenants"]}
    assert list(by_tenant) == [a, b, c]
    for ns in world.namespaces:
        actions = {s["name"]: s["action"] for s in by_tenant[ns]["sessions"]}
        assert {n for n, action in actions.items() if action == "repair"} == world.broken[ns]
        assert by_tenant[ns]["healthy"] == 1
        assert by_tenant[ns]["toRepair"] == len(world.broken[ns])
    assert {s["name"]: s["action"] for s in by_tenant[a]["sessions"]}["pending"] == "pending"
    assert by_tenant[a]["pending"] == 1
    assert by_tenant[a]["other"] == 1
    in_flight = next(s for s in by_tenant[b]["sessions"] if s["name"] == "in-flight")
    assert in_flight["action"] == "inFlight"
    assert in_flight["request"] == "repair-1-20250101t000000"
    assert by_tenant[b]["other"] == 2  # unjudged and logged out: counted, not listed
    assert "logged-out" not in {s["name"] for s in by_tenant[b]["sessions"]}
    broken = next(s for s in by_tenant[c]["sessions"] if s["name"] == "broken-0")
    assert broken["reason"] == "IdentityMismatch"
    assert broken["message"] == "live JID differs"

    table = world.waso("migrate", "plan", *world.tenant_args(), cwd=tmp_path).stdout
    assert f"Tenant {c}: 3 to repair, 0 in flight, 0 pending, 1 healthy, 1 other" in table
    assert "new QR scan" in table
    assert "healthy  " not in table


def test_apply_dry_run_changes_nothing(control_plane: ControlPlane, tenants: Tenants, tmp_path: Path) -> None:
    world = _world(control_plane, tenants)
    before = world.snapshot()
    for mode in (["--dry-run"], []):
        out = world.waso("migrate", "apply", *world.tenant_args(), *mode, "--delay", "0", cwd=tmp_path).stdout
        assert "dry run" in out
        assert "would request a repair of broken-0" in out
    assert world.snapshot() == before  # same resourceVersion and annotations: nothing was written
    assert list(tmp_path.iterdir()) == []  # no state file, no logs


def test_apply_requests_repairs_of_the_unhealthy_tenant_by_tenant_with_a_delay(
    control_plane: ControlPlane, tenants: Tenants, tmp_path: Path
) -> None:
    world = _world(control_plane, tenants)
    before = world.snapshot()
    world.waso("migrate", "apply", *world.tenant_args(), "--yes", "--delay", "1", cwd=tmp_path)

    after = world.snapshot()
    for (ns, name), (version, found) in after.items():
        if name in world.broken[ns]:
            assert found[REPAIR].startswith("migrate-"), (ns, name)
        else:  # healthy, unjudged, logged out, in flight, pending: untouched
            assert (version, found) == before[(ns, name)], (ns, name)

    logs = tmp_path / "waso-migrate-logs"
    assert sorted(p.name for p in logs.iterdir()) == sorted(f"{ns}.log" for ns in world.namespaces)
    for ns in world.namespaces:
        lines = (logs / f"{ns}.log").read_text().splitlines()
        requested = [line for line in lines if " action=repair-requested " in line]
        assert {line.split(" session=")[1].split()[0] for line in requested} == world.broken[ns]
        assert all(f" tenant={ns} " in line for line in lines)
        for line in requested:  # the value logged is the one written
            name = line.split(" session=")[1].split()[0]
            assert f" value={world.annotation(ns, name)}" in line
    a = world.namespaces[0]
    assert "session=pending action=skipped" in (logs / f"{a}.log").read_text()
    firsts = [_first_action(logs / f"{ns}.log") for ns in world.namespaces]
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(firsts)]
    assert all(gap >= 1.0 for gap in gaps), gaps

    state = json.loads((tmp_path / "waso-migrate-state.json").read_text())
    assert all(state["tenants"][ns]["done"] for ns in world.namespaces)

    # A rerun with the same state skips every tenant and writes nothing.
    again = world.waso("migrate", "apply", *world.tenant_args(), "--yes", "--delay", "1", cwd=tmp_path).stdout
    assert all(f"tenant {ns}: already done" in again for ns in world.namespaces)
    assert world.snapshot() == after


def test_apply_resumes_after_being_killed(control_plane: ControlPlane, tenants: Tenants, tmp_path: Path) -> None:
    world = _world(control_plane, tenants)
    a, b, c = world.namespaces
    state_file = tmp_path / "state.json"
    args = ["migrate", "apply", *world.tenant_args(), "--yes", "--delay", "5", "--state", str(state_file)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "waso.cli.main", *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)},
    )

    def first_tenant_recorded() -> bool:
        try:
            return bool(json.loads(state_file.read_text())["tenants"].get(a, {}).get("done"))
        except (OSError, ValueError):
            return False

    try:
        wait_for(first_tenant_recorded, timeout=60, what="the first tenant recorded as done", interval=0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = {name: world.annotation(a, name) for name in world.broken[a]}
    assert all(value and value.startswith("migrate-") for value in first.values())
    assert all(world.annotation(c, name) is None for name in world.broken[c])  # killed during the delay

    out = world.waso(*args, cwd=tmp_path).stdout
    assert f"tenant {a}: already done" in out
    assert {name: world.annotation(a, name) for name in world.broken[a]} == first  # not asked again
    for ns in (b, c):
        assert all((world.annotation(ns, name) or "").startswith("migrate-") for name in world.broken[ns])
    state = json.loads(state_file.read_text())
    assert all(state["tenants"][ns]["done"] for ns in world.namespaces)
    assert {r["session"] for r in state["tenants"][a]["repairs"]} == world.broken[a]


def test_rollback_restores_the_latest_backup_of_the_sessions_this_migration_repaired(
    control_plane: ControlPlane, tenants: Tenants, tmp_path: Path
) -> None:
    world = _world(control_plane, tenants)
    b = world.namespaces[1]
    world.waso("migrate", "apply", *world.tenant_args(), "--yes", "--delay", "0", cwd=tmp_path)
    # What the operator would write once the repairs ran: the request handled, backups kept;
    # broken-1 of tenant b has not been repaired yet (no backup).
    for name in world.broken[b]:
        repairs: dict[str, Any] = {"count": 1, "handledRequest": world.annotation(b, name)}
        if name == "broken-0":
            repairs["backups"] = [
                {"name": "repair-1-old", "takenAt": "2024-12-01T00:00:00Z"},
                {"name": "repair-2-new", "takenAt": NOW},
            ]
        _set_status(world.api, b, name, {"repairs": repairs})
    # The healthy session has a backup too, from a repair not asked for by this migration.
    _set_status(world.api, b, "healthy", {"repairs": {"count": 1, "backups": [{"name": "x", "takenAt": NOW}]}})

    before = world.snapshot()
    dry = world.waso("migrate", "rollback", "--tenant", b, cwd=tmp_path).stdout
    assert "would request a rollback of broken-0 to its latest backup repair-2-new" in dry
    assert "broken-1: skipped, no backup is kept" in dry
    assert world.snapshot() == before

    world.waso("migrate", "rollback", "--tenant", b, "--yes", cwd=tmp_path)
    value = world.annotation(b, "broken-0", ROLLBACK)
    assert value is not None
    assert value.startswith("latest#")
    for ns, name in before:
        if (ns, name) != (b, "broken-0"):
            assert world.annotation(ns, name, ROLLBACK) is None, (ns, name)
    log = (tmp_path / "waso-migrate-logs" / f"{b}.log").read_text()
    assert f"session=broken-0 action=rollback-requested backup=repair-2-new annotation={ROLLBACK} value={value}" in log

    # Asked once: a second run leaves it alone.
    world.waso("migrate", "rollback", "--tenant", b, "--yes", cwd=tmp_path)
    assert world.annotation(b, "broken-0", ROLLBACK) == value
