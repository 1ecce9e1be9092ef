#!/usr/bin/env python3
"""`make bench-operator`: the operator's scale curve, each size on a fresh local control plane.

For 1,000 / 5,000 / 10,000 sessions in 100 / 500 / 1,000 tenant namespaces (``--sizes``):
the time until every session has its admission decision and shard, the floor (the same
number of plain status writes by a plain client, same run, same API server), the ratio,
the operator's CPU seconds per 1,000 sessions, its peak RSS and the API writes it made per
session (the API server's own request counter). With the largest size present, then: the
create→Admitted latency p50/p99 of new sessions, the steady-state cost with nothing changing
(operator CPU, and API requests per minute over the same window without the operator), and
the failover from a killed leader to its standby's first decision.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import urllib3
from kubernetes import client, config, watch
from localcluster import LocalCluster
from processes import die_with_parent, free_port

from waso.api.base import GROUP, VERSION
from waso.operator.admission import ADMITTED
from waso.operator.status import desired_status
from waso.operator.world import session_facts

PLURAL = "whatsappsessions"
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000:100,5000:500,10000:1000", help="SESSIONS:TENANTS,...")
    parser.add_argument("--threads", type=int, default=16, help="client threads for creates and the floor")
    parser.add_argument("--curve-only", action="store_true", help="skip latency, steady state and failover")
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split(":")) for size in args.sizes.split(",")]
    rows = []
    for index, (sessions, tenants) in enumerate(sizes):
        with tempfile.TemporaryDirectory(prefix="waso-bench-") as tmp:
            # The operator against the API server: a node would run (or fail to pull) a pod for each of the
            # tenants and take the CPU the measurement is about.
            cluster = LocalCluster(Path(tmp) / "cluster", node=False)
            cluster.start(tied=True)
            try:
                last = index == len(sizes) - 1 and not args.curve_only
                row = run(cluster.kubeconfig, sessions, tenants, sessions // tenants, args.threads, Path(tmp), last)
            finally:
                cluster.stop()
        if row is None:
            return 1
        rows.append(row)
    print()
    print("sessions | namespaces | operator s | floor s | ratio | CPU s/1000 | peak RSS MiB | API writes/session")
    for row in rows:
        ratio = row.operator_seconds / row.floor_seconds
        print(f"{row.sessions:>8} | {row.tenants:>10} | {row.operator_seconds:>10.1f} | {row.floor_seconds:>7.1f} | "
              f"{ratio:>5.2f} | {row.cpu_per_1000:>10.1f} | {row.peak_rss_mib:>12.1f} | "
              f"{row.writes_per_session:>18.2f}")  # fmt: skip
    return 0


@dataclass(frozen=True)
class Row:
    sessions: int
    tenants: int
    operator_seconds: float
    floor_seconds: float
    cpu_per_1000: float
    peak_rss_mib: float
    writes_per_session: float


def run(kubeconfig: Path, total: int, tenants: int, per_tenant: int, threads: int, tmp: Path, last: bool) -> Row | None:
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    api.configuration.connection_pool_maxsize = threads
    subprocess.run(
        [str(ROOT / "bin/kubectl"), f"--kubeconfig={kubeconfig}", "apply", "--server-side", "-f", str(ROOT / "crds")],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [str(ROOT / "bin/kubectl"), f"--kubeconfig={kubeconfig}", "wait", "--for=condition=Established",
         "-f", str(ROOT / "crds")],
        check=True, capture_output=True,
    )  # fmt: skip
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    install_finalizer_policy(kubeconfig, custom)
    namespaces = [f"bench-{i:03d}" for i in range(tenants)]
    for ns in [*namespaces, "floor"]:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    pool = ThreadPoolExecutor(threads)

    def session(ns: str, name: str, phone: int) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WhatsAppSession",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"phoneNumber": f"+49151{phone:08d}"},
        }
        return cast(dict[str, Any], custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body))

    started = time.monotonic()
    specs = [(ns, f"s{j}", i * per_tenant + j) for i, ns in enumerate(namespaces) for j in range(per_tenant)]
    list(pool.map(lambda s: session(*s), specs))
    create_seconds = time.monotonic() - started

    # The floor: the same status writes by a plain client, on objects of the same kind: the status the operator
    # writes when it admits a session (built by the operator's own function), server-side applied as it does.
    floor_specs = [("floor", f"f{i}", 90_000_000 + i) for i in range(total)]
    created = list(pool.map(lambda s: session(*s), floor_specs))
    now = datetime.now(UTC)
    statuses = [desired_status(session_facts(obj), ADMITTED, 0, now).to_wire() for obj in created]

    def floor_write(name: str, status: dict[str, Any]) -> object:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WhatsAppSession",
                "metadata": {"name": name, "namespace": "floor"}, "status": status}  # fmt: skip
        return custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, "floor", PLURAL, name, body, field_manager="floor", force=True, field_validation="Ignore",
            _content_type="application/apply-patch+yaml",
        )  # fmt: skip

    started = time.monotonic()
    list(pool.map(floor_write, [s[1] for s in floor_specs], statuses))
    floor_seconds = time.monotonic() - started
    # For comparison with earlier runs: the floor as it was first measured, a three-field status merge-patched.
    small = {"status": {"phase": "Pending", "observedGeneration": 2, "shard": 1}}
    started = time.monotonic()
    list(pool.map(lambda s: custom.patch_namespaced_custom_object_status(GROUP, VERSION, "floor", PLURAL, s[1], small),
                  floor_specs))  # fmt: skip
    small_floor_seconds = time.monotonic() - started
    no_finalizers = {"metadata": {"finalizers": None}}  # the policy's, and no operator ran to release them
    list(pool.map(lambda s: custom.patch_namespaced_custom_object(GROUP, VERSION, "floor", PLURAL, s[1], no_finalizers),
                  floor_specs))  # fmt: skip
    delete_all(custom, "floor")

    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "WASO_MAX_SESSIONS": str(total + LATENCY_PROBES),
        "WASO_DEFAULT_QUOTA__MAX_SESSIONS": str(per_tenant),
        "WASO_METRICS_PORT": "0",
        "WASO_RUNTIME_IMAGE": "waso:bench",
    }
    log = (tmp / "operator.log").open("wb")
    metrics_port = free_port()  # the first operator's metrics: its own count of API requests
    # WASO_BENCH_WRAP prefixes the operator's command, e.g. with `py-spy record -o ... --duration 14 --`.
    wrapper = os.environ.get("WASO_BENCH_WRAP", "").split()

    def start_operator(name: str, wrap: list[str]) -> subprocess.Popen[bytes]:
        out = log if name == "operator-0" else (tmp / f"{name}.log").open("wb")
        return subprocess.Popen(
            [*wrap, sys.executable, "-m", "waso.cli.main", "operator"],  # cluster-wide, logs as shipped
            env={**env, "POD_NAME": name, "WASO_METRICS_PORT": str(metrics_port) if name == "operator-0" else "0"},
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip

    # Progress is followed by a watch: listing every session a few times a second would load the API server
    # (and this machine's two cores) more than the operator does.
    progress = Progress(api)
    writes_before = api_requests(kubeconfig, WRITE_VERBS)
    started = time.monotonic()
    operator = start_operator("operator-0", wrapper)
    decided = 0
    try:
        while time.monotonic() - started < 3600:
            decided = progress.count()
            if decided == total:
                break
            if operator.poll() is not None:
                raise SystemExit(f"operator exited with {operator.returncode}; see {log.name}")
            progress.changed.wait(0.5)
        operator_seconds = progress.last_change - started
        peak_rss_mib = _peak_rss_kib(operator.pid) / 1024
        operator_cpu = _cpu_seconds(operator.pid)
        writes = api_requests(kubeconfig, WRITE_VERBS) - writes_before
        if last and decided == total:
            # "While 10,000 exist" and "nothing changing": once the burst's work is done, the thousand tenants'
            # workloads (applied beside the decisions) included; the wait itself is printed.
            settled_after = wait_for_workloads(api, tenants) - progress.last_change
            latencies = measure_latency(custom, core, progress)
            # Nothing changing: also the control plane has created every tenant's pod.
            wait_for_workloads(api, tenants + LATENCY_PROBES, pods=True)
            steady = measure_steady_state(kubeconfig, operator, metrics_port)
            failovers = measure_failovers(custom, operator, start_operator, tmp)
    finally:
        progress.stop()
        operator.kill()
        operator.wait()
        if os.environ.get("WASO_BENCH_KEEP_LOG"):
            subprocess.run(["cp", log.name, os.environ["WASO_BENCH_KEEP_LOG"]], check=False)
    if decided != total:
        print(f"only {decided} of {total} sessions decided within 3600 s", file=sys.stderr)
        return None

    print(f"sessions: {total} in {tenants} namespaces (created in {create_seconds:.1f} s by {threads} client threads)")
    print(f"operator: every session admitted and placed in {operator_seconds:.1f} s from operator start "
          f"({total / operator_seconds:.0f} sessions/s)")  # fmt: skip
    print(f"operator peak RSS: {peak_rss_mib:.1f} MiB; operator CPU time {operator_cpu:.1f} s")
    print(
        f"floor: {total} status writes by a plain client in {floor_seconds:.1f} s ({total / floor_seconds:.0f}/s); "
        f"{total} merge patches of a three-field status (the first floor) in {small_floor_seconds:.1f} s"
    )
    print(f"ratio operator/floor: {operator_seconds / floor_seconds:.2f}")
    print(f"API writes while admitting and placing: {writes} ({writes / total:.2f} per session)")
    if last:
        print(f"every tenant's workload applied {settled_after:.1f} s after the last decision")
        print(
            f"with {total} sessions present: create→Admitted of {LATENCY_PROBES} new sessions, one at a time: "
            f"p50 {_percentile(latencies, 50) * 1000:.0f} ms, p99 {_percentile(latencies, 99) * 1000:.0f} ms"
        )
        print(
            f"steady state, nothing changing, {STEADY_SECONDS:.0f} s: operator CPU {steady[0]:.2f} s "
            f"({steady[0] / STEADY_SECONDS * 100:.2f}% of a core); API requests per minute: {steady[3]:.0f} by the "
            f"operator (its own count), {steady[1]:.0f} by all clients, {steady[2]:.0f} with the operator stopped"
        )
        print(
            f"failover with {total} sessions: kill -9 of the leader → the standby's first decision in "
            + ", ".join(f"{s:.1f} s" for s in failovers)
            + f" (lease {LEASE_SECONDS} s; best {min(failovers):.1f} s)"
        )
    return Row(total, tenants, operator_seconds, floor_seconds, operator_cpu / total * 1000, peak_rss_mib,
               writes / total)  # fmt: skip


def delete_all(custom: client.CustomObjectsApi, namespace: str) -> None:
    """Every session of the namespace, gone: a collection of 10,000 can outlast one request's 60 s (504), and
    the deletion then goes on where it stopped."""
    while True:
        try:
            custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        except client.ApiException as error:
            if error.status != 504:
                raise
        left = cast(dict[str, Any], custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, limit=1))
        if not left["items"]:
            return
        time.sleep(0.2)


class Progress:
    """Sessions decided and placed, followed by a watch of every session (from the moment of construction)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        listing = cast(dict[str, Any], self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL))
        self.decided = {o["metadata"]["uid"] for o in listing["items"] if _decided_and_placed(o)}
        self.decided_at: dict[str, float] = {}
        """When the watch delivered each session's decision (monotonic), for those decided after construction."""
        self.last_change = time.monotonic()
        self.changed = threading.Event()
        self._stopped = False
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(
            target=self._follow, args=(listing["metadata"]["resourceVersion"],), daemon=True
        )
        self._thread.start()

    def _follow(self, resource_version: str) -> None:
        while not self._stopped:  # the API server ends a watch after a while: go on from where it was
            stream = self._watch.stream(  # type: ignore[no-untyped-call]
                self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, resource_version=resource_version
            )
            try:
                for event in stream:
                    resource_version = self._seen(event)
            except (urllib3.exceptions.HTTPError, OSError):
                if not self._stopped:  # cut off: again from the last event seen (the cluster stopping ends it)
                    time.sleep(0.2)

    def _seen(self, event: dict[str, Any]) -> str:
        obj = event["object"]
        uid = obj["metadata"]["uid"]
        if event["type"] != "DELETED" and _decided_and_placed(obj) and uid not in self.decided:
            self.decided.add(uid)
            self.last_change = self.decided_at[uid] = time.monotonic()
            self.changed.set()
        return cast(str, obj["metadata"]["resourceVersion"])

    def count(self) -> int:
        self.changed.clear()
        return len(self.decided)

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()  # type: ignore[no-untyped-call]


