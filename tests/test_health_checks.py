"""The Argo CD Lua health script and the Flux healthCheckExprs shipped with the chart,
evaluated by real interpreters (Lua 5.1 as Argo CD's gopher-lua, CEL) on statuses the operator writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from celpy.adapter import json_to_cel
from lupa import lua51

from waso.api.conditions import Reason
from waso.api.session import RuntimeState, RuntimeStatus, WhatsAppSessionStatus
from waso.operator.admission import ADMITTED, Verdict
from waso.operator.status import desired_status
from waso.operator.world import SessionFacts

HEALTH = Path(__file__).resolve().parent.parent / "charts/waso/health"
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
JID = "4915112345601:53@s.whatsapp.net"


def session(verdict: Verdict, runtime: RuntimeStatus | None = None, *, suspend: bool = False) -> dict[str, Any]:
    facts = SessionFacts(
        uid="u", namespace="acme", name="s", phone_number="+4915112345601", priority=0, suspend=suspend,
        created=T0, generation=2, resource_version=1, deleting=False, deleting_since=None,
        has_finalizer=True, shard=0, admitted=False,
        status=WhatsAppSessionStatus(runtime=runtime),
    )  # fmt: skip
    status = desired_status(facts, verdict, 0, T0).to_wire()
    return {
        "apiVersion": "waso.dev/v1alpha1",
        "kind": "WhatsAppSession",
        "metadata": {"name": "s", "namespace": "acme", "generation": 2},
        "spec": {"phoneNumber": "+4915112345601", "suspend": suspend},
        "status": {k: v for k, v in status.items() if v is not None},
    }


CONNECTED = RuntimeStatus(state=RuntimeState.CONNECTED, jid=JID, stored_jid=JID)
MISMATCH = RuntimeStatus(state=RuntimeState.CONNECTED, jid=JID, stored_jid="4915112345601:52@s.whatsapp.net")
BANNED = RuntimeStatus(state=RuntimeState.BANNED, stored_jid=JID, banned_until=T0 + timedelta(minutes=10))
BANNED_FOR_GOOD = RuntimeStatus(state=RuntimeState.BANNED, stored_jid=JID)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no status yet", {"metadata": {"generation": 1}, "spec": {}}, "Progressing", "InProgress"),
    ("waiting for capacity", session(Verdict(False, Reason.CAPACITY_EXCEEDED, "full")), "Progressing", "InProgress"),
    ("admitted, runtime not yet reporting", session(ADMITTED), "Progressing", "InProgress"),
    ("connected and healthy", session(ADMITTED, CONNECTED), "Healthy", "Current"),
    ("phone number conflict", session(Verdict(False, Reason.PHONE_NUMBER_CONFLICT, "older")), "Degraded", "Failed"),
    ("identity mismatch", session(ADMITTED, MISMATCH), "Degraded", "Failed"),
    ("banned until a known time", session(ADMITTED, BANNED), "Progressing", "InProgress"),
    ("banned without an end", session(ADMITTED, BANNED_FOR_GOOD), "Degraded", "Failed"),
    ("suspended", session(Verdict(False, Reason.SUSPENDED, "suspended"), suspend=True), "Suspended", "Current"),
]


def _behind(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "generation": 3}}


CASES.append(("spec changed, not yet observed", _behind(session(ADMITTED, CONNECTED)), "Progressing", "InProgress"))


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)

    def table(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: table(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([table(v) for v in value])
        return value

    lua.globals().obj = table(obj)
    result = lua.execute((HEALTH / "argocd-whatsappsession.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


def flux_status(obj: dict[str, Any], kind: str = "WhatsAppSession") -> str:
    checks = yaml.safe_load((HEALTH / "flux-health-checks.yaml").read_text())
    check = next(c for c in checks if c["kind"] == kind)
    env = celpy.Environment()
    activation = {key: json_to_cel(obj.get(key, {})) for key in ("metadata", "spec", "status")}

    def holds(expression: str) -> bool:
        return bool(env.program(env.compile(expression)).evaluate(activation))

    if holds(check["inProgress"]):
        return "InProgress"
    if holds(check["failed"]):
        return "Failed"
    return "Current" if holds(check["current"]) else "InProgress"


@pytest.mark.parametrize(("case", "obj", "argocd", "flux"), CASES, ids=[c[0] for c in CASES])
def test_argocd_and_flux_read_waso_status_alike(case: str, obj: dict[str, Any], argocd: str, flux: str) -> None:
    health = argocd_health(obj)
    assert health["status"] == argocd, (case, health)
    assert flux_status(obj) == flux, case
    if argocd == "Degraded":
        stalled = next(c for c in obj["status"]["conditions"] if c["type"] == "Stalled")
        assert health["message"].startswith(stalled["reason"])
