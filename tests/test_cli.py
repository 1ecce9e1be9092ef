"""`waso` and `kubectl waso` as a person runs them: one line and an exit code when something is wrong, never a
traceback; the report, suspend and resume against the real API server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import test_runtime
from tests.conftest import ControlPlane
from tests.operator_support import Tenants, api_token, create_session, get
from tests.runtime_support import SseStream, http_json
from tests.support import BIN, wait_for
from tests.test_runtime import PHONE, World
from waso.cli.connection import CliError
from waso.cli.pair import QUIET_ZONE, draw, qr_matrix, read_drawing
from waso.kube import ApiError

simulator = test_runtime.simulator
operator = test_runtime.operator
world = test_runtime.world

VENV_BIN = Path(sys.executable).parent
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"  # the local API server's issuer (hack/localcluster.py)


def run(*args: str, kubeconfig: Path | str | None = None, kubectl: bool = False) -> subprocess.CompletedProcess[str]:
    """`waso ARGS`, or `kubectl waso ARGS` through kubectl's plugin lookup on PATH."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("KUBECONFIG", None)
    flags = ["--kubeconfig", str(kubeconfig)] if kubeconfig is not None else []
    command = [str(BIN / "kubectl"), "waso", *args, *flags] if kubectl else [str(VENV_BIN / "waso"), *args, *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def one_line(result: subprocess.CompletedProcess[str], code: int, prefix: str) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(prefix), line
    return line


def kubeconfig_with(control_plane: ControlPlane, tmp_path: Path, server: str | None = None, token: str = "") -> Path:
    """The test cluster's kubeconfig with another server address or another user's token."""
    document = yaml.safe_load(control_plane.kubeconfig.read_text())
    if server is not None:
        for entry in document["clusters"]:
            entry["cluster"]["server"] = server
    if token:
        for entry in document["users"]:
            entry["user"] = {"token": token}
    path = tmp_path / f"kubeconfig-{len(list(tmp_path.glob('kubeconfig-*')))}"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("kubectl", [False, True], ids=["waso", "kubectl-waso"])
def test_failures_are_one_line_with_their_exit_code(
    control_plane: ControlPlane, tenants: Tenants, tmp_path: Path, kubectl: bool
) -> None:
    prefix = "kubectl waso status: " if kubectl else "waso status: "
    missing = one_line(run("status", kubeconfig=tmp_path / "absent", kubectl=kubectl), 3, prefix)
    assert "no kubeconfig at" in missing
    assert "--kubeconfig" in missing

    closed = kubeconfig_with(control_plane, tmp_path, server="https://127.0.0.1:9")
    unreachable = one_line(run("status", kubeconfig=closed, kubectl=kubectl), 3, prefix)
    assert "cannot reach the API server" in unreachable

    namespace = tenants.namespace("acme")
    nobody = api_token(control_plane.api, namespace, "nobody", rules=None, audience=API_AUDIENCE)
    stranger = kubeconfig_with(control_plane, tmp_path, token=nobody)
    forbidden = one_line(run("status", kubeconfig=stranger, kubectl=kubectl), 4, prefix)
    assert forbidden.startswith(f"{prefix}forbidden: ")
    assert f"system:serviceaccount:{namespace}:nobody" in forbidden

    absent = one_line(run("status", "-n", namespace, "ghost", kubeconfig=control_plane.kubeconfig, kubectl=kubectl),
                      5, prefix)  # fmt: skip
    assert absent == f"{prefix}WhatsAppSession ghost not found in namespace {namespace}"

    wrong_context = run("status", "--context", "nope", kubeconfig=control_plane.kubeconfig, kubectl=kubectl)
    assert "kubeconfig not usable" in one_line(wrong_context, 3, prefix)


def test_status_suspend_and_resume_of_a_session(control_plane: ControlPlane, tenants: Tenants) -> None:
    namespace = tenants.namespace("acme")
    empty = run("status", "-n", namespace, kubeconfig=control_plane.kubeconfig, kubectl=True)
    assert empty.returncode == 0, empty.stderr
    create_session(control_plane.api, namespace, "s1", "+4915112345601")

    report = run("status", "-n", namespace, "-o", "yaml", kubeconfig=control_plane.kubeconfig, kubectl=True)
    assert report.returncode == 0, report.stderr
    (tenant,) = yaml.safe_load(report.stdout)["tenants"]
    assert tenant["namespace"] == namespace
    assert [s["name"] for s in tenant["sessions"]] == ["s1"]
    assert tenant["sessions"][0]["phone"] == "+4915112345601"

    suspended = run("suspend", f"{namespace}/s1", kubeconfig=control_plane.kubeconfig, kubectl=True)
    assert suspended.returncode == 0, suspended.stderr
    assert get(control_plane.api, namespace, "s1")["spec"]["suspend"] is True
    again = run("suspend", f"{namespace}/s1", kubeconfig=control_plane.kubeconfig)
    assert "is suspended already; nothing requested" in one_line(again, 1, "waso suspend: ")

    resumed = run("resume", f"{namespace}/s1", kubeconfig=control_plane.kubeconfig, kubectl=True)
    assert resumed.returncode == 0, resumed.stderr
    assert get(control_plane.api, namespace, "s1")["spec"]["suspend"] is False
    not_evicted = run("resume", f"{namespace}/s1", kubeconfig=control_plane.kubeconfig)
    assert "is not evicted" in one_line(not_evicted, 1, "waso resume: ")

    ghost = run("evict", f"{namespace}/ghost", kubeconfig=control_plane.kubeconfig)
    assert one_line(ghost, 5, "waso evict: ") == f"waso evict: WhatsAppSession {namespace}/ghost not found"
    usage = run("evict", "not-a-target", kubeconfig=control_plane.kubeconfig)
    assert "usage: waso evict NAMESPACE/NAME" in one_line(usage, 2, "waso evict: ")


@pytest.mark.simulator_args("--qr-interval", "120")  # one QR code for the whole test: no rotation to race
def test_kubectl_waso_pair_draws_the_simulators_qr_and_ends_when_it_is_scanned(world: World) -> None:
    runtime = world.runtime()
    world.session()
    world.wait_state("AwaitingPairing")
    stream = SseStream(runtime.port, "/v1/sessions/s1/qr", token=world.token)
    offered = stream.until("qr")["code"]
    stream.close()

    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    command = [str(BIN / "kubectl"), "waso", "pair", f"{world.namespace}/s1", "--url", runtime.url,
               "--service-account", "app", "--kubeconfig", str(world.kubeconfig)]  # fmt: skip
    pair = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(pair.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(line.startswith("Scan with WhatsApp") for line in lines), timeout=60,
                 what="the QR drawn by kubectl waso pair")  # fmt: skip
        scan_line = next(i for i, line in enumerate(lines) if line.startswith("Scan"))
        drawing = [line.rstrip("\n") for line in lines[:scan_line]]
        assert read_drawing(drawing) == qr_matrix(offered)  # the modules of the code the simulator offers

        scanned = http_json("POST", f"{world.simulator.url}/v1/phones/{PHONE}/scan", {"code": offered})
        assert scanned.status == 200, scanned.body
        assert pair.wait(timeout=60) == 0, pair.stderr.read()
        reader.join(10)
        assert lines[-1].strip() == f"paired: {world.namespace}/s1 is linked as {scanned.body['jid']}"
    finally:
        pair.kill()
    world.wait_state("Connected")


def test_a_drawing_reads_back_to_its_modules() -> None:
    matrix = qr_matrix("2@" + "x" * 60 + ",4915112345601,1")
    for invert in (False, True):
        assert read_drawing(draw(matrix, invert), invert) == matrix
    assert len(draw(matrix)) == (len(matrix) + 2 * QUIET_ZONE + 1) // 2


class _Listing:
    """A KubeClient's listings from plain data: enough for `waso status`'s gather."""

    def __init__(self, items: dict[str, list[dict[str, Any]]], refused: dict[str, ApiError] | None = None) -> None:
        self.items, self.refused = items, refused or {}

    async def list(self, kind: str, namespace: str | None = None, label_selector: str | None = None) -> dict[str, Any]:
        if kind in self.refused:
            raise self.refused[kind]
        return {"items": self.items.get(kind, []), "metadata": {}}


def _session(namespace: str, name: str, phase: str, admitted: bool) -> dict[str, Any]:
    condition = {"type": "Admitted", "status": str(admitted), "reason": "Admitted" if admitted else "QuotaExceeded",
                 "message": "", "lastTransitionTime": "2026-11-30T00:00:00Z"}  # fmt: skip
    return {
        "apiVersion": "waso.dev/v1alpha1", "kind": "WhatsAppSession",
        "metadata": {"name": name, "namespace": namespace, "uid": f"{namespace}-{name}"},
        "spec": {"phoneNumber": "+4915112345601"},
        "status": {"phase": phase, "conditions": [condition]},
    }  # fmt: skip


def test_status_reports_the_cap_from_the_operators_configmap_and_sessions_by_phase() -> None:
    from waso.cli import status

    sessions = [_session("acme", "a", "Connected", True), _session("acme", "b", "Connected", True),
                _session("acme", "c", "Waiting", False), _session("globex", "d", "Pairing", True)]  # fmt: skip
    config = {"metadata": {"namespace": "waso-system", "name": "waso-operator"},
              "data": {"config.yaml": "maxSessions: 40\n"}}  # fmt: skip
    report = asyncio.run(status.gather(_Listing({"WhatsAppSession": sessions, "ConfigMap": [config]}), None, None))  # type: ignore[arg-type]
    assert report["capacity"] == {
        "admitted": 3,
        "maxSessions": 40,
        "operator": "waso-system/waso-operator",
        "note": None,
    }
    assert report["tenants"][0]["phases"] == {"Connected": 2, "Waiting": 1}
    text = status.render(report)
    assert text.startswith("Capacity: 3/40 sessions admitted (operator configuration waso-system/waso-operator)\n")
    assert "Tenant acme: no TenantQuota: operator defaults apply\n  Connected 2, Waiting 1\n" in text

    unset = {**config, "data": {"config.yaml": "logFormat: json\n"}}  # the chart leaves the default out
    report = asyncio.run(status.gather(_Listing({"WhatsAppSession": sessions, "ConfigMap": [unset]}), None, None))  # type: ignore[arg-type]
    assert report["capacity"]["maxSessions"] == 35
    forbidden = _Listing(
        {"WhatsAppSession": sessions}, {"ConfigMap": ApiError(403, "Forbidden", "configmaps is forbidden")}
    )
    report = asyncio.run(status.gather(forbidden, None, None))  # type: ignore[arg-type]
    assert status.render(report).startswith(
        "Capacity: 3 sessions admitted; cap unknown: 403 Forbidden: configmaps is forbidden\n"
    )
    one_tenant = asyncio.run(status.gather(_Listing({"WhatsAppSession": sessions}), "acme", None))  # type: ignore[arg-type]
    assert "capacity" not in one_tenant  # a tenant's view: the cluster's cap is not its business


def test_status_on_a_cluster_without_the_crds_says_to_install_them() -> None:
    from waso.cli import status

    missing = _Listing(
        {}, {"WhatsAppSession": ApiError(404, "Not Found", "the server could not find the requested resource")}
    )
    with pytest.raises(CliError) as refused:
        asyncio.run(status.gather(missing, None, None))  # type: ignore[arg-type]
    assert str(refused.value) == (
        "this cluster does not serve WhatsAppSession (waso.dev/v1alpha1): install waso's CRDs "
        "(the chart, or kubectl apply -f crds/)"
    )
