"""`waso migrate plan | apply | rollback`: repair the broken device identities tenant by tenant.

The operator judges every session's device identity and writes the verdict into the
session's ``DeviceHealthy`` condition; this command reads that verdict (it never imports the
operator) and, tenant by tenant, asks for a repair the way `waso repair` does: a new value of
the annotation ``waso.dev/repair``. The operator carries the repairs out within its
cluster-wide in-flight limit, so a migration only spreads the requests out in time (a delay
between tenants) and never waits for a repair to finish.

`apply` is a dry run unless ``--yes``: the dry run reads, prints and writes nothing at all.
The real run keeps a state file (written atomically after every request and every tenant) so
that a rerun after an interruption skips the tenants done, and one log file per tenant with a
line per action. `rollback` asks, for the sessions this migration repaired in one tenant, for a
restore of the latest kept backup (annotation ``waso.dev/rollback``). See docs/migrate.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from waso.api.conditions import ConditionType, Reason, find_condition
from waso.api.session import REPAIR_ANNOTATION, ROLLBACK_ANNOTATION, WhatsAppSession
from waso.kube import ApiError, KubeClient, reference

REPAIRABLE = frozenset(
    {Reason.MISSING_IDENTITY, Reason.MALFORMED_JID, Reason.IDENTITY_MISMATCH, Reason.DEVICE_ID_ABOVE_POLICY}
)
"""The DeviceHealthy reasons of a broken identity that a repair (back up, reset, new scan) fixes."""
MANAGER = "waso-migrate"
DEFAULT_STATE = "waso-migrate-state.json"
DEFAULT_LOG_DIR = "waso-migrate-logs"
REPAIR = "repair"
IN_FLIGHT = "inFlight"
PENDING = "pending"
WHAT_HAPPENS = {
    REPAIR: "repair: back up the credential store, reset it, new QR scan needed",
    IN_FLIGHT: "repair in flight: nothing to ask",
    PENDING: "repair already requested, not yet taken up by the operator: nothing to ask",
}


class MigrateError(Exception):
    """Something that stops the command (a bad state file, an API refusal)."""


# -- the plan: read only ----------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """An unhealthy session with a repairable identity, and what a migration does with it."""

    name: str
    phone: str
    reason: str
    message: str
    action: str
    """REPAIR, IN_FLIGHT (status.repairs.requested is set) or PENDING (an unhandled waso.dev/repair)."""
    request: str | None
    """The repair in flight (its id) or the request pending (the annotation's value)."""
    backups: int

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phone": self.phone,
            "reason": self.reason,
            "message": self.message,
            "action": self.action,
            "request": self.request,
            "backups": self.backups,
        }


@dataclass(frozen=True)
class TenantPlan:
    namespace: str
    sessions: tuple[Candidate, ...]
    healthy: int
    other: int
    """Not judged broken in a repairable way: DeviceHealthy absent or Unknown, or False for another reason."""

    def to_repair(self) -> list[Candidate]:
        return [c for c in self.sessions if c.action == REPAIR]

    def as_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "toRepair": len(self.to_repair()),
            "inFlight": sum(c.action == IN_FLIGHT for c in self.sessions),
            "pending": sum(c.action == PENDING for c in self.sessions),
            "healthy": self.healthy,
            "other": self.other,
            "sessions": [c.as_json() for c in self.sessions],
        }


def judge(obj: dict[str, Any]) -> Candidate | bool | None:
    """A candidate for an unhealthy session; True for a healthy one; None for any other."""
    session = WhatsAppSession.model_validate(obj)
    status = session.status
    condition = find_condition(status.conditions if status else (), ConditionType.DEVICE_HEALTHY)
    if condition is None or condition.status == "Unknown":
        return None
    if condition.status == "True":
        return True
    if condition.reason not in REPAIRABLE:
        return None
    repairs = status.repairs if status else None
    annotation = (session.metadata.annotations or {}).get(REPAIR_ANNOTATION)
    action, request = REPAIR, None
    if repairs is not None and repairs.requested is not None:
        action, request = IN_FLIGHT, repairs.requested.id
    elif annotation and annotation != (repairs.handled_request if repairs else None):
        action, request = PENDING, annotation
    return Candidate(
        name=session.metadata.name or "",
        phone=session.spec.phone_number,
        reason=condition.reason,
        message=condition.message,
        action=action,
        request=request,
        backups=len(repairs.backups) if repairs else 0,
    )


