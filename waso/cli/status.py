"""`waso status` (and `kubectl waso status`): one tenant (or all) as a report, or as JSON or YAML.

Everything is gathered into one plain structure first, so the JSON output is exactly
what the text report prints: for the whole cluster the global cap (from the operator's
ConfigMap) against the sessions admitted; per tenant the quota in force and usage, the
sessions by phase, every session with its phase, readiness, shard, device and endpoint, and
the problems last, each with the condition's message, which says what to do.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import yaml

from waso.api.base import API_VERSION
from waso.api.conditions import find_condition, is_true
from waso.api.quota import TenantQuota
from waso.api.session import WhatsAppSession
from waso.api.tenancy import DEFAULT_MAX_SESSIONS, OPERATOR_LABELS, QuotaFacts, honoured_quota, quota_facts
from waso.cli.connection import EXIT_NOT_FOUND, CliError, Cluster, connect, explain
from waso.kube import ApiError, KubeClient, Unreachable


async def gather(kube: KubeClient, namespace: str | None, name: str | None) -> dict[str, Any]:
    try:
        session_list = await kube.list(WhatsAppSession.KIND, namespace)
    except ApiError as error:
        if error.status == 404:  # listing a kind the API server does not serve
            raise CliError(
                f"this cluster does not serve {WhatsAppSession.KIND} ({API_VERSION}): install waso's CRDs "
                "(the chart, or kubectl apply -f crds/)"
            ) from None
        raise
    quota_list = await kube.list(TenantQuota.KIND, namespace)
    sessions = [WhatsAppSession.model_validate(o) for o in session_list["items"]]
    quotas = [quota_facts(o) for o in quota_list["items"]]
    if name:
        sessions = [s for s in sessions if s.metadata.name == name]
    tenants = sorted({s.metadata.namespace or "" for s in sessions} | {q.namespace for q in quotas})
    report: dict[str, Any] = {}
    if namespace is None and name is None:
        admitted = sum(1 for s in sessions if s.status and is_true(s.status.conditions, "Admitted"))
        report["capacity"] = await _capacity(kube, admitted)
    report["tenants"] = [_tenant(ns, sessions, quotas) for ns in tenants]
    return report


async def _capacity(kube: KubeClient, admitted: int) -> dict[str, Any]:
    """The global cap from the operator's ConfigMap (the chart's), against the sessions admitted cluster-wide."""
    try:
        found = (await kube.list("ConfigMap", None, label_selector=OPERATOR_LABELS))["items"]
    except ApiError as error:  # a tenant's user may read sessions without reading the operator's namespace
        return {"admitted": admitted, "maxSessions": None, "operator": None, "note": f"cap unknown: {error}"}
    configs = [c for c in found if "config.yaml" in (c.get("data") or {})]
    if len(configs) != 1:
        note = "cap unknown: no waso operator ConfigMap" if not configs else "cap unknown: several waso operators"
        return {"admitted": admitted, "maxSessions": None, "operator": None, "note": note}
    meta = configs[0]["metadata"]
    settings = yaml.safe_load(configs[0]["data"]["config.yaml"]) or {}
    cap = settings.get("maxSessions", DEFAULT_MAX_SESSIONS) if isinstance(settings, dict) else None
    return {"admitted": admitted, "maxSessions": cap, "operator": f"{meta['namespace']}/{meta['name']}", "note": None}


def _tenant(namespace: str, sessions: Iterable[WhatsAppSession], quotas: Iterable[QuotaFacts]) -> dict[str, Any]:
    own = [q for q in quotas if q.namespace == namespace]
    in_force = honoured_quota(own)
    quota: dict[str, Any] | None = None
    if in_force is not None:
        quota = {
            "name": in_force.name,
            "maxSessions": in_force.spec.max_sessions,
            "messagesPerMinute": in_force.spec.messages_per_minute,
            "usedSessions": in_force.status.used.sessions if in_force.status.used else None,
            "ignored": [q.name for q in own if q.uid != in_force.uid],
        }
    rows = [_session(s) for s in sorted(sessions, key=lambda s: s.metadata.name) if s.metadata.namespace == namespace]
    phases = Counter(row["phase"] or "Unknown" for row in rows)
    return {"namespace": namespace, "quota": quota, "phases": dict(sorted(phases.items())), "sessions": rows}


def _session(session: WhatsAppSession) -> dict[str, Any]:
    status = session.status
    conditions = status.conditions if status else ()
    ready = find_condition(conditions, "Ready")
    runtime = status.runtime if status else None
    problems = [
        f"{c.type}: {c.reason}: {c.message}"
        for c in conditions
        if (c.type in ("Stalled", "Reconciling") and c.status == "True")
        or (c.type == "DeviceHealthy" and c.status == "False")
    ]
    if runtime is not None and runtime.last_error:
        problems.append(f"last error: {runtime.last_error}")
    return {
        "name": session.metadata.name,
        "phone": session.spec.phone_number,
        "phase": status.phase.value if status and status.phase else None,
        "ready": ready.status if ready else "Unknown",
        "shard": status.shard if status else None,
        "device": runtime.device_id if runtime else None,
        "state": runtime.state.value if runtime and runtime.state else None,
        "endpoint": status.endpoint if status else None,
        "problems": problems,
    }


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    capacity = report.get("capacity")
    if capacity is not None:
        cap = capacity["maxSessions"]
        summary = (
            f"{capacity['admitted']}/{cap} sessions admitted"
            if cap is not None
            else (f"{capacity['admitted']} sessions admitted; {capacity['note']}")
        )
        where = f" (operator configuration {capacity['operator']})" if capacity["operator"] else ""
        lines += [f"Capacity: {summary}{where}", ""]
    for tenant in report["tenants"]:
        quota = tenant["quota"]
        if quota is None:
            summary = "no TenantQuota: operator defaults apply"
        else:
            used = quota["usedSessions"] if quota["usedSessions"] is not None else "?"
            summary = f"{used}/{quota['maxSessions']} sessions, {quota['messagesPerMinute']} messages/min"
            if quota["ignored"]:
                summary += f" (ignored TenantQuotas: {', '.join(quota['ignored'])})"
        lines.append(f"Tenant {tenant['namespace']}: {summary}")
        if tenant["phases"]:
            lines.append("  " + ", ".join(f"{phase} {count}" for phase, count in tenant["phases"].items()))
        lines.append("")
        if not tenant["sessions"]:
            lines += ["  no WhatsAppSessions in this namespace", ""]
            continue
        header = ("NAME", "PHONE", "PHASE", "READY", "SHARD", "DEVICE", "STATE")
        rows = [header] + [
            tuple(
                "" if s[k] is None else str(s[k])
                for k in ("name", "phone", "phase", "ready", "shard", "device", "state")
            )
            for s in tenant["sessions"]
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
        problems = [(s["name"], p) for s in tenant["sessions"] for p in s["problems"]]
        if problems:
            lines += ["", "  Problems:"] + [f"    {name}: {problem}" for name, problem in problems]
        lines.append("")
    if not report["tenants"]:
        lines.append("no WhatsAppSessions or TenantQuotas found")
    return "\n".join(lines)


def main(cluster: Cluster, namespace: str | None, name: str | None, output: str) -> int:
    kube = connect(cluster)
    try:
        report = asyncio.run(gather(kube, namespace, name))
    except (ApiError, Unreachable, OSError) as error:
        raise explain(error) from None
    finally:
        kube.close()
    if name and not any(t["sessions"] for t in report["tenants"]):
        where = f" in namespace {namespace}" if namespace else ""
        raise CliError(f"WhatsAppSession {name} not found{where}", EXIT_NOT_FOUND)
    if output == "json":
        print(json.dumps(report, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(report, sort_keys=False), end="")
    else:
        print(render(report))
    return 0