def install_finalizer_policy(kubeconfig: Path, custom: client.CustomObjectsApi) -> None:
    """The chart's MutatingAdmissionPolicy (the credentials finalizer at creation), as `helm install` renders it."""
    rendered = subprocess.run(
        [str(ROOT / "bin/helm"), "template", "waso", str(ROOT / "charts/waso"), "--namespace", "waso-system",
         "--api-versions", "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy",
         "--show-only", "templates/finalizer-policy.yaml"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    subprocess.run(
        [str(ROOT / "bin/kubectl"), f"--kubeconfig={kubeconfig}", "apply", "--server-side", "-f", "-"],
        input=rendered, check=True, capture_output=True, text=True,
    )  # fmt: skip
    probe = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "WhatsAppSession",
        "metadata": {"name": "probe", "namespace": "default"}, "spec": {"phoneNumber": "+4915200000000"},
    }  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the API server loads a new policy (and serves a new CRD) within seconds
        try:
            created = cast(
                dict[str, Any],
                custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, probe, dry_run="All"),
            )
        except client.ApiException as error:
            if error.status != 503:  # 503: the kind is not served yet
                raise
        else:
            if created["metadata"].get("finalizers"):
                return
        time.sleep(0.5)
    raise SystemExit("the finalizer policy did not take effect within 60 s")