def plan_tenant(namespace: str, items: list[dict[str, Any]]) -> TenantPlan:
    candidates: list[Candidate] = []
    healthy = other = 0
    for obj in sorted(items, key=lambda o: str(o["metadata"]["name"])):
        verdict = judge(obj)
        if isinstance(verdict, Candidate):
            candidates.append(verdict)
        elif verdict is True:
            healthy += 1
        else:
            other += 1
    return TenantPlan(namespace, tuple(candidates), healthy, other)


async def list_tenants(kube: KubeClient) -> list[str]:
    """Every namespace holding WhatsAppSessions, in a stable (sorted) order."""
    listing = await kube.list(WhatsAppSession.KIND)
    return sorted({str(o["metadata"]["namespace"]) for o in listing["items"]})


async def plan_of(kube: KubeClient, namespace: str) -> TenantPlan:
    listing = await kube.list(WhatsAppSession.KIND, namespace)
    return plan_tenant(namespace, listing["items"])


def render_plan(plans: list[TenantPlan]) -> str:
    if not plans:
        return "no WhatsAppSessions found\n"
    lines: list[str] = []
    for plan in plans:
        lines.append(f"Tenant {plan.namespace}: {_summary(plan)}")
        if plan.sessions:
            rows = [("NAME", "PHONE", "REASON", "WHAT HAPPENS")] + [
                (c.name, c.phone, c.reason, WHAT_HAPPENS[c.action] + (f" ({c.request})" if c.request else ""))
                for c in plan.sessions
            ]
            widths = [max(len(row[i]) for row in rows) for i in range(3)]
            lines += [
                "  " + "  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(r)) for r in rows
            ]
        lines.append("")
    return "\n".join(lines)


def _summary(plan: TenantPlan) -> str:
    data = plan.as_json()
    return (
        f"{data['toRepair']} to repair, {data['inFlight']} in flight, {data['pending']} pending, "
        f"{plan.healthy} healthy, {plan.other} other"
    )


# -- state and logs ----------------------------------------------------------------------------


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


TOKEN_PREFIX = "migrate-"
"""The start of every waso.dev/repair value a migration writes."""


def new_token() -> str:
    return TOKEN_PREFIX + datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


