"""The guides' commands, run as they are written: docs/capacity.md, docs/runbook.md, docs/multi-tenancy.md.

The chart is installed by Helm as release `waso` in `waso-system` with the simulator pairing by itself and a
Redis server outside the cluster, and docs/samples is applied unchanged (tenants `acme` and `globex`), so each
`sh` block of the guides runs verbatim with bash (`set -euo pipefail`): what a reader would type. Every block
carries an id (an HTML comment above it). Each scenario test brings the cluster into the state its block is
written for (an operator killed, a pod out of memory, a ban wave, an identity-break wave, Redis stopped, the
node taken out of service), runs the block and checks what came of it. A line ending in `# → TEXT` must print
TEXT. The last test checks that every block of the guides ran.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import pytest
from kubernetes import client

from tests.conftest import ControlPlane, redis_process
from tests.operator_support import condition, get, list_sessions, namespace_gone
from tests.runtime_support import http_json
from tests.support import BIN, free_port, kubectl, wait_for

ROOT = Path(__file__).resolve().parent.parent
GUIDES = tuple(ROOT / "docs" / name for name in ("capacity.md", "runbook.md", "multi-tenancy.md"))
BLOCK = re.compile(r"^<!-- guide: ([a-z0-9-]+) -->\n```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)
PRINTS = re.compile(r"^(?P<command>[^\n#]+?)\s+# → (?P<output>[^\n]+)$", re.MULTILINE)
TENANTS = ("acme", "globex")
NODE = "waso-node"
SIMULATOR_PORT = 8090
RUNTIME_PORT = 8080
RAN: set[str] = set()


def guide_blocks() -> dict[str, str]:
    """Every sh block of the guides by its id."""
    blocks: dict[str, str] = {}
    for guide in GUIDES:
        text = guide.read_text()
        found = BLOCK.findall(text)
        assert text.count("```sh") == len(found), f"{guide.name}: an sh block without a `<!-- guide: id -->` above it"
        for block_id, body in found:
            assert block_id not in blocks, f"{guide.name}: the id {block_id} is used twice"
            blocks[block_id] = body
    return blocks


def as_script(body: str) -> str:
    """The block for bash, each `COMMAND   # → TEXT` line turned into a check that COMMAND prints TEXT."""

    def check(line: re.Match[str]) -> str:
        expected = shlex.quote(line["output"])
        command = line["command"]
        return (
            f'test "$({command})" = {expected} '
            f"|| {{ printf 'expected %s from: %s\\n' {expected} {shlex.quote(command)} >&2; exit 1; }}"
        )

    return PRINTS.sub(check, body)


@dataclass
class Cluster:
    control_plane: ControlPlane
    redis: subprocess.Popen[bytes] | None
    redis_host: str
    redis_port: int
    redis_dir: Path

    def run(self, block_id: str, **env: str) -> str:
        """Run the guides' block ``block_id`` as written; its standard output."""
        body = guide_blocks()[block_id]
        path = f"{BIN}:{Path(sys.executable).parent}:{os.environ['PATH']}"  # kubectl, helm; kubectl-waso
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", as_script(body)],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
            env={**os.environ, "PATH": path, "KUBECONFIG": str(self.control_plane.kubeconfig), **env},
        )  # fmt: skip
        assert result.returncode == 0, (
            f"guide block {block_id} failed ({result.returncode}):\n{body}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
        RAN.add(block_id)
        return result.stdout

    def helm(self, *args: str) -> None:
        result = subprocess.run(
            [str(BIN / "helm"), f"--kubeconfig={self.control_plane.kubeconfig}", *args],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"

    @property
    def api(self) -> client.ApiClient:
        return self.control_plane.api

    def running_pod(self, namespace: str, selector: str) -> client.V1Pod:
        def found() -> client.V1Pod | None:
            pods = client.CoreV1Api(self.api).list_namespaced_pod(namespace, label_selector=selector).items
            ready = [
                p for p in pods
                if not p.metadata.deletion_timestamp
                and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
            ]  # fmt: skip
            return ready[0] if len(ready) == 1 else None

        return wait_for(found, timeout=180, what=f"one ready pod {selector} in {namespace}", interval=0.5)

    def simulator(self) -> str:
        pod = self.running_pod("waso-system", "app.kubernetes.io/component=simulator")
        return f"http://{pod.status.pod_ip}:{SIMULATOR_PORT}"

    def fault(self, phone: str, kind: str, **extra: Any) -> dict[str, Any]:
        reply = http_json("POST", f"{self.simulator()}/v1/phones/{quote(phone)}/faults", {"kind": kind, **extra})
        assert reply.status == 200, reply.body
        body: dict[str, Any] = reply.body
        return body

    def start_redis(self) -> None:
        self.redis_context = redis_process(self.redis_host, self.redis_port, self.redis_dir)
        self.redis = self.redis_context.__enter__()

    def stop_redis(self) -> None:
        if self.redis is not None:
            self.redis_context.__exit__(None, None, None)
            self.redis = None


def wait_all_ready(cluster: Cluster, namespaces: tuple[str, ...] = TENANTS, timeout: float = 300) -> None:
    def ready() -> bool:
        sessions = [s for ns in namespaces for s in list_sessions(cluster.api, ns)]
        return bool(sessions) and all((c := condition(s, "Ready")) and c["status"] == "True" for s in sessions)

    wait_for(ready, timeout=timeout, what=f"every session of {', '.join(namespaces)} Ready", interval=0.5)


def wait_gone(control_plane: ControlPlane, namespaces: tuple[str, ...], timeout: float = 180) -> None:
    def gone() -> bool:
        return all(namespace_gone(control_plane.api, name) for name in namespaces)

    try:
        wait_for(gone, timeout=timeout, what=f"namespaces {', '.join(namespaces)} gone", interval=0.5)
    except AssertionError as error:  # what the namespace controller still waits for
        left = kubectl(control_plane.kubeconfig, "get", "namespaces", *namespaces, "--ignore-not-found",
                       "-o", "jsonpath={range .items[*]}{.metadata.name}: {.status.conditions}{'\\n'}{end}",
                       check=False)  # fmt: skip
        raise AssertionError(f"{error}\n{left.stdout}{left.stderr}") from None


def quota(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return get(cluster.api, namespace, "default", plural="tenantquotas")


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """waso installed as the guides assume it, with the samples' tenants Ready."""
    wait_gone(control_plane, (*TENANTS, "initech", "waso-system"))  # test_api_schema applies the samples too
    control_plane.local().load_image(BIN / "waso-image.tar")
    host = str(urlparse(control_plane.api.configuration.host).hostname)  # the machine's end of the node's veth
    found = Cluster(control_plane, None, host, free_port(), tmp_path_factory.mktemp("guides-redis"))
    found.start_redis()
    try:
        found.helm(
            "install", "waso", str(ROOT / "charts/waso"), "-n", "waso-system", "--create-namespace",
            "--set", "namespaces={acme,globex,initech}",
            "--set", "simulator.enabled=true",
            "--set", "simulator.autoPair=true",
            "--set", "simulator.autoPairSeconds=1",
            "--set", "image.pullPolicy=Never",
            "--set", f"config.redisUrl=redis://{host}:{found.redis_port}/0",
            "--wait", "--timeout", "4m",
        )  # fmt: skip
        kubectl(control_plane.kubeconfig, "apply", "--server-side", "-f", str(ROOT / "docs/samples"))
        wait_all_ready(found)
        yield found
    finally:
        kubectl(control_plane.kubeconfig, "taint", "nodes", NODE, "node.kubernetes.io/out-of-service-", check=False)
        kubectl(control_plane.kubeconfig, "delete", "namespace", "--wait=false", "--ignore-not-found",
                *TENANTS, "initech", check=False)  # fmt: skip
        # The sessions' pods unlink their devices; the operator releases a finalizer at the latest after
        # cleanupTimeoutSeconds (300 s), so a busy machine may take that long and more.
        wait_gone(control_plane, (*TENANTS, "initech"), timeout=420)
        found.helm("uninstall", "waso", "-n", "waso-system", "--wait")
        kubectl(control_plane.kubeconfig, "delete", "namespace", "waso-system", "--wait=false", check=False)
        found.stop_redis()


def test_every_sh_block_of_the_guides_has_an_id_and_checks_are_scripts() -> None:
    blocks = guide_blocks()
    assert {"runbook-overview", "capacity-overview", "tenancy-boundaries"} <= set(blocks)
    script = as_script("kubectl auth can-i get pods   # → yes\n")
    assert script.startswith('test "$(kubectl auth can-i get pods)" = yes ||'), script
    ok = subprocess.run(["bash", "-euo", "pipefail", "-c", as_script("echo yes   # → yes\n")], check=False)
    wrong = subprocess.run(["bash", "-euo", "pipefail", "-c", as_script("echo no   # → yes\n")],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert (ok.returncode, wrong.returncode) == (0, 1)
    assert "expected yes from: echo no" in wrong.stderr


def test_capacity_overview_memory_and_status(cluster: Cluster) -> None:
    status = cluster.run("runbook-overview")
    overview = cluster.run("capacity-overview")
    for tenant in TENANTS:
        assert tenant in status
        assert tenant in overview
    # acme's two connected sessions and globex's two: the cap comes from the chart's operator ConfigMap
    assert "Capacity: 4/35 sessions admitted (operator configuration waso-system/waso-operator)" in status
    assert "  Connected 2, Suspended 1" in status  # acme's sessions by phase

    def reported() -> list[list[str]] | None:
        rows = [line.split() for line in cluster.run("capacity-memory").splitlines()[1:]]
        ours = [row for row in rows if row[0] in TENANTS]
        # every session pod of the tenants reports working set/limit in bytes with its heartbeat
        return ours if {row[0] for row in ours} == set(TENANTS) else None

    rows = wait_for(reported, timeout=60, what="the heartbeat Leases of both tenants' session pods", interval=1)
    assert all(re.fullmatch(r"\d+/536870912", row[2]) for row in rows), rows  # working set/the 512Mi limit


def test_capacity_grow_raises_the_quota_and_the_cap(cluster: Cluster) -> None:
    out = cluster.run("capacity-grow")
    assert "maxSessions: 40" in out

    def honoured() -> dict[str, Any] | None:
        found = quota(cluster, "acme")
        return found if found.get("status", {}).get("hard", {}).get("sessions") == 6 else None

    wait_for(honoured, timeout=120, what="acme's quota of 6 in force", interval=0.5)
    wait_all_ready(cluster)
    assert "Capacity: 4/40 sessions admitted" in cluster.run("capacity-overview")


def test_tenancy_onboarding_boundaries_and_offboarding(cluster: Cluster) -> None:
    cluster.run("tenancy-onboard")
    assert condition(quota(cluster, "initech"), "Ready") is not None
    boundaries = cluster.run("tenancy-boundaries")
    assert '"waso.dev/runtime-access":"true"' in boundaries
    cluster.run("tenancy-offboard")
    assert namespace_gone(cluster.api, "initech")


def test_runbook_operator_down(cluster: Cluster) -> None:
    operator = cluster.running_pod("waso-system", "app.kubernetes.io/component=operator")
    kubectl(cluster.control_plane.kubeconfig, "-n", "waso-system", "delete", "pod", str(operator.metadata.name),
            "--grace-period=0", "--force")  # fmt: skip
    # The sessions stay connected without it, and its Deployment starts another, whose log the block reads.
    successor = cluster.running_pod("waso-system", "app.kubernetes.io/component=operator")
    assert successor.metadata.name != operator.metadata.name
    out = cluster.run("runbook-operator-down")
    assert "successfully rolled out" in out
    # The restarted operator decides: a new session is admitted, placed and paired.
    kubectl(cluster.control_plane.kubeconfig, "-n", "acme", "apply", "-f", "-", stdin=(
        "apiVersion: waso.dev/v1alpha1\nkind: WhatsAppSession\n"
        "metadata: {name: orders, namespace: acme}\nspec: {phoneNumber: '+4915112345609'}\n"
    ))  # fmt: skip
    wait_all_ready(cluster, ("acme",))
    kubectl(cluster.control_plane.kubeconfig, "-n", "acme", "delete", "whatsappsession", "orders", "--timeout=2m")


def _send(cluster: Cluster, session: str) -> int:
    token = kubectl(cluster.control_plane.kubeconfig, "-n", "acme", "create", "token", "app", "--audience", "waso")
    shard = get(cluster.api, "acme", session)["status"]["shard"]
    pod = client.CoreV1Api(cluster.api).read_namespaced_pod(f"waso-sessions-{shard}", "acme")
    reply = http_json(
        "POST", f"http://{pod.status.pod_ip}:{RUNTIME_PORT}/v1/sessions/{session}/messages",
        {"to": "+4915100000000", "text": "while Redis is down"}, token=token.stdout.strip(),
    )  # fmt: skip
    return reply.status


def test_runbook_redis_down(cluster: Cluster) -> None:
    cluster.stop_redis()
    try:
        assert _send(cluster, "support") == 202  # the limiter fails open: sending goes on
        out = cluster.run("runbook-redis-down")
        assert "rate limiter unavailable" in out
    finally:
        cluster.start_redis()
    assert _send(cluster, "support") == 202


def test_runbook_ban_wave(cluster: Cluster) -> None:
    phones = {"support": "+4915112345601", "sales": "+4915112345602"}
    for phone in phones.values():
        cluster.fault(phone, "ban", seconds=30)

    def banned() -> bool:
        return all(get(cluster.api, "acme", name)["status"].get("phase") == "Banned" for name in phones)

    wait_for(banned, timeout=90, what="acme's sessions Banned", interval=0.5)
    out = cluster.run("runbook-ban-wave")
    rows = [line.split() for line in out.splitlines() if line.startswith("acme ")]
    assert {row[1] for row in rows if row[2] == "Banned" and row[3] != "<none>"} == set(phones), out
    assert re.search(r"\bBanned\s+whatsappsession/support\b", out), out  # the Events
    assert out.rstrip().endswith("120")  # acme's messagesPerMinute
    wait_all_ready(cluster, ("acme",))  # once the bans end, without a person


def test_runbook_identity_wave(cluster: Cluster) -> None:
    globex = [s["metadata"]["name"] for s in list_sessions(cluster.api, "globex") if not s["spec"].get("suspend")]
    broken = {("acme", "support"): "+4915112345601"}
    broken |= {("globex", name): get(cluster.api, "globex", name)["spec"]["phoneNumber"] for name in globex[:1]}
    for phone in broken.values():
        cluster.fault(phone, "identity_mismatch")
        cluster.fault(phone, "drop")  # the next login reports another device than the one stored

    def repairs_started() -> bool:
        return all(
            (get(cluster.api, ns, name)["status"].get("repairs") or {}).get("count", 0) >= 1 for ns, name in broken
        )

    wait_for(repairs_started, timeout=180, what="a repair of each broken session", interval=0.5)
    out = cluster.run("runbook-identity-wave")
    assert "RepairStarted" in out
    assert "tenantquota.waso.dev/default patched" in out
    wait_all_ready(cluster)  # re-paired: the simulator scans the new QR codes


def test_runbook_out_of_memory(cluster: Cluster) -> None:
    tiny = {"requests": {"cpu": "50m", "memory": "16Mi"}, "limits": {"memory": "16Mi"}}
    client.CustomObjectsApi(cluster.api).patch_namespaced_custom_object(
        "waso.dev", "v1alpha1", "acme", "tenantquotas", "default", {"spec": {"podResources": tiny}}
    )

    def out_of_memory() -> bool:
        found = condition(get(cluster.api, "acme", "support"), "Connected")
        return bool(found and found["reason"] == "OutOfMemory")

    wait_for(out_of_memory, timeout=240, what="acme/support OutOfMemory", interval=0.5)
    out = cluster.run("runbook-oom")
    assert re.search(r"^acme\s+support\s", out, re.MULTILINE), out
    assert "16Mi" in out  # the Connected message names the limit
    assert "condition met" in out


def test_runbook_node_lost_fenced_and_back(cluster: Cluster) -> None:
    listed = cluster.run("runbook-node-lost", NODE=NODE)
    assert re.search(r"^acme\s+waso-sessions-0\s", listed, re.MULTILINE), listed
    cluster.run("runbook-node-fenced", NODE=NODE)
    core = client.CoreV1Api(cluster.api)

    def evicted() -> bool:
        pods = [p for ns in TENANTS for p in core.list_namespaced_pod(ns).items]
        return all(p.status.phase == "Pending" and not p.spec.node_name for p in pods)

    wait_for(evicted, timeout=300, what="the session pods off the node, waiting for one", interval=1)

    # The operator ran on this (only) node too: the conditions change once it runs again (test_runtime.py
    # proves HeartbeatLost with the operator alive).
    out = cluster.run("runbook-node-back", NODE=NODE)
    assert "condition met" in out
    wait_all_ready(cluster)


def test_every_block_of_the_guides_ran() -> None:
    assert set(guide_blocks()) - RAN == set(), "guide blocks no test ran"