LATENCY_PROBES = 100
STEADY_SECONDS = 60.0
WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE")
"""The verbs of apiserver_request_total that write (server-side apply is APPLY)."""
READ_VERBS = ("GET", "LIST")


def api_requests(kubeconfig: Path, verbs: tuple[str, ...]) -> int:
    """The API server's count of finished requests with these verbs (apiserver_request_total), all clients."""
    metrics = subprocess.run(
        [str(ROOT / "bin/kubectl"), f"--kubeconfig={kubeconfig}", "get", "--raw", "/metrics"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("apiserver_request_total{") and any(f'verb="{v}"' in line for v in verbs):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def wait_for_workloads(api: client.ApiClient, tenants: int, *, pods: bool = False) -> float:
    """Until every tenant has its StatefulSet (the last of its workload objects), or with ``pods`` its session pod
    (the control plane's own work on the workloads is done); when that was (monotonic).

    Counted by a page of one and its remainingItemCount (which a selector would unset): the bench cluster has
    no StatefulSet or pod but the operator's."""
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    listing = core.list_pod_for_all_namespaces if pods else apps.list_stateful_set_for_all_namespaces
    what = "session pods" if pods else "workloads"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        page = listing(limit=1)
        meta = page.metadata
        if meta is not None and meta._continue and meta.remaining_item_count is None:  # not counted: list them all
            count = len(listing().items)
        else:
            count = len(page.items) + ((meta.remaining_item_count if meta is not None else None) or 0)
        if count >= tenants:
            return time.monotonic()
        time.sleep(1)
    raise SystemExit(f"the {what} of {tenants} tenants were not all there within 900 s")


def measure_latency(custom: client.CustomObjectsApi, core: client.CoreV1Api, progress: Progress) -> list[float]:
    """New sessions, one at a time, each in a namespace of its own (quota room): create → Admitted=True and placed,
    as a watch delivers it (what `kubectl wait` sees; polling every few ms would load the API server instead)."""
    latencies = []
    for i in range(LATENCY_PROBES):
        namespace = f"latency-{i:03d}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        body = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "WhatsAppSession",
            "metadata": {"name": "probe", "namespace": namespace}, "spec": {"phoneNumber": f"+4915288{i:06d}"},
        }  # fmt: skip
        started = time.monotonic()
        created = cast(dict[str, Any], custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body))
        uid = created["metadata"]["uid"]
        while uid not in progress.decided_at and time.monotonic() - started < 60:
            progress.changed.wait(0.5)
            progress.changed.clear()
        latencies.append(progress.decided_at.get(uid, time.monotonic()) - started)
    return latencies