@dataclass
class State:
    """What a migration did: per tenant the repairs it asked for, whether the tenant is done, rollbacks."""

    path: Path
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            tenants = data["tenants"]
            if not isinstance(tenants, dict):
                raise TypeError("tenants is not an object")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MigrateError(f"cannot read the state file {path}: {error}") from error
        return cls(path, tenants)

    def tenant(self, namespace: str) -> dict[str, Any]:
        return self.tenants.setdefault(namespace, {"done": False, "repairs": []})

    def done(self, namespace: str) -> bool:
        return bool(self.tenants.get(namespace, {}).get("done"))

    def repairs(self, namespace: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.tenants.get(namespace, {}).get("repairs", [])
        return found

    def save(self) -> None:
        """Atomically: a temporary file in the same directory, flushed to disk, renamed over the old one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": 1, "tenants": self.tenants}, indent=2, sort_keys=True) + "\n"
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


class TenantLog:
    """``<dir>/<tenant>.log``: one line per action, ``<UTC time> tenant=.. session=.. action=.. ...``."""

    def __init__(self, directory: Path, namespace: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{namespace}.log"
        self.namespace = namespace

    def write(self, session: str, action: str, **fields: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        line = f"{now_text()} tenant={self.namespace} session={session} action={action}{extra}"
        with self.path.open("a") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        return line


async def _annotate(kube: KubeClient, namespace: str, name: str, annotation: str, value: str) -> None:
    patch = {"metadata": {"annotations": {annotation: value}}}
    await kube.merge_patch(reference(WhatsAppSession.KIND, namespace, name), patch, MANAGER)


# -- apply -------------------------------------------------------------------------------------


async def apply(
    kube: KubeClient,
    tenants: list[str] | None,
    *,
    yes: bool,
    delay: float,
    state_path: Path,
    log_dir: Path,
) -> int:
    state = State.load(state_path)
    order = sorted(set(tenants)) if tenants is not None else await list_tenants(kube)
    mode = "" if yes else "dry run (nothing is changed; --yes to apply): "
    print(f"{mode}{len(order)} tenant(s) in this order: {', '.join(order) or 'none'}; state {state_path}")
    delay_before_next = False
    for namespace in order:
        if state.done(namespace):
            print(f"tenant {namespace}: already done in {state_path}, skipped")
            continue
        if delay_before_next and delay > 0:
            print(f"waiting {delay:g}s before the next tenant")
            await asyncio.sleep(delay)
        plan = await plan_of(kube, namespace)
        print(f"tenant {namespace}: {_summary(plan)}")
        if not yes:
            for candidate in plan.sessions:
                verb = "would request a repair of" if candidate.action == REPAIR else "would leave"
                print(f"  {verb} {candidate.name} ({candidate.reason}): {WHAT_HAPPENS[candidate.action]}")
            delay_before_next = bool(plan.to_repair())
            continue
        delay_before_next = await _apply_tenant(kube, plan, state, TenantLog(log_dir, namespace))
        state.tenant(namespace).update(done=True, completedAt=now_text())
        state.save()
        print(f"tenant {namespace}: done (recorded in {state_path}); log {log_dir / (namespace + '.log')}")
    return 0


async def _apply_tenant(kube: KubeClient, plan: TenantPlan, state: State, log: TenantLog) -> bool:
    """Ask for the tenant's repairs; True when at least one request was written."""
    record = state.tenant(plan.namespace)
    ours = {r["request"] for r in record["repairs"]}
    wrote = False
    for candidate in plan.sessions:
        if candidate.action != REPAIR:
            # A request pending from an interrupted run of this migration stays recorded as ours.
            note = WHAT_HAPPENS[candidate.action]
            if candidate.action == PENDING and str(candidate.request).startswith(TOKEN_PREFIX):
                note = "already requested by this migration (an interrupted run)"
                if candidate.request not in ours:  # killed between the request and the state file
                    record["repairs"].append(
                        {
                            "session": candidate.name,
                            "request": candidate.request,
                            "reason": candidate.reason,
                            "requestedAt": None,
                        }
                    )
                    state.save()
            log.write(candidate.name, "skipped", state=candidate.action, request=str(candidate.request), why=repr(note))
            print(f"  {candidate.name}: skipped, {note}")
            continue
        token = new_token()
        try:
            await _annotate(kube, plan.namespace, candidate.name, REPAIR_ANNOTATION, token)
        except ApiError as error:
            if error.status == 404:
                log.write(candidate.name, "gone")
                print(f"  {candidate.name}: deleted meanwhile, skipped")
                continue
            log.write(candidate.name, "failed", error=repr(str(error)))
            raise MigrateError(f"{plan.namespace}/{candidate.name}: {error}") from error
        record["repairs"].append(
            {"session": candidate.name, "request": token, "reason": candidate.reason, "requestedAt": now_text()}
        )
        state.save()
        log.write(
            candidate.name, "repair-requested", reason=candidate.reason, annotation=REPAIR_ANNOTATION, value=token
        )
        print(f"  {candidate.name}: repair requested ({candidate.reason}), {REPAIR_ANNOTATION}={token}")
        wrote = True
    return wrote


# -- rollback ----------------------------------------------------------------------------------


async def rollback(kube: KubeClient, namespace: str, *, yes: bool, state_path: Path, log_dir: Path) -> int:
    """For each session this migration repaired in ``namespace`` and that has a kept backup: restore the latest."""
    state = State.load(state_path)
    repairs = state.repairs(namespace)
    if not repairs:
        print(f"tenant {namespace}: no repairs by this migration recorded in {state_path}; nothing to roll back")
        return 0
    mode = "" if yes else "dry run (nothing is changed; --yes to apply): "
    print(f"{mode}tenant {namespace}: {len(repairs)} repair(s) recorded")
    log = TenantLog(log_dir, namespace) if yes else None
    record = state.tenant(namespace)
    rollbacks: dict[str, str] = record.setdefault("rollbacks", {})
    latest: dict[str, dict[str, Any]] = {r["session"]: r for r in repairs}  # the last request per session
    for name, repair in sorted(latest.items()):
        try:
            session = WhatsAppSession.model_validate(await kube.get(WhatsAppSession.KIND, namespace, name))
        except ApiError as error:
            if error.status != 404:
                raise MigrateError(f"{namespace}/{name}: {error}") from error
            print(f"  {name}: deleted, skipped")
            continue
        repair_status = session.status.repairs if session.status else None
        annotations = session.metadata.annotations or {}
        why_not = None
        if repair_status is None or repair_status.handled_request != repair["request"]:
            why_not = f"the operator has not acted on this migration's request {repair['request']}"
        elif not repair_status.backups:
            why_not = "no backup is kept"
        elif rollbacks.get(name) and annotations.get(ROLLBACK_ANNOTATION) == rollbacks[name]:
            why_not = f"rollback already requested by this migration ({rollbacks[name]})"
        if why_not is not None:
            print(f"  {name}: skipped, {why_not}")
            if log is not None:
                log.write(name, "rollback-skipped", why=repr(why_not))
            continue
        assert repair_status is not None
        backup = repair_status.backups[-1].name
        if not yes:
            print(f"  would request a rollback of {name} to its latest backup {backup}")
            continue
        value = f"latest#{new_token()}"
        try:
            await _annotate(kube, namespace, name, ROLLBACK_ANNOTATION, value)
        except ApiError as error:
            raise MigrateError(f"{namespace}/{name}: {error}") from error
        rollbacks[name] = value
        state.save()
        assert log is not None
        log.write(name, "rollback-requested", backup=backup, annotation=ROLLBACK_ANNOTATION, value=value)
        print(f"  {name}: rollback to {backup} requested, {ROLLBACK_ANNOTATION}={value}")
    return 0


# -- entry points (wired in waso.cli.main) -----------------------------------------------------


def _run(what: str, work: Any) -> int:
    kube = KubeClient.connect(threads=2)
    try:
        result: int = asyncio.run(work(kube))
        return result
    except MigrateError as error:
        print(f"waso migrate {what}: {error}", file=sys.stderr)
        return 1
    except (ApiError, OSError) as error:
        print(f"waso migrate {what}: {error}", file=sys.stderr)
        return 1
    finally:
        kube.close()


def plan_command(tenants: list[str] | None, output: str) -> int:
    async def work(kube: KubeClient) -> int:
        order = sorted(set(tenants)) if tenants else await list_tenants(kube)
        plans = [await plan_of(kube, ns) for ns in order]
        if output == "json":
            print(json.dumps({"tenants": [p.as_json() for p in plans]}, indent=2))
        else:
            print(render_plan(plans))
        return 0

    return _run("plan", work)


def apply_command(
    tenants: list[str] | None, all_tenants: bool, yes: bool, delay: float, state: str, log_dir: str
) -> int:
    if delay < 0:
        print("waso migrate apply: --delay must not be negative", file=sys.stderr)
        return 2
    chosen = None if all_tenants else (tenants or [])

    async def work(kube: KubeClient) -> int:
        return await apply(kube, chosen, yes=yes, delay=delay, state_path=Path(state), log_dir=Path(log_dir))

    return _run("apply", work)


def rollback_command(tenant: str, yes: bool, state: str, log_dir: str) -> int:
    async def work(kube: KubeClient) -> int:
        return await rollback(kube, tenant, yes=yes, state_path=Path(state), log_dir=Path(log_dir))

    return _run("rollback", work)