def measure_steady_state(
    kubeconfig: Path, operator: subprocess.Popen[bytes], metrics_port: int
) -> tuple[float, float, float, float]:
    """Operator CPU seconds over a window with no changes; API requests per minute by the operator (its own
    count, ``waso_kube_requests_total``), by all clients, and by all clients with the operator stopped.

    The control plane's own components make requests too, and not evenly (the scheduler retries its unschedulable
    pods every few minutes): the API server's totals are printed for scale, the operator's count is its own.
    """
    verbs = WRITE_VERBS + READ_VERBS
    time.sleep(5)  # the latency probes' last writes settle
    cpu, requests, own = _cpu_seconds(operator.pid), api_requests(kubeconfig, verbs), _own_requests(metrics_port)
    time.sleep(STEADY_SECONDS)
    cpu_used = _cpu_seconds(operator.pid) - cpu
    by_operator = (_own_requests(metrics_port) - own) * 60 / STEADY_SECONDS
    with_operator = (api_requests(kubeconfig, verbs) - requests) * 60 / STEADY_SECONDS
    os.kill(operator.pid, signal.SIGSTOP)
    try:
        requests = api_requests(kubeconfig, verbs)
        time.sleep(STEADY_SECONDS)
        without = (api_requests(kubeconfig, verbs) - requests) * 60 / STEADY_SECONDS
    finally:
        os.kill(operator.pid, signal.SIGCONT)
    return cpu_used, with_operator, without, by_operator


def _own_requests(metrics_port: int) -> float:
    """The operator's own count of its requests to the API server (all methods)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("waso_kube_requests_total{")
    )


def _percentile(values: list[float], percentile: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * percentile // 100)]


LEASE_SECONDS = 10
"""The default of leaderElection.leaseSeconds."""
INDEXES_FILLED = "indexes filled"
"""What waso.operator.controller logs once kopf has listed everything (standby or not)."""


def measure_failovers(
    custom: client.CustomObjectsApi,
    leader: subprocess.Popen[bytes],
    start: Callable[[str, list[str]], subprocess.Popen[bytes]],
    tmp: Path,
    rounds: int = 3,
) -> list[float]:
    """Kill the leader while a standby with filled indexes waits; time until a new session is decided."""
    measured = []
    for round_ in range(rounds):
        name = f"operator-{round_ + 1}"
        standby = start(name, [])
        log = tmp / f"{name}.log"
        while INDEXES_FILLED not in log.read_text(errors="replace"):  # kopf fills indexes before any handler runs
            if standby.poll() is not None:
                raise SystemExit(f"standby exited with {standby.returncode}; see {log}")
            time.sleep(0.2)
        leader.kill()
        leader.wait()
        killed = time.monotonic()
        probe = f"failover-{round_}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "WhatsAppSession",
            "metadata": {"name": probe, "namespace": "bench-000"}, "spec": {"phoneNumber": f"+4915299{round_:06d}"},
        }  # fmt: skip
        custom.create_namespaced_custom_object(GROUP, VERSION, "bench-000", PLURAL, body)
        while time.monotonic() - killed < 120:
            obj = cast(dict[str, Any], custom.get_namespaced_custom_object(GROUP, VERSION, "bench-000", PLURAL, probe))
            if any(c["type"] == "Admitted" for c in obj.get("status", {}).get("conditions", [])):
                break
            time.sleep(0.1)
        measured.append(time.monotonic() - killed)
        leader = standby
    leader.kill()
    leader.wait()
    return measured


def _decided_and_placed(obj: dict[str, Any]) -> bool:
    status = obj.get("status", {})
    admitted = next((c for c in status.get("conditions", []) if c["type"] == "Admitted"), None)
    return admitted is not None and (admitted["status"] != "True" or status.get("shard") is not None)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
